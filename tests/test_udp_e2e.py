"""
End-to-end UDP forwarding: a real twistd running portproxy, real loopback
sockets for the clients and the targets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support import UDPEchoServer, freePort, waitUntil

from twistedproxy.udp import engine as fastudp

ENGINE_LINE = "forwarded by the compiled engine"


@pytest.fixture(autouse=True)
def forwarding(proxy):
    """
    The C{proxy} fixture runs every test with the compiled fast paths and
    without them (C{PORTPROXY_FASTPATH=0}); afterwards the proxy's log must
    say that UDP used the compiled engine exactly when it should have.
    """
    yield
    if proxy.process is not None:
        expected = proxy.fastPath and fastudp.available()
        assert (ENGINE_LINE in proxy.output()) == expected


@pytest.fixture(scope="module")
def staleIcmp(tmp_path_factory) -> str:
    """
    tests/staleicmp.c built: an LD_PRELOAD library that fails the first
    send on each UDP socket connected to port C{$STALE_ICMP_PORT} with
    ECONNREFUSED, as a stale ICMP port-unreachable error does.
    """
    library = tmp_path_factory.mktemp("staleicmp") / "staleicmp.so"
    source = Path(__file__).with_name("staleicmp.c")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
        check=True,
    )
    return str(library)


def udpMap(listen: str, target: str, udpTimeout: str = "90s") -> str:
    return (
        "mappings:\n"
        "  - name: echo\n"
        "    proto: udp\n"
        f'    listen: "{listen}"\n'
        f'    target: "{target}"\n'
        f"    udp_timeout: {udpTimeout}\n"
    )


def client(host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    skt = socket.socket(family, socket.SOCK_DGRAM)
    skt.bind((host, 0))
    skt.settimeout(timeout)
    return skt


def exchange(skt: socket.socket, data: bytes, address, attempts: int = 3):
    """
    Send C{data} until it comes back (loopback may drop under load); the
    reply and where it came from.
    """
    for _attempt in range(attempts):
        skt.sendto(data, address)
        try:
            while True:
                reply, source = skt.recvfrom(70000)
                if reply == data:
                    return reply, source[:2]
        except TimeoutError:
            continue
    raise AssertionError(f"no echo of {data[:20]!r} from {address}")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_echo(proxy, host):
    """
    A datagram sent to a UDP listener reaches the target and its reply
    comes back from the listening address, over IPv4 and IPv6.
    """
    with UDPEchoServer(host) as target:
        port = freePort("udp", host)
        bracketed = f"[{host}]" if ":" in host else host
        proxy.start(udpMap(f"{bracketed}:{port}", f"{bracketed}:{target.port}"))
        with client(host) as c:
            assert exchange(c, b"ping", (host, port)) == (b"ping", (host, port))


def test_largeDatagramBothWays(proxy):
    """
    A 65000-byte datagram crosses the proxy whole to the target and back.
    """
    with UDPEchoServer() as target:
        port = freePort("udp")
        proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{target.port}"))
        big = bytes(range(256)) * 253 + bytes(232)
        assert len(big) == 65000
        with client() as c:
            reply, _ = exchange(c, big, ("127.0.0.1", port))
        assert reply == big


def test_fiftyClients(proxy):
    """
    Fifty clients sending at once each get only their own replies, and the
    target sees fifty distinct sources.
    """
    with UDPEchoServer() as target:
        port = freePort("udp")
        proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{target.port}"))
        clients = [client(timeout=2.0) for _ in range(50)]
        try:
            for round in range(3):
                for i, c in enumerate(clients):
                    c.sendto(b"client %d round %d" % (i, round), ("127.0.0.1", port))
            for i, c in enumerate(clients):
                got = set()
                while len(got) < 3:
                    try:
                        got.add(c.recv(100))
                    except TimeoutError:
                        break
                mine = {b"client %d round %d" % (i, r) for r in range(3)}
                assert got and got <= mine, (i, got)
        finally:
            for c in clients:
                c.close()
        assert len(set(target.sources)) == 50


def test_targetStartsListeningLater(proxy):
    """
    With nothing listening at the target, two datagrams get ICMP errors;
    once the target listens, the third datagram is answered.
    """
    port = freePort("udp")
    targetPort = freePort("udp")
    proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{targetPort}"))
    with client(timeout=0.3) as c:
        for data in (b"one", b"two"):
            c.sendto(data, ("127.0.0.1", port))
            with pytest.raises(socket.timeout):
                c.recv(100)
        with UDPEchoServer(port=targetPort):
            c.settimeout(5.0)
            c.sendto(b"three", ("127.0.0.1", port))
            assert c.recv(100) == b"three"
    assert "Traceback" not in proxy.output()


def test_staleRefusalRetried(proxy, staleIcmp):
    """
    A send to the target that fails with ECONNREFUSED, the error a stale
    ICMP port-unreachable leaves for the next send (injected here: the
    first send of each session socket fails), is made once more: the
    client's first datagram reaches the target once and its reply comes
    back, on the compiled engine and in Python.
    """
    with UDPEchoServer() as echo:
        port = freePort("udp")
        preloaded = os.environ.get("LD_PRELOAD")
        proxy.environment["LD_PRELOAD"] = ":".join(filter(None, [preloaded, staleIcmp]))
        proxy.environment["STALE_ICMP_PORT"] = str(echo.port)
        proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        with client() as c:
            c.sendto(b"first", ("127.0.0.1", port))
            assert c.recv(100) == b"first"
        assert len(echo.sources) == 1


def test_oneSidedFlowKeepsSourcePort(proxy):
    """
    A client that keeps sending to a target that never answers keeps one
    source port at the target; after udp_timeout of silence its session
    ends with an access line, and the next datagram comes from a new port.
    """
    port = freePort("udp")
    with client() as target:
        proxy.start(
            udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{target.getsockname()[1]}", "1s")
        )
        sources = []
        with client() as c:
            for i in range(8):
                c.sendto(b"%d" % i, ("127.0.0.1", port))
                data, source = target.recvfrom(100)
                assert data == b"%d" % i
                sources.append(source)
                time.sleep(0.25)  # paces the datagrams, each within the timeout
            assert len(set(sources)) == 1
            proxy.waitFor(
                r"udp echo 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ .*in=8 out=0 no datagram for 1s",
                timeout=5,
            )
            c.sendto(b"again", ("127.0.0.1", port))
            data, source = target.recvfrom(100)
        assert data == b"again"
        assert source != sources[0]


def test_wildcardAnswersFromAddressUsed(proxy):
    """
    A listener on every interface answers each client from the address
    the client sent to: 127.0.0.2, 127.0.0.1 and ::1.
    """
    port = freePort("udp", "0.0.0.0")
    with UDPEchoServer() as target:
        proxy.start(udpMap(f"{port}", f"127.0.0.1:{target.port}"))
        for address in ("127.0.0.2", "127.0.0.1"):
            with client() as c:
                assert exchange(c, b"hi " + address.encode(), (address, port))[1] == (
                    address,
                    port,
                )
        with client("::1") as c:
            assert exchange(c, b"hi six", ("::1", port))[1] == ("::1", port)


def test_floodDoesNotStarveOthers(proxy):
    """
    While one client floods the listener, another client's datagrams are
    still answered, with its own data only.
    """
    port = freePort("udp")
    with UDPEchoServer() as target:
        proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{target.port}"))
        stop = threading.Event()

        def flood() -> None:
            with client() as f:
                payload = b"f" * 1000
                while not stop.is_set():
                    try:
                        f.sendto(payload, ("127.0.0.1", port))
                    except OSError:
                        pass

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            waitUntil(lambda: len(target.sources) > 100, what="the flood under way")
            answered = 0
            with client(timeout=0.5) as c:
                for i in range(40):
                    try:
                        exchange(c, b"mine %d" % i, ("127.0.0.1", port), attempts=1)
                    except AssertionError:
                        continue
                    answered += 1
                    if answered == 5:
                        break
        finally:
            stop.set()
            flooder.join()
        assert answered == 5


def test_outOfFileDescriptors(proxy):
    """
    When the proxy runs out of file descriptors, a new client's datagram
    is dropped and logged while open sessions keep working; once sessions
    expire, new clients are served again.
    """
    import os
    import resource

    port = freePort("udp")
    with UDPEchoServer() as target:
        proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{target.port}", "1s"))
        # Room for exactly three session sockets.
        opened = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (opened + 3, opened + 3))
        clients = [client(timeout=0.5) for _ in range(4)]
        try:
            for c in clients[:3]:
                assert exchange(c, b"first", ("127.0.0.1", port))[0] == b"first"
            clients[3].sendto(b"no room", ("127.0.0.1", port))
            proxy.waitFor(
                r"dropped a datagram from 127\.0\.0\.1:\d+: cannot open a socket "
                r"to 127\.0\.0\.1:\d+: out of file descriptors"
            )
            with pytest.raises(socket.timeout):
                clients[3].recv(100)
            assert exchange(clients[0], b"still", ("127.0.0.1", port))[0] == b"still"
            proxy.waitFor(
                r"no datagram for 1s(.|\n)*no datagram for 1s(.|\n)*no datagram for 1s"
            )
            assert (
                exchange(clients[3], b"room now", ("127.0.0.1", port))[0] == b"room now"
            )
        finally:
            for c in clients:
                c.close()


def test_reloadChangesNewSessionsOnly(proxy):
    """
    A reload that changes a UDP listener's target sends new clients to the
    new target while an open session stays on the old one; a reload that
    removes the listener closes its sessions.
    """
    port = freePort("udp")
    with UDPEchoServer() as old, UDPEchoServer() as new:
        proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{old.port}"))
        with client() as a, client() as b:
            exchange(a, b"a1", ("127.0.0.1", port))
            assert "changed 1" in proxy.reload(
                udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{new.port}")
            )
            exchange(a, b"a2", ("127.0.0.1", port))
            exchange(b, b"b1", ("127.0.0.1", port))
            assert (len(old.sources), len(new.sources)) == (2, 1)
            assert "removed 1" in proxy.reload("mappings: []\n")
            proxy.waitFor(r"(udp echo [^\n]* listener closed(.|\n)*){2}")


def rcvbufErrors() -> int:
    """
    The system's UDP RcvbufErrors counter (datagrams dropped because a
    socket's receive buffer was full).
    """
    with open("/proc/net/snmp") as f:
        names, values = [line.split() for line in f if line.startswith("Udp:")]
    return int(values[names.index("RcvbufErrors")])


class BurstTarget:
    """
    A UDP target that answers each datagram with C{count} numbered replies
    of C{size} bytes, sent as fast as it can.
    """

    def __init__(self, count: int, size: int) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.replies = [b"%06d" % i + b"r" * (size - 6) for i in range(count)]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                _, source = self.socket.recvfrom(100)
            except OSError:
                return
            for reply in self.replies:
                self.socket.sendto(reply, source)

    def close(self) -> None:
        self.socket.close()


def test_replyBurstArrivesWhole(proxy):
    """
    A target answering one datagram with 2000 replies at once gets all of
    them to the client: the session's socket has a receive buffer sized
    like the listening socket's, where the system default overflowed
    (RcvbufErrors).
    """
    target = BurstTarget(2000, 1000)
    port = freePort("udp")
    proxy.start(udpMap(f"127.0.0.1:{port}", f"127.0.0.1:{target.port}"))
    receiver = client(timeout=1.0)
    receiver.setsockopt(
        socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 16 << 20
    )
    try:
        errorsBefore = rcvbufErrors()
        receiver.sendto(b"go", ("127.0.0.1", port))
        seen = set()
        try:
            while len(seen) < 2000:
                seen.add(receiver.recv(2000)[:6])
        except TimeoutError:
            pass
        errors = rcvbufErrors() - errorsBefore
    finally:
        receiver.close()
        target.close()
    assert len(seen) == 2000, f"{len(seen)} of 2000 replies; RcvbufErrors +{errors}"
