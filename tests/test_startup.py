"""
End-to-end tests of how portproxy starts and stops: the installed plugin,
start-up failures, daemon mode with SIGHUP and SIGTERM, and the .tac file.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest
from support import (
    REPO,
    START_TIMEOUT,
    TWISTD,
    TCPEchoServer,
    exchange,
    freePort,
    proxyEnvironment,
    waitUntil,
)


def run(argv, cwd, env=None, timeout=60):
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env or proxyEnvironment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def simpleMap(*pairs):
    """
    A map with one TCP mapping C{echoN} per C{(listenPort, targetPort)}.
    """
    return "mappings:\n" + "".join(
        f"  - name: echo{n}\n    listen: 127.0.0.1:{listen}\n"
        f"    target: 127.0.0.1:{target}\n"
        for n, (listen, target) in enumerate(pairs)
    )


def test_nonEditableInstallShipsThePlugin(tmp_path):
    """
    A plain, non-editable install of the package ships the dropin, so
    twistd lists portproxy and shows its options.
    """
    site = tmp_path / "site"
    install = run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(REPO),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert (site / "twisted" / "plugins" / "portproxy.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()
    env = dict(os.environ, PYTHONPATH=str(site))
    listing = run([*TWISTD, "--help"], cwd=tmp_path, env=env)
    assert listing.returncode == 0
    assert "portproxy" in listing.stdout
    options = run([*TWISTD, "portproxy", "--help"], cwd=tmp_path, env=env)
    assert "--config=" in options.stdout


def test_sourceDistributionShipsTheEnginesHeaders():
    """
    Every header the C extensions include from the package is listed in
    MANIFEST.in, so a source distribution builds them too: without it,
    pip install from an sdist would quietly install no compiled paths
    (the extensions are optional).
    """
    package = os.path.join(REPO, "twistedproxy")
    included = set()
    for folder, _, names in os.walk(package):
        for name in names:
            if name.endswith(".c"):
                with open(os.path.join(folder, name)) as f:
                    for line in f:
                        if line.startswith('#include "'):
                            included.add(line.split('"')[1])
    assert included, "the extensions include no header of their own"
    with open(os.path.join(REPO, "MANIFEST.in")) as f:
        manifest = f.read().split()
    for header in sorted(included):
        assert f"twistedproxy/{header}" in manifest


def test_configIsRequired(tmp_path):
    """
    twistd portproxy without -c exits non-zero and says the option is
    required.
    """
    result = run([*TWISTD, "-n", "portproxy"], cwd=tmp_path)
    assert result.returncode != 0
    assert "-c/--config MAP.yaml is required" in result.stdout + result.stderr


def test_invalidMapFailsBeforeListening(tmp_path):
    """
    An invalid map makes twistd exit 1 with FILE:LINE lines, and nothing
    is listening.
    """
    port = freePort()
    path = tmp_path / "bad.yaml"
    path.write_text(
        "mappings:\n"
        f"  - listen: 127.0.0.1:{port}\n"
        "    target: 127.0.0.1:70000\n"
        "    tagret: x\n"
    )
    result = run(
        [*TWISTD, "-n", "--pidfile=", "portproxy", "-c", str(path)],
        cwd=tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"{path}:3: ") and lines[1].startswith(f"{path}:4: ")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_portInUseFailsStartNamingTheMapping(proxy):
    """
    A listener that cannot bind (port in use) makes twistd exit non-zero
    with a message naming the mapping, and the other listeners do not stay
    bound.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        free = freePort()
        process = proxy.spawn(
            "mappings:\n"
            f"  - name: ok\n    listen: 127.0.0.1:{free}\n    target: 127.0.0.1:9\n"
            f"  - name: taken\n    listen: 127.0.0.1:{busy}\n    target: 127.0.0.1:9\n"
        )
        assert process.wait(START_TIMEOUT) != 0
    output = proxy.output()
    assert (
        f"cannot listen on tcp 127.0.0.1:{busy} for mapping 'taken': address already in use"
        in output
    )
    # That line only: no traceback of twistd's start-up after it.
    assert "Traceback" not in output and "StartupError" not in output, output
    assert output.count("cannot listen") == 1, output
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", free), timeout=1).close()


