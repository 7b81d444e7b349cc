"""
End-to-end tests of the Docker shim against a real twistd, on both paths
(the C{proxy} fixture): the shim started exactly as dockerd starts its
userland proxy (report pipe on descriptor 3, a bound socket on descriptor
4 with C{-use-listen-fd}), real loopback sockets, and the lease (stop,
kill, daemon restart, reload).
"""

import shutil
import signal
import socket
import subprocess
import tempfile

import pytest
from support import (
    SHIM,
    ProxyProcess,
    Shim,
    TCPEchoServer,
    UDPEchoServer,
    exchange,
    freePort,
    portFree,
    waitUntil,
)

pytestmark = pytest.mark.skipif(
    not SHIM.exists(), reason=f"the Docker shim is not built ({SHIM}): no C compiler?"
)


@pytest.fixture
def control():
    """
    A control socket path short enough for a unix socket address.
    """
    directory = tempfile.mkdtemp(prefix="pp-")
    yield f"{directory}/control.sock"
    shutil.rmtree(directory, ignore_errors=True)


def controlMap(control, *mappings):
    return "mappings:\n" + "".join(mappings) + f"control:\n  socket: {control}\n"


def udpRoundTrip(port, payload=b"ping", timeout=5.0):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recvfrom(65535)[0]


def test_shimPublishesTCPAndUDPUntilStopped(proxy, control):
    """
    A shim reports 0 on descriptor 3 once its port forwards, TCP or UDP;
    SIGTERM makes it exit 0 with the port already free again.
    """
    proxy.start(controlMap(control))
    with TCPEchoServer() as tcpEcho, UDPEchoServer() as udpEcho:
        port = freePort("both")
        tcp = Shim(control, "tcp", "127.0.0.1", port, "127.0.0.1", tcpEcho.port)
        udp = Shim(control, "udp", "127.0.0.1", port, "127.0.0.1", udpEcho.port)
        try:
            assert (tcp.report, udp.report) == ("0\n", "0\n")
            assert exchange(port, b"hello") == b"hello"
            assert udpRoundTrip(port) == b"ping"
            proxy.waitFor(
                rf"tcp @tcp-127.0.0.1:{port} 127.0.0.1:\d+ -> 127.0.0.1:{tcpEcho.port} "
            )
        finally:
            assert tcp.stop() == 0
            assert udp.stop() == 0
        assert portFree(port, "tcp") and portFree(port, "udp")
        proxy.waitFor(
            rf"tcp 127.0.0.1:{port} -> 127.0.0.1:{tcpEcho.port} \[@tcp-127.0.0.1:{port}\] \(unpublished\)"
        )


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_shimPassesTheListeningSocket(proxy, control, proto):
    """
    With -use-listen-fd the socket dockerd bound (descriptor 4) goes to
    the daemon, which serves on it without binding one of its own.
    """
    proxy.start(controlMap(control))
    echo = TCPEchoServer() if proto == "tcp" else UDPEchoServer()
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    bound = socket.socket(socket.AF_INET, kind)
    bound.bind(("127.0.0.1", 0))
    if proto == "tcp":
        bound.listen(128)
    port = bound.getsockname()[1]
    with echo:
        shim = Shim(control, proto, "127.0.0.1", port, "127.0.0.1", echo.port, bound)
        bound.close()
        try:
            assert shim.report == "0\n"
            if proto == "tcp":
                assert exchange(port, b"through fd 4") == b"through fd 4"
            else:
                assert udpRoundTrip(port, b"through fd 4") == b"through fd 4"
        finally:
            assert shim.stop() == 0


def test_shimReportsWhyItCannotPublish(proxy, control):
    """
    A port in use, an overlap with the map and an unsupported protocol
    each give 1 and a sentence on descriptor 3, and exit status 1.
    """
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken = busy.getsockname()[1]
    mapped = freePort()
    proxy.start(
        controlMap(
            control,
            f"  - name: web\n    listen: 127.0.0.1:{mapped}\n    target: 127.0.0.1:9\n",
        )
    )
    try:
        inUse = Shim(control, "tcp", "127.0.0.1", taken, "127.0.0.1", 80)
        overlap = Shim(control, "tcp", "0.0.0.0", mapped, "127.0.0.1", 80)
        sctp = Shim(control, "sctp", "127.0.0.1", taken, "127.0.0.1", 80)
    finally:
        busy.close()
    assert inUse.report == (
        f"1\ncannot listen on tcp 127.0.0.1:{taken} for mapping"
        f" '@tcp-127.0.0.1:{taken}': address already in use"
    )
    assert overlap.report == (
        f"1\ncannot listen on tcp 0.0.0.0:{mapped} for mapping '@tcp-0.0.0.0:{mapped}':"
        f" it overlaps tcp 127.0.0.1:{mapped} of mapping 'web' ({proxy.mapPath}:2)"
    )
    assert (
        sctp.report
        == "1\nprotocol 'sctp' is not supported by portproxy (only tcp and udp)"
    )
    assert [s.process.wait(10) for s in (inUse, overlap, sctp)] == [1, 1, 1]


