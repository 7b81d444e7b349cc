"""
End-to-end test of C{log_format: json}: a real twistd writing its log file,
read with the real C{jq}.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from support import TCPEchoServer, exchange, freePort
from test_http_e2e import turnedAway

JQ = shutil.which("jq")


def jq(program: str, path) -> list:
    """
    What C{jq -c PROGRAM FILE} prints, one JSON value per line.
    """
    result = subprocess.run(
        [JQ, "-c", program, str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.skipif(
    JQ is None, reason="jq is not installed (Debian package jq; .ci/run installs it)"
)
def test_jsonLogReadByJq(proxy) -> None:
    """
    With C{log_format: json} every line of twistd's log file is a JSON
    object jq reads: listener lines, one access object per flow even for
    flows batched in the 20 ms window, and the reload summary with its
    counts.
    """
    web, refused = freePort(), freePort()
    logFile = proxy.workdir / "json.log"
    mapText = f"""
log_format: json
mappings:
  - name: web
    listen: 127.0.0.1:{web}
    target: 127.0.0.1:{{echo}}
  - name: refused
    listen: 127.0.0.1:{refused}
    target: 127.0.0.1:{freePort()}
"""
    with TCPEchoServer() as echo:
        proxy.spawn(mapText.format(echo=echo.port), f"--logfile={logFile}")
        # twistd writes to the log file, not to standard output: wait on it.
        proxy.logPath = logFile
        proxy.waitFor("portproxy started", timeout=30)
        flows = 40
        for n in range(flows):
            assert exchange(web, b"x" * n) == b"x" * n
        turnedAway(refused)
        proxy.reload(mapText.format(echo=echo.port).split("  - name: refused")[0])
        proxy.stop()

    everything = jq(".", logFile)
    assert everything and all(isinstance(record, dict) for record in everything)
    assert all({"time", "level", "namespace"} <= set(r) for r in everything)
    assert everything[0]["message"].startswith("twistd ")

    listeners = jq(
        'select(.message | endswith("[web]")) | [.mapping, .proto, .listen]', logFile
    )
    assert listeners == [["web", "tcp", f"127.0.0.1:{web}"]]

    access = jq(
        'select(.event == "access" and .mapping == "web") | [.flow, .bytes_in, .bytes_out, .reason]',
        logFile,
    )
    assert sorted(row[1] for row in access) == list(range(flows))
    assert all(row[1] == row[2] for row in access)
    assert len({row[0] for row in access}) == flows
    assert {row[3] for row in access} <= {"client closed", "target closed"}
    # The flows came faster than one per 20 ms: some of them were batched
    # into one log event, yet each is its own object with its own fields.
    times = jq('select(.event == "access" and .mapping == "web") | .time', logFile)
    assert len(set(times)) < flows

    failed = jq(
        'select(.event == "access" and .mapping == "refused") | [.proto, .client, .target, .reason, .duration]',
        logFile,
    )
    assert len(failed) == 1 and failed[0][3] == "connect failed: connection refused"
    assert failed[0][1].startswith("127.0.0.1:") and failed[0][4] >= 0

    summary = jq(
        "select(.summary) | [.added, .removed, .changed, .unchanged, .failed]", logFile
    )
    assert summary == [[0, 1, 0, 1, 0]]