@pytest.mark.parametrize(
    "mode", [("--pidfile", "p.pid"), ("-n", "--pidfile=")], ids=["daemon", "foreground"]
)
def test_portInUseReachesTheTerminal(tmp_path, mode):
    """
    Run as a daemon (or in the foreground with --logfile), a listener that
    cannot bind makes twistd exit non-zero and prints the FILE:LINE:
    message naming the mapping on the terminal, first, not only in the
    log file; no pid file is left and nothing stays bound.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        free = freePort()
        path = tmp_path / "map.yaml"
        path.write_text(simpleMap((free, 9), (busy, 9)))
        logfile = tmp_path / "p.log"
        result = run(
            [*TWISTD, *mode, "--logfile", str(logfile), "portproxy", "-c", str(path)],
            cwd=tmp_path,
        )
    line = (
        f"{path}:5: cannot listen on tcp 127.0.0.1:{busy} for mapping 'echo1': "
        "address already in use"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines()[0] == line, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert line in logfile.read_text()
    assert not (tmp_path / "p.pid").exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", free), timeout=1).close()


def test_daemonReloadsOnSighupAndStopsOnSigterm(tmp_path):
    """
    Run as a daemon with a pid file: SIGHUP reloads the map (a new mapping
    starts forwarding) and SIGTERM stops the process.  The log has
    portproxy's line per listener, and not Twisted's per-port lines.
    """
    with TCPEchoServer() as echo:
        first, second = freePort(), freePort()
        path = tmp_path / "map.yaml"
        path.write_text(simpleMap((first, echo.port)))
        pidfile, logfile = tmp_path / "p.pid", tmp_path / "p.log"
        result = run(
            [
                *TWISTD,
                "--pidfile",
                str(pidfile),
                "--logfile",
                str(logfile),
                "portproxy",
                "-c",
                str(path),
            ],
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        pid = int(pidfile.read_text())
        try:
            assert exchange(first, b"ping") == b"ping"
            path.write_text(simpleMap((first, echo.port), (second, echo.port)))
            os.kill(pid, signal.SIGHUP)
            waitUntil(
                lambda: "reload of" in logfile.read_text(),
                what="the reload logged",
                interval=0.05,
            )
            assert (
                "added 1, removed 0, changed 0, unchanged 1, failed 0"
                in logfile.read_text()
            )
            assert exchange(second, b"ping") == b"ping"
        finally:
            os.kill(pid, signal.SIGTERM)
        waitUntil(
            lambda: not pidfile.exists(), what="the daemon stopped", interval=0.05
        )
        log = logfile.read_text()
        assert f"tcp 127.0.0.1:{first} -> 127.0.0.1:{echo.port} [echo0]" in log
        assert "starting on" not in log and " Closed)" not in log, log


def test_tacFileServesTheMap(tmp_path):
    """
    PORTPROXY_CONFIG=map.yaml twistd -ny tac/portproxy.tac serves the same
    map as the plugin.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        path = tmp_path / "map.yaml"
        path.write_text(simpleMap((port, echo.port)))
        env = dict(proxyEnvironment(), PORTPROXY_CONFIG=str(path))
        logfile = tmp_path / "tac.log"
        with open(logfile, "wb") as log:
            process = subprocess.Popen(
                [
                    *TWISTD,
                    "-n",
                    "--pidfile=",
                    "-y",
                    str(REPO / "tac" / "portproxy.tac"),
                ],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:

            def started() -> bool:
                assert process.poll() is None, logfile.read_text()
                return "portproxy started" in logfile.read_text()

            waitUntil(started, START_TIMEOUT, what="portproxy started", interval=0.05)
            assert exchange(port, b"ping") == b"ping"
        finally:
            process.terminate()
            process.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopSignalEndsTheProcessByThatSignal(proxy, signum):
    """
    SIGTERM or SIGINT stops the proxy, which then ends killed by that same
    signal (a shell shows 143 or 130), the status systemd counts as a
    clean stop; the log says it stopped.
    """
    proxy.start(
        f"mappings:\n  - name: a\n    listen: 127.0.0.1:{freePort()}\n"
        "    target: 127.0.0.1:9\n"
    )
    proxy.process.send_signal(signum)
    assert proxy.process.wait(10) == -signum
    assert "Main loop terminated" in proxy.output()
