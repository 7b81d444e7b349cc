"""
End-to-end tests of reload (SPEC section 4) through a real twistd: what
survives, what changes, what stops, and signals in quick succession.
"""

import os
import signal
import socket
import threading
import time

from support import TCPEchoServer, UDPEchoServer, freePort, roundTrip, waitUntil


def mapping(name, listen, target, proto="tcp", extra=""):
    return (
        f"  - name: {name}\n    proto: {proto}\n    listen: {listen}\n"
        f"    target: {target}\n{extra}"
    )


def proxyMap(*mappings):
    return "mappings:\n" + "".join(mappings)


def udpRoundTrip(sock, payload, port):
    sock.sendto(payload, ("127.0.0.1", port))
    data, _ = sock.recvfrom(65535)
    return data


def refused(port, timeout=1.0):
    """
    Whether connecting to C{port} is refused within C{timeout}.
    """

    def attempt() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except ConnectionRefusedError:
            return True
        return False

    return waitUntil(attempt, timeout, what=f"port {port} refusing", interval=0.05)


def test_connectionsAndSessionsSurviveAnAddingReload(proxy):
    """
    A TCP connection and a UDP session opened before a reload that adds a
    mapping keep working after it, and the UDP target still sees the same
    source port.
    """
    with TCPEchoServer() as tcpEcho, UDPEchoServer() as udpEcho:
        tcpPort, udpPort, addedPort = freePort(), freePort("udp"), freePort()
        base = [
            mapping("t", f"127.0.0.1:{tcpPort}", f"127.0.0.1:{tcpEcho.port}"),
            mapping("u", f"127.0.0.1:{udpPort}", f"127.0.0.1:{udpEcho.port}", "udp"),
        ]
        proxy.start(proxyMap(*base))
        conn = socket.create_connection(("127.0.0.1", tcpPort), timeout=5)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(5)
        try:
            assert roundTrip(conn, b"before") == b"before"
            assert udpRoundTrip(udp, b"before", udpPort) == b"before"
            summary = proxy.reload(
                proxyMap(
                    *base,
                    mapping(
                        "new", f"127.0.0.1:{addedPort}", f"127.0.0.1:{tcpEcho.port}"
                    ),
                )
            )
            assert "added 1, removed 0, changed 0, unchanged 2, failed 0" in summary
            assert roundTrip(conn, b"after") == b"after"
            assert udpRoundTrip(udp, b"after", udpPort) == b"after"
            assert len(set(udpEcho.sources)) == 1
            with socket.create_connection(("127.0.0.1", addedPort), timeout=5) as other:
                assert roundTrip(other, b"new") == b"new"
        finally:
            conn.close()
            udp.close()


def test_changedTargetOnlyForNewConnections(proxy):
    """
    After a reload changes a mapping's target, new connections go to the
    new target while a connection opened before stays on the old one.
    """
    with TCPEchoServer() as old, TCPEchoServer() as new:
        port = freePort()
        proxy.start(
            proxyMap(mapping("web", f"127.0.0.1:{port}", f"127.0.0.1:{old.port}"))
        )
        before = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            assert roundTrip(before, b"x") == b"x"
            summary = proxy.reload(
                proxyMap(mapping("web", f"127.0.0.1:{port}", f"127.0.0.1:{new.port}"))
            )
            assert "added 0, removed 0, changed 1, unchanged 0" in summary
            with socket.create_connection(("127.0.0.1", port), timeout=5) as after:
                assert roundTrip(after, b"y") == b"y"
            assert (old.accepted, new.accepted) == (1, 1)
            assert roundTrip(before, b"still old") == b"still old"
            assert old.accepted == 1
        finally:
            before.close()


def test_removedListenerRefusesButConnectionsRunOn(proxy):
    """
    A removed TCP listener refuses new connections within a second while
    its established connection runs on; a removed UDP listener's session is
    closed with an access line.
    """
    with TCPEchoServer() as echo, UDPEchoServer() as udpEcho:
        gone, stays, udpGone = freePort(), freePort(), freePort("udp")
        keep = mapping("keep", f"127.0.0.1:{stays}", f"127.0.0.1:{echo.port}")
        proxy.start(
            proxyMap(
                keep,
                mapping("gone", f"127.0.0.1:{gone}", f"127.0.0.1:{echo.port}"),
                mapping(
                    "ugone", f"127.0.0.1:{udpGone}", f"127.0.0.1:{udpEcho.port}", "udp"
                ),
            )
        )
        conn = socket.create_connection(("127.0.0.1", gone), timeout=5)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(5)
        try:
            assert roundTrip(conn, b"a") == b"a"
            assert udpRoundTrip(udp, b"u", udpGone) == b"u"
            summary = proxy.reload(proxyMap(keep))
            assert "added 0, removed 2, changed 0, unchanged 1, failed 0" in summary
            assert refused(gone, timeout=1.0)
            assert roundTrip(conn, b"still here") == b"still here"
            proxy.waitFor(
                r"udp ugone 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ .*in=1 out=1"
            )
        finally:
            conn.close()
            udp.close()


