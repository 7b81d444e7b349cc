"""
Tests for C{python -m twistedproxy check}, run as a user runs it: a
subprocess, its exit status and its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from textwrap import dedent

from support import CODE

#: The checkout, whose config/ examples are checked.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(*arguments: str, cwd: str) -> subprocess.CompletedProcess:
    """
    Run C{python -m twistedproxy} with C{arguments} in C{cwd}, on the code
    the tests imported (the checkout, or the installed package with what
    pip built in it).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(CODE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.run(
        [sys.executable, "-m", "twistedproxy", *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


VALID = """\
    mappings:
      - name: web
        listen: 127.0.0.1:8000-8009
        target: 172.17.0.3:80-89
      - name: dns
        proto: [tcp, udp]
        listen: 53
        target: 172.17.0.4:53
    manhole:
      listen: 2222
      authorized_keys: keys
      host_key: host_key
    """

INVALID = """\
    mappings:
      - name: web
        listen: 127.0.0.1:8080
        target: 172.17.0.3:80
      - name: api
        listen: 70000
        tagret: 172.17.0.4:80
      - name: again
        listen: 8080
        target: 172.17.0.5:80
    """


def test_validMap(tmp_path) -> None:
    """
    A valid map exits 0 with one summary line on standard output.
    """
    (tmp_path / "map.yaml").write_text(dedent(VALID))
    result = check("check", "map.yaml", cwd=str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "map.yaml: OK, 2 mappings, 14 listeners (12 tcp, 2 udp), manhole on 127.0.0.1:2222\n",
        "",
    )


def test_invalidMap(tmp_path) -> None:
    """
    An invalid map exits 1 with every problem on standard error, one
    FILE:LINE: message per line, and nothing on standard output.
    """
    (tmp_path / "map.yaml").write_text(dedent(INVALID))
    result = check("check", "map.yaml", cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "map.yaml:6: listen: port 70000 is out of range (1-65535)",
        "map.yaml:7: mappings[1]: unknown key 'tagret' (expected one of: name, proto,"
        " listen, target, connect_timeout, idle_timeout, udp_timeout, max_connections,"
        " client_address, accept_proxy_protocol, allow, deny, max_connections_per_client, new_connections_per_client, datagrams_per_client, tls, target_tls, sni_routes)",
        "map.yaml:9: listen: tcp 0.0.0.0:8080 overlaps mapping 'web' (line 2)",
    ]


def test_missingFile(tmp_path) -> None:
    """
    A map that does not exist exits 1 with one line and no traceback.
    """
    result = check("check", "nowhere.yaml", cwd=str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        "nowhere.yaml: cannot read: No such file or directory\n",
    )


def test_notYAML(tmp_path) -> None:
    """
    A file that is not YAML exits 1 with one line and no traceback.
    """
    (tmp_path / "map.yaml").write_text("mappings: [\n")
    result = check("check", "map.yaml", cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "map.yaml:2: not valid YAML: did not find expected node content"
        " (while parsing a flow node on line 2)"
    ]


def test_severalMaps(tmp_path) -> None:
    """
    Several maps are checked in turn; one invalid map makes the exit
    status 1 while the valid ones still get their summary.
    """
    (tmp_path / "good.yaml").write_text(dedent(VALID))
    (tmp_path / "bad.yaml").write_text(dedent(INVALID))
    result = check("check", "good.yaml", "bad.yaml", "good.yaml", cwd=str(tmp_path))
    assert result.returncode == 1
    assert (
        result.stdout.splitlines()
        == [
            "good.yaml: OK, 2 mappings, 14 listeners (12 tcp, 2 udp), manhole on 127.0.0.1:2222"
        ]
        * 2
    )
    assert len(result.stderr.splitlines()) == 3


def test_examples() -> None:
    """
    The example maps in config/ pass the check, as the README promises.
    """
    result = check("check", "config/example.yaml", "config/docker.yaml", cwd=REPO)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "config/example.yaml: OK, 2 mappings, 2 listeners (1 tcp, 1 udp), no manhole",
        "config/docker.yaml: OK, 6 mappings, 13 listeners (9 tcp, 4 udp),"
        " manhole on 127.0.0.1:2222",
    ]


def test_singular(tmp_path) -> None:
    """
    The summary says "1 mapping" and "1 listener", not "1 mappings".
    """
    (tmp_path / "map.yaml").write_text(
        "mappings:\n  - {listen: '127.0.0.1:80', target: 'db:80', proto: udp}\n"
    )
    result = check("check", "map.yaml", cwd=str(tmp_path))
    assert (
        result.stdout
        == "map.yaml: OK, 1 mapping, 1 listener (0 tcp, 1 udp), no manhole\n"
    )


def test_usage(tmp_path) -> None:
    """
    A command line without a command, with an unknown command, or without
    a map exits 2 with a usage message on standard error.
    """
    for arguments in [(), ("frob", "map.yaml"), ("check",)]:
        result = check(*arguments, cwd=str(tmp_path))
        assert result.returncode == 2, arguments
        assert result.stdout == ""
        assert result.stderr.startswith("usage: python -m twistedproxy"), arguments


def test_help(tmp_path) -> None:
    """
    C{check --help} explains the command and exits 0.
    """
    result = check("check", "--help", cwd=str(tmp_path))
    assert result.returncode == 0
    assert "usage: python -m twistedproxy check [-h] MAP [MAP ...]" in result.stdout


def test_clientIdentityErrors(tmp_path):
    """
    An unknown client_address, a bad CIDR in accept_proxy_protocol, v1 for
    UDP and transparent towards loopback are FILE:LINE: message errors, and
    nothing else in that map is.
    """
    (tmp_path / "map.yaml").write_text(
        dedent("""\
        defaults:
          accept_proxy_protocol: [10.0.0.0/33]
        mappings:
          - name: a
            listen: 8000
            target: 10.0.0.2:80
            client_address: proxy_protocol_v3
          - name: b
            proto: udp
            listen: 8001
            target: 10.0.0.2:80
            client_address: proxy_protocol_v1
            accept_proxy_protocol: [10.0.0.0/8]
          - name: c
            listen: 8002
            target: 127.0.0.1:80
            client_address: transparent
        """)
    )
    result = check("check", "map.yaml", cwd=str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    assert (
        "map.yaml:2: defaults.accept_proxy_protocol: '10.0.0.0/33' is not a network"
        " (such as 10.0.0.0/8 or fd00::/8)" in lines
    )
    assert (
        "map.yaml:7: client_address: unknown value 'proxy_protocol_v3' (expected"
        " proxy_protocol_v1 | proxy_protocol_v2 | transparent)" in lines
    )
    assert (
        "map.yaml:12: client_address: proxy_protocol_v1 has no UDP form;"
        " use proxy_protocol_v2 for UDP" in lines
    )
    assert (
        "map.yaml:17: client_address: transparent cannot reach a target on loopback"
        " (127.0.0.1): its replies to the client's address would never come back"
        in lines
    )
    assert len(lines) == 4, lines


def test_transparentNeedsNetAdmin(tmp_path):
    """
    Without CAP_NET_ADMIN, transparent is refused with the reason.
    """
    from twistedproxy import transparency

    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert "needs CAP_NET_ADMIN" in transparency.problem(str(status))
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert transparency.problem(str(status)) is None
    status.write_text("Name:\tx\n")
    assert "cannot read" in transparency.problem(str(status))


def test_badAccessValues(tmp_path):
    """
    A CIDR with a prefix past 32 and a rate per minute are reported by
    check as FILE:LINE: message, every one, with exit status 1.
    """
    (tmp_path / "map.yaml").write_text(
        dedent(
            """\
            defaults:
              deny: [192.0.2.0/24, 10.0.0.0/33]
            mappings:
              - name: web
                listen: 8000
                target: 172.17.0.3:80
                new_connections_per_client: 5/minute
            """
        )
    )
    result = check("check", "map.yaml", cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "map.yaml:2: defaults.deny: '10.0.0.0/33': the prefix length must be 0-32 for IPv4",
        "map.yaml:7: new_connections_per_client: '5/minute' is not a rate"
        " (expected N/s, as in 20/s, or {rate: N/s, burst: B})",
    ]


def test_dockerSetupPrintsTheShimPath(tmp_path) -> None:
    """
    docker-setup prints the daemon.json fragment naming this install's
    shim by absolute path, as JSON, from any directory.
    """
    import json

    from twistedproxy.control import shimPath

    result = check("docker-setup", cwd=str(tmp_path))
    shim = shimPath()
    if not os.path.exists(shim):
        assert result.returncode == 1
        assert "the Docker shim is not built" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"userland-proxy-path": shim}


def test_dockerSetupWithoutShim(monkeypatch) -> None:
    """
    Without a built shim, docker-setup prints nothing on standard output,
    says why on standard error, and returns 1.
    """
    import io

    from twistedproxy import __main__, control

    monkeypatch.setattr(
        control, "shimPath", lambda: "/nonexistent/portproxy-docker-proxy"
    )
    out, err = io.StringIO(), io.StringIO()
    assert __main__.dockerSetup(out, err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith(
        "/nonexistent/portproxy-docker-proxy: the Docker shim is not built"
    )


def test_summaryNamesTheControlSocket() -> None:
    """
    A map with a control section says where its socket is at the end of
    the summary line.
    """
    from twistedproxy.__main__ import summarize
    from twistedproxy.config import parseMap

    assert summarize(parseMap("control: {}\n", "map.yaml")) == (
        "map.yaml: OK, 0 mappings, 0 listeners (0 tcp, 0 udp), no manhole,"
        " control socket /run/portproxy/control.sock"
    )