def test_shimWithoutDaemon(control):
    """
    Without a daemon on the control socket the shim reports 1 and says
    where it looked, at once.
    """
    shim = Shim(control, "tcp", "127.0.0.1", freePort(), "127.0.0.1", 80)
    assert shim.report == (
        f"1\ncannot reach the portproxy daemon at {control}: No such file or directory"
        " (is portproxy running, with a control: section in its map?)"
    )
    assert shim.process.wait(10) == 1


def test_shimCommandLine():
    """
    The shim takes Go flag syntax as docker-proxy does (-flag=value,
    --flag), prints a version for -v, and refuses unknown flags with
    status 2.
    """
    version = subprocess.run([str(SHIM), "--version"], capture_output=True, text=True)
    assert version.returncode == 0
    assert version.stdout.startswith("portproxy-docker-proxy (portproxy ")
    bad = subprocess.run(
        [str(SHIM), "--proto=tcp", "-nonsense"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert (
        bad.stderr
        == "portproxy-docker-proxy: flag provided but not defined: -nonsense\n"
    )
    missing = subprocess.run([str(SHIM), "-host-port"], capture_output=True, text=True)
    assert (
        missing.stderr == "portproxy-docker-proxy: flag needs an argument: -host-port\n"
    )


def test_killedShimEndsItsLease(proxy, control):
    """
    A shim killed outright (no chance to unpublish) still frees its port:
    its connection was the lease.
    """
    proxy.start(controlMap(control))
    port = freePort()
    shim = Shim(control, "tcp", "127.0.0.1", port, "127.0.0.1", 9)
    assert shim.ok
    assert not portFree(port)
    assert shim.stop(signal.SIGKILL) == -signal.SIGKILL
    waitUntil(lambda: portFree(port), what="port freed")


def test_shimsRepublishAfterDaemonRestart(proxy, control, tmp_path):
    """
    When the daemon stops and starts again, its shims publish their ports
    again within two seconds, those given a socket on descriptor 4 too.
    """
    proxy.start(controlMap(control))
    with TCPEchoServer() as echo:
        port = freePort()
        plain = Shim(control, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port)
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
        bound.listen(128)
        passedPort = bound.getsockname()[1]
        passed = Shim(
            control, "tcp", "127.0.0.1", passedPort, "127.0.0.1", echo.port, bound
        )
        bound.close()
        try:
            assert plain.ok and passed.ok
            proxy.stop()
            again = ProxyProcess(tmp_path / "again", fastPath=proxy.fastPath)
            again.workdir.mkdir()
            try:
                again.start(controlMap(control))
                started = again.output().count("\n")
                again.waitFor(rf"\[@tcp-127.0.0.1:{port}\] \(published\)", timeout=2.5)
                again.waitFor(
                    rf"\[@tcp-127.0.0.1:{passedPort}\] \(published\)", timeout=2.5
                )
                assert started > 0
                assert exchange(port, b"back") == b"back"
                assert exchange(passedPort, b"kept") == b"kept"
            finally:
                assert plain.stop() == 0
                assert passed.stop() == 0
                again.stop()
        finally:
            for shim in (plain, passed):
                if shim.process.poll() is None:
                    shim.stop(signal.SIGKILL)


def test_reloadLeavesPublishedMappingsAlone(proxy, control):
    """
    SIGHUP with a changed map keeps a published mapping serving, and a
    map listener added over it is refused, failed in the summary.
    """
    first = freePort()
    proxy.start(
        controlMap(
            control,
            f"  - name: a\n    listen: 127.0.0.1:{first}\n    target: 127.0.0.1:9\n",
        )
    )
    with TCPEchoServer() as echo:
        port = freePort()
        shim = Shim(control, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port)
        try:
            assert shim.ok
            summary = proxy.reload(
                controlMap(
                    control,
                    f"  - name: b\n    listen: 0.0.0.0:{port}\n    target: 127.0.0.1:9\n",
                )
            )
            assert summary == (
                f"reload of {proxy.mapPath}: added 0, removed 1, changed 0, unchanged 0,"
                f" failed 1 ({proxy.mapPath}:2: cannot listen on tcp 0.0.0.0:{port} for"
                f" mapping 'b': it overlaps tcp 127.0.0.1:{port}, published through the"
                f" control socket as '@tcp-127.0.0.1:{port}')"
            )
            assert exchange(port, b"still") == b"still"
        finally:
            assert shim.stop() == 0