def test_invalidFileChangesNothing(proxy):
    """
    Reloading an invalid file logs the error with its line, changes
    nothing, and the proxy keeps serving.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        good = proxyMap(mapping("web", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        proxy.start(good)
        summary = proxy.reload(good + "    max_connections: lots\n")
        assert "invalid, nothing changed (1 error)" in summary
        assert f"{proxy.mapPath}:6: " in proxy.output()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert roundTrip(conn, b"ok") == b"ok"


def test_busyPortFailsOnlyItsListener(proxy):
    """
    A reload that adds a listener on a port another process holds reports
    it as failed and still applies its other changes.
    """
    with TCPEchoServer() as echo, socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        first, second = freePort(), freePort()
        proxy.start(
            proxyMap(mapping("a", f"127.0.0.1:{first}", f"127.0.0.1:{echo.port}"))
        )
        summary = proxy.reload(
            proxyMap(
                mapping("a", f"127.0.0.1:{first}", f"127.0.0.1:{echo.port}"),
                mapping("busy", f"127.0.0.1:{busy}", f"127.0.0.1:{echo.port}"),
                mapping("b", f"127.0.0.1:{second}", f"127.0.0.1:{echo.port}"),
            )
        )
        assert "added 1, removed 0, changed 0, unchanged 1, failed 1" in summary
        assert (
            f"tcp 127.0.0.1:{busy} for mapping 'busy': address already in use"
            in summary
        )
        with socket.create_connection(("127.0.0.1", second), timeout=5) as conn:
            assert roundTrip(conn, b"b") == b"b"


def test_signalStormLosesNoEcho(proxy):
    """
    20 SIGHUPs 50 ms apart while 20 clients echo in a loop lose not a single
    echo, and leave one process serving.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        text = proxyMap(mapping("web", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        proxy.start(text)
        stop = threading.Event()
        failures, counts = [], [0] * 20

        def client(n):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    while not stop.is_set():
                        payload = f"{n}:{counts[n]}".encode()
                        assert roundTrip(conn, payload) == payload
                        counts[n] += 1
                for _ in range(3):  # and new connections still work
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                        assert roundTrip(c, b"fresh") == b"fresh"
            except Exception as e:  # reported below, with the client's number
                failures.append((n, repr(e)))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        since = len(proxy.output())
        for _ in range(20):
            os.kill(proxy.pid, signal.SIGHUP)
            time.sleep(0.05)  # paces the SIGHUPs: a storm, not one signal
        proxy.waitFor(r"reload of ", since=since)
        time.sleep(0.5)  # paces the load: the clients go on after the reloads
        stop.set()
        for t in threads:
            t.join(20)
        assert failures == []
        assert all(c > 0 for c in counts)
        assert proxy.process.poll() is None
        reloads = proxy.output()[since:].count("reload of ")
        assert 1 <= reloads <= 20


def bigInvalidMap(base, count):
    """
    C{base} and C{count} valid mappings more, then one invalid one at the
    end: all of it is parsed and checked before the reload is refused.
    """
    lines = ["mappings:", *(m.rstrip("\n") for m in base)]
    for i in range(count):
        host = f"127.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        lines.append(
            f"  - {{name: big{i}, listen: '{host}:{1024 + i % 60000}', target: '10.0.0.1:80'}}"
        )
    lines.append("  - {name: bad, listen: 70000, target: '10.0.0.1:80'}")
    return "\n".join(lines) + "\n"


#: The longest a connect and echo may take while a reload is checked: the
#: target is 100 ms; this bound holds on a loaded 2-core CI machine.  On a
#: machine so busy that connections take long anyway, the bound is twice
#: the longest one before the reload (a reload checked on the reactor
#: thread pauses it for seconds, far beyond either).
RELOAD_PAUSE_BOUND = 0.3


def test_acceptsWhileABigReloadIsChecked(proxy):
    """
    While a reload of a 50,000-mapping map is read, parsed and checked
    (in a thread), new connections are accepted and relayed without a
    pause longer than RELOAD_PAUSE_BOUND; the invalid map is then refused.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        base = [mapping("t", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}")]
        proxy.start(proxyMap(*base))
        proxy.writeMap(bigInvalidMap(base, 50_000))
        latencies = []
        done = threading.Event()

        def client():
            while not done.is_set():
                started = time.monotonic()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    assert roundTrip(conn, b"ping") == b"ping"
                latencies.append((started, time.monotonic() - started))

        thread = threading.Thread(target=client, daemon=True)
        first = time.monotonic()
        thread.start()
        time.sleep(1.5)  # paces the load: latencies before the reload
        since = len(proxy.output())
        hup = time.monotonic()
        os.kill(proxy.pid, signal.SIGHUP)
        summary = proxy.waitFor(r"reload of [^\n]*", timeout=120, since=since).group(0)
        took = time.monotonic() - hup
        done.set()
        thread.join(15)
        before = [
            latency for started, latency in latencies if first + 0.5 <= started < hup
        ]
        during = [
            latency for started, latency in latencies if hup <= started <= hup + took
        ]
        print(
            f"reload refused after {took:.2f}s; {len(during)} connections meanwhile,"
            f" longest {max(during, default=0) * 1000:.0f} ms"
            f" (before the reload: {max(before) * 1000:.0f} ms)"
        )
        assert summary.endswith("invalid, nothing changed (1 error)")
        assert took > 0.5 and len(during) >= 10  # the reload was long enough to measure
        assert max(during) < max(RELOAD_PAUSE_BOUND, 2 * max(before))
