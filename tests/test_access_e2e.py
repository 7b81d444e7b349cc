"""
End-to-end tests of who may connect, through a real twistd on both paths:
allow and deny lists (TCP reset, UDP dropped), the per-client limits (TCP
closed cleanly, UDP dropped) with clients on several loopback addresses, reload, and the bounded log of
refusals.  Loopback is 127.0.0.0/8 on Linux, so a client bound to
127.0.0.2 is another client address than one bound to 127.0.0.3.
"""

from __future__ import annotations

import re
import socket
import time

from support import (
    TCPEchoServer,
    UDPEchoServer,
    freePort,
    freeRange,
    roundTrip,
    turnedAway,
    udpSocket,
    waitUntil,
)


def tcpMap(port, target, extra="", proto="tcp"):
    return (
        "mappings:\n"
        f"  - name: guarded\n    proto: {proto}\n    listen: 127.0.0.1:{port}\n"
        f"    target: 127.0.0.1:{target}\n{extra}"
    )


def connectFrom(source, port) -> socket.socket:
    conn = socket.socket()
    conn.settimeout(5)
    conn.bind((source, 0))
    conn.connect(("127.0.0.1", port))
    return conn


def served(source, port) -> bool:
    """
    Whether a client at C{source} gets an echo through the proxy.
    """
    with connectFrom(source, port) as conn:
        return roundTrip(conn, b"hello") == b"hello"


def resetAtOnce(source, port) -> bool:
    """
    Whether a connection from C{source} is reset by the proxy, within a
    second, without being served (an end of stream is not a reset).
    """
    return turnedAway(port, source, seconds=1) == "reset"


def echoes(s, port, count=1, payload=b"ping") -> int:
    """
    Send C{count} datagrams from C{s} and count the echoes that come back.
    """
    for i in range(count):
        s.sendto(payload + b"%d" % i, ("127.0.0.1", port))
    got = 0
    try:
        while True:
            s.recvfrom(100)
            got += 1
    except TimeoutError:
        return got


def test_tcpDenyAndAllow(proxy):
    """
    A TCP client in deny (or outside allow) is reset at once and logged with
    the rule; a client the lists let in is served.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            tcpMap(
                port, echo.port, "    allow: [127.0.0.0/30]\n    deny: [127.0.0.2/32]\n"
            )
        )
        assert resetAtOnce("127.0.0.2", port)
        proxy.waitFor(r"tcp guarded rejected 127\.0\.0\.2:\d+: deny list")
        assert resetAtOnce("127.0.0.5", port)
        proxy.waitFor(
            r"tcp guarded rejected 127\.0\.0\.5:\d+: allow list does not include it"
        )
        assert served("127.0.0.3", port)
        assert echo.accepted == 1


def test_udpDenyDropsAndCounts(proxy):
    """
    A denied UDP client's datagrams are dropped and each counted (the log
    says so once); another client's are forwarded.
    """
    with UDPEchoServer() as echo:
        port = freePort("udp")
        proxy.start(tcpMap(port, echo.port, "    deny: [127.0.0.2/32]\n", proto="udp"))
        with (
            udpSocket("127.0.0.2", 0.5) as denied,
            udpSocket("127.0.0.3", 0.5) as other,
        ):
            assert echoes(denied, port, 3) == 0
            assert echoes(other, port, 2) == 2
        proxy.waitFor(r"udp guarded rejected 127\.0\.0\.2:\d+: deny list")
        assert all(source[0] == "127.0.0.1" for source in echo.sources)
        assert len(echo.sources) == 2


def test_tcpMaxConnectionsPerClient(proxy):
    """
    A client with max_connections_per_client open is closed cleanly (end of
    stream, not a reset); another client is served meanwhile, and the first
    gets in again once one closes.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(tcpMap(port, echo.port, "    max_connections_per_client: 2\n"))
        first, second = connectFrom("127.0.0.2", port), connectFrom("127.0.0.2", port)
        for conn in (first, second):
            assert roundTrip(conn, b"in") == b"in"
        assert turnedAway(port, "127.0.0.2") == "end of stream"
        proxy.waitFor(
            r"rejected 127\.0\.0\.2:\d+: max_connections_per_client 2 reached"
        )
        assert served("127.0.0.3", port)
        first.close()
        proxy.waitFor(r"tcp guarded 127\.0\.0\.2:\d+ .* client closed")
        assert served("127.0.0.2", port)
        second.close()


def test_tcpNewConnectionsPerClient(proxy):
    """
    A client over new_connections_per_client (burst 2, then 1 each 100 s)
    is closed cleanly (end of stream, not a reset); another client is
    untouched.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            tcpMap(
                port,
                echo.port,
                "    new_connections_per_client: {rate: 0.01/s, burst: 2}\n",
            )
        )
        assert served("127.0.0.2", port)
        assert served("127.0.0.2", port)
        assert turnedAway(port, "127.0.0.2") == "end of stream"
        proxy.waitFor(r"rejected 127\.0\.0\.2:\d+: new_connections_per_client 0\.01/s")
        assert served("127.0.0.3", port)


def test_udpSessionsAndDatagramsPerClient(proxy):
    """
    UDP: max_connections_per_client bounds one client's sessions (one per
    source port) and datagrams_per_client the datagrams of a session; other
    clients are untouched.
    """
    with UDPEchoServer() as echo:
        port = freePort("udp")
        proxy.start(
            tcpMap(
                port,
                echo.port,
                "    max_connections_per_client: 1\n"
                "    datagrams_per_client: {rate: 0.01/s, burst: 3}\n",
                proto="udp",
            )
        )
        with (
            udpSocket("127.0.0.2", 0.5) as a,
            udpSocket("127.0.0.2", 0.5) as a2,
            udpSocket("127.0.0.3", 0.5) as b,
        ):
            assert echoes(a, port, 10) == 3
            assert echoes(a2, port, 1) == 0
            assert echoes(b, port, 2) == 2
        proxy.waitFor(
            r"rejected 127\.0\.0\.2:\d+: max_connections_per_client 1 reached"
        )


def test_reloadChangesListsForNewConnectionsOnly(proxy):
    """
    A reload that denies a client leaves its open connection relaying and
    resets its new ones; a reload that lifts the deny lets it in again.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(tcpMap(port, echo.port))
        with connectFrom("127.0.0.2", port) as open_:
            assert roundTrip(open_, b"before") == b"before"
            summary = proxy.reload(
                tcpMap(port, echo.port, "    deny: [127.0.0.2/32]\n")
            )
            assert "changed 1" in summary
            assert roundTrip(open_, b"after") == b"after"
            assert resetAtOnce("127.0.0.2", port)
            assert served("127.0.0.3", port)
            proxy.reload(tcpMap(port, echo.port))
            assert served("127.0.0.2", port)
            assert roundTrip(open_, b"still") == b"still"


def test_portScanLogsBoundedLines(proxy):
    """
    A scan of 300 denied ports refuses every connect with a reset but
    writes a bounded number of refusal lines, then how many more there
    were.
    """
    first = freeRange(300)
    proxy.start(
        "defaults:\n  deny: [127.0.0.2/32]\n"
        f"mappings:\n  - name: scanned\n    listen: 127.0.0.1:{first}-{first + 299}\n"
        "    target: 127.0.0.1:9\n"
    )
    started = time.monotonic()
    for p in range(first, first + 300):
        assert resetAtOnce("127.0.0.2", p)
    elapsed = time.monotonic() - started

    def counted():
        text = proxy.output()
        lines = len(re.findall(r"rejected 127\.0\.0\.2", text))
        return lines, lines + sum(
            int(n) for n in re.findall(r"and (\d+) more refused", text)
        )

    waitUntil(
        lambda: counted()[1] >= 300, timeout=5, what="300 refusals logged or counted"
    )
    lines, total = counted()
    assert total == 300
    assert lines <= 10 * (int(elapsed) + 2)


def test_defaultsLimitCountsAcrossMappings(proxy):
    """
    max_connections_per_client set in defaults counts one client over every
    mapping that takes it, while a mapping that sets its own counts apart.
    """
    with TCPEchoServer() as echo:
        a, b, own = freePort(), freePort(), freePort()
        proxy.start(
            "defaults:\n  max_connections_per_client: 1\nmappings:\n"
            f"  - {{name: a, listen: '127.0.0.1:{a}', target: '127.0.0.1:{echo.port}'}}\n"
            f"  - {{name: b, listen: '127.0.0.1:{b}', target: '127.0.0.1:{echo.port}'}}\n"
            f"  - {{name: own, listen: '127.0.0.1:{own}', target: '127.0.0.1:{echo.port}',"
            " max_connections_per_client: 1}\n"
        )
        with connectFrom("127.0.0.2", a) as held:
            assert roundTrip(held, b"held") == b"held"
            assert turnedAway(b, "127.0.0.2") == "end of stream"
            proxy.waitFor(
                r"tcp b rejected 127\.0\.0\.2:\d+: max_connections_per_client 1"
            )
            assert served("127.0.0.2", own)
            assert served("127.0.0.3", b)
