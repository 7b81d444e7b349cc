"""
End-to-end tests of TCP forwarding (SPEC section 3) through a real twistd
and real loopback sockets: both address families, half-close, bulk data,
many connections, failing and silent targets, timeouts, limits, flow
control and running out of file descriptors.
"""

from __future__ import annotations

import hashlib
import os
import resource
import select
import socket
import struct
import threading
import time

import pytest
from support import (
    TCPEchoServer,
    exchange,
    freePort,
    readAll,
    rssKiB,
    threadNames,
    turnedAway,
    unansweringTarget,
    waitUntil,
)

MiB = 1 << 20


def mapping(name, listen, target, extra=""):
    return f'  - name: {name}\n    listen: "{listen}"\n    target: "{target}"\n{extra}'


def proxyMap(*mappings, defaults=""):
    head = f"defaults:\n{defaults}" if defaults else ""
    return head + "mappings:\n" + "".join(mappings)


def connect(port, host="127.0.0.1", timeout=10.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def closedWithin(conn, seconds) -> bool:
    """
    Whether the proxy ends C{conn} (end of stream or reset) within
    C{seconds}, without sending anything.
    """
    conn.settimeout(seconds)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def refusedService(port, seconds) -> bool:
    """
    Whether a new connection to C{port} is ended by the proxy within
    C{seconds} without being served: end of stream or reset, also a reset
    so quick that it beat C{connect()}'s return.
    """
    try:
        conn = connect(port)
    except ConnectionResetError:
        return True
    with conn:
        return closedWithin(conn, seconds)


class AnswerAfterEnd:
    """
    A target that reads a request until end of stream, then answers with
    the request reversed and closes: it only answers if the proxy passes
    the client's half-close on.
    """

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            with conn:
                conn.sendall(readAll(conn)[::-1])

    def close(self):
        self.socket.close()


class SilentTarget:
    """
    A target that accepts connections and never reads from them.
    """

    def __init__(self):
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        for conn in self.accepted:
            conn.close()
        self.socket.close()


def consecutiveFreePorts(count) -> int:
    for _ in range(50):
        first = freePort()
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


def test_echoAcrossFamilies(proxy):
    """
    Bytes go through and back over IPv4, over IPv6, and from an IPv4
    listener to an IPv6 target.
    """
    with TCPEchoServer() as echo4, TCPEchoServer("::1") as echo6:
        p4, p6, pMixed = freePort(), freePort(host="::1"), freePort()
        proxy.start(
            proxyMap(
                mapping("v4", f"127.0.0.1:{p4}", f"127.0.0.1:{echo4.port}"),
                mapping("v6", f"[::1]:{p6}", f"[::1]:{echo6.port}"),
                mapping("mixed", f"127.0.0.1:{pMixed}", f"[::1]:{echo6.port}"),
            )
        )
        assert exchange(p4, b"over ipv4") == b"over ipv4"
        assert exchange(p6, b"over ipv6", host="::1") == b"over ipv6"
        assert exchange(pMixed, b"four to six") == b"four to six"
        assert echo6.accepted == 2
        line = proxy.waitFor(
            r"tcp v6 \[::1\]:\d+ -> \[::1\]:\d+ [\d.]+s in=9 out=9 client closed"
        )
        assert line


def test_halfCloseRequestThenAnswer(proxy):
    """
    A client that sends, half-closes and then reads gets the whole answer
    and end of stream: the half-close reaches the target and the target's
    close reaches the client.
    """
    target = AnswerAfterEnd()
    try:
        port = freePort()
        proxy.start(
            proxyMap(mapping("half", f"127.0.0.1:{port}", f"127.0.0.1:{target.port}"))
        )
        request = os.urandom(300_000)
        assert exchange(port, request) == request[::-1]
        proxy.waitFor(r"tcp half .* in=300000 out=300000 client closed")
    finally:
        target.close()


def test_bulkBothWays(proxy):
    """
    32 MiB each way arrive whole and in order (checksums match) while both
    directions flow at once.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(mapping("bulk", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        )
        payload = os.urandom(32 * MiB)
        with connect(port, timeout=60) as conn:

            def send():
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            answer = readAll(conn)
            sender.join()
        assert len(answer) == len(payload)
        assert hashlib.sha256(answer).digest() == hashlib.sha256(payload).digest()
        proxy.waitFor(rf"tcp bulk .* in={32 * MiB} out={32 * MiB} client closed")


def echoEach(conns):
    """
    Send a line of its own on each of C{conns} to an echo target, all at
    once, then check that each gets its own line back.
    """
    for i, conn in enumerate(conns):
        conn.sendall(b"connection %d\n" % i)
    for i, conn in enumerate(conns):
        expected = b"connection %d\n" % i
        data = b""
        while len(data) < len(expected):
            chunk = conn.recv(100)
            assert chunk
            data += chunk
        assert data == expected


def test_manyConcurrentConnections(proxy):
    """
    200 connections open at once each get their own bytes back.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(mapping("many", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        )
        conns = [connect(port) for _ in range(200)]
        try:
            echoEach(conns)
        finally:
            for conn in conns:
                conn.close()
        assert echo.accepted == 200


def test_targetDown(proxy):
    """
    With nothing listening at the target the client is closed quickly, the
    failure is logged with mapping, client, target and reason, and another
    mapping keeps working.
    """
    with TCPEchoServer() as echo:
        down, up, deadPort = freePort(), freePort(), freePort()
        proxy.start(
            proxyMap(
                mapping("down", f"127.0.0.1:{down}", f"127.0.0.1:{deadPort}"),
                mapping("up", f"127.0.0.1:{up}", f"127.0.0.1:{echo.port}"),
            )
        )
        started = time.monotonic()
        assert refusedService(down, 5)
        assert time.monotonic() - started < 2
        proxy.waitFor(
            rf"tcp down 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{deadPort} .* "
            r"connect failed: connection refused"
        )
        assert exchange(up, b"still here") == b"still here"


@pytest.mark.parametrize("targetHost", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("request_", [b"", b"GET / HTTP/1.0\r\n\r\n" * 100])
def test_refusedTargetEndsClientWithFin(proxy, targetHost, request_):
    """
    A refused target ends the client's connection with a clean end of
    stream (a FIN, as docker-proxy), never a reset: for an address and a
    host-name target, whether or not the client sent data first.
    """
    port, deadPort = freePort(), freePort()
    proxy.start(
        proxyMap(mapping("down", f"127.0.0.1:{port}", f"{targetHost}:{deadPort}"))
    )
    for _ in range(5):
        with connect(port) as conn:
            if request_:
                conn.sendall(request_)
            assert conn.recv(100) == b""
            # The client finishes after reading the end of stream, as
            # redis-cli and curl do; no reset comes then either.
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b""
    proxy.waitFor(r"connect failed: connection refused")


def test_connectTimeout(proxy):
    """
    A target whose accept queue is full never completes the handshake; the
    client is closed after connect_timeout and the reason logged.
    """
    with unansweringTarget() as (_, target):
        port = freePort()
        proxy.start(
            proxyMap(
                mapping("slow", f"127.0.0.1:{port}", f"127.0.0.1:{target}"),
                defaults="  connect_timeout: 1s\n",
            )
        )
        with connect(port) as conn:
            started = time.monotonic()
            assert closedWithin(conn, 10)
            elapsed = time.monotonic() - started
        assert 0.8 < elapsed < 5
        proxy.waitFor(r"tcp slow .* connect failed: timed out after 1s")


def test_idleTimeout(proxy):
    """
    A connection quiet for idle_timeout both ways is closed and logged as
    such; one that keeps talking is not.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(
                mapping("idle", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"),
                defaults="  idle_timeout: 1s\n",
            )
        )
        with connect(port) as quiet, connect(port) as chatty:
            quiet.sendall(b"hi")
            assert quiet.recv(2) == b"hi"
            started = time.monotonic()
            while time.monotonic() - started < 1.8:
                chatty.sendall(b".")
                assert chatty.recv(1) == b"."
                time.sleep(0.2)  # paces the chatty client's traffic
            assert closedWithin(quiet, 3)
            assert time.monotonic() - started >= 1.0
            chatty.sendall(b"!")
            assert chatty.recv(1) == b"!"
        proxy.waitFor(r"tcp idle .* in=2 out=2 idle timeout")


def test_maxConnections(proxy):
    """
    A client over max_connections is closed at once, a clean end of stream
    and not a reset although it sent a byte, and counted as rejected; once
    a connection ends a new client gets through.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(
                mapping(
                    "limited",
                    f"127.0.0.1:{port}",
                    f"127.0.0.1:{echo.port}",
                    "    max_connections: 2\n",
                )
            )
        )
        first, second = connect(port), connect(port)
        for conn in (first, second):
            conn.sendall(b"in")
            assert conn.recv(2) == b"in"
        assert turnedAway(port) == "end of stream"
        proxy.waitFor(
            r"tcp limited rejected 127\.0\.0\.1:\d+: max_connections 2 reached"
        )
        first.close()
        proxy.waitFor(r"tcp limited .* client closed")
        assert exchange(port, b"room again") == b"room again"
        second.close()


def test_targetThatNeverReadsBoundsMemory(proxy):
    """
    A client pushing 64 MiB at a target that reads nothing is stopped by
    flow control: it cannot send it all, and the proxy's resident memory
    grows by less than 8 MiB.
    """
    target = SilentTarget()
    try:
        port = freePort()
        proxy.start(
            proxyMap(mapping("stuck", f"127.0.0.1:{port}", f"127.0.0.1:{target.port}"))
        )
        before = rssKiB(proxy.pid)
        chunk = os.urandom(MiB)
        sent = 0
        with connect(port) as conn:
            conn.setblocking(False)
            while sent < 64 * MiB:
                _, writable, _ = select.select([], [conn], [], 1.0)
                if not writable:
                    break
                try:
                    sent += conn.send(chunk)
                except BlockingIOError:
                    pass
            grown = rssKiB(proxy.pid) - before
        assert sent < 64 * MiB
        assert grown < 8 * 1024, f"proxy RSS grew by {grown} KiB"
    finally:
        target.close()


def test_portRange(proxy):
    """
    A listen range opens one listener per port, each forwarding to the
    single target port.
    """
    with TCPEchoServer() as echo:
        first = consecutiveFreePorts(3)
        proxy.start(
            proxyMap(
                mapping(
                    "range", f"127.0.0.1:{first}-{first + 2}", f"127.0.0.1:{echo.port}"
                )
            )
        )
        for port in range(first, first + 3):
            assert exchange(port, b"port %d" % port) == b"port %d" % port
        assert echo.accepted == 3


def test_runningOutOfFileDescriptors(proxy):
    """
    With the proxy at its file descriptor limit, excess clients are closed
    and the proxy logs why; once descriptors are free again new clients are
    served.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(mapping("fds", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        )
        inUse = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        limit = inUse + 20
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (limit, limit))
        conns = [connect(port) for _ in range(30)]
        try:
            served = 0
            for i, conn in enumerate(conns):
                conn.settimeout(3)
                try:
                    conn.sendall(b"%d" % i)
                    if conn.recv(10) == b"%d" % i:
                        served += 1
                except (TimeoutError, ConnectionResetError, BrokenPipeError):
                    pass
            assert 0 < served < 30
            proxy.waitFor(r"out of file descriptors|too many open files")
        finally:
            for conn in conns:
                conn.close()
        waitUntil(
            lambda: len(os.listdir(f"/proc/{proxy.pid}/fd")) <= inUse + 2,
            what="the proxy's descriptors given back",
            interval=0.05,
        )
        for i in range(5):
            assert exchange(port, b"after %d" % i) == b"after %d" % i


def test_floodOverALimitLeavesDescriptorsForOthers(proxy):
    """
    A flood of clients over one listener's max_connections that never
    close their end each get a clean end of stream, but cannot hold a
    descriptor each while they linger: another listener of the same
    proxy, near its descriptor limit, still serves its clients.
    """
    with TCPEchoServer() as echo:
        full, other = freePort(), freePort()
        proxy.start(
            proxyMap(
                mapping(
                    "full",
                    f"127.0.0.1:{full}",
                    f"127.0.0.1:{echo.port}",
                    "    max_connections: 1\n",
                ),
                mapping("other", f"127.0.0.1:{other}", f"127.0.0.1:{echo.port}"),
            )
        )
        inUse = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        limit = inUse + 200
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (limit, limit))
        holder = connect(full)
        flood = []
        try:
            holder.sendall(b"hold")
            assert holder.recv(4) == b"hold"
            for _ in range(400):
                conn = connect(full)
                flood.append(conn)
                conn.settimeout(5)
                assert conn.recv(1) == b""
            for i in range(5):
                assert exchange(other, b"still %d" % i) == b"still %d" % i
            assert len(os.listdir(f"/proc/{proxy.pid}/fd")) < limit - 20
        finally:
            for conn in [holder, *flood]:
                conn.close()


def test_outOfDescriptorsLogsAtABoundedRate(proxy):
    """
    With the proxy out of file descriptors, a flood of clients that it
    sheds at accept logs at most one line per second for the listener,
    saying how many more were shed, instead of Twisted's three lines per
    client.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(mapping("fds", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        )
        inUse = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (inUse + 10, inUse + 10))
        since = len(proxy.output())
        started = time.monotonic()
        conns = []
        try:
            for _ in range(300):
                conns.append(connect(port))
            proxy.waitFor(r"out of file descriptors; closed client", since=since)
            # lets the log's one-second window pass: time, not a condition
            time.sleep(1.1)
            # The next shed client's line counts those left out meanwhile.
            for _ in range(5):
                conns.append(connect(port))
            proxy.waitFor(
                r"closed client \S+ at once \(and \d+ more not logged\)", since=since
            )
            elapsed = time.monotonic() - started
            log = proxy.output()[since:]
        finally:
            for conn in conns:
                conn.close()
    assert "EMFILE" not in log, log
    notices = [line for line in log.splitlines() if "out of file descriptors" in line]
    assert 2 <= len(notices) <= elapsed + 1, notices


def test_stoppingTheProxyLogsOpenConnections(proxy):
    """
    Connections open when the proxy stops still get their access line,
    saying the proxy stopped.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(mapping("open", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        )
        with connect(port) as conn:
            conn.sendall(b"hello")
            assert conn.recv(5) == b"hello"
            proxy.stop()
        assert "tcp open 127.0.0.1:" in proxy.output()
        assert "in=5 out=5 proxy stopped" in proxy.output()


def test_misbehavingClientsAffectOnlyThemselves(proxy):
    """
    A client that never reads its answers and a client that resets leave
    other connections through the same listener working; the reset is
    logged as such.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(mapping("shared", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        )
        stuck = connect(port)
        stuck.setblocking(False)
        pushed = 0
        chunk = os.urandom(MiB)
        while select.select([], [stuck], [], 0.5)[1]:
            try:
                pushed += stuck.send(chunk)
            except BlockingIOError:
                pass
        resetter = connect(port)
        resetter.sendall(b"half a request")
        resetter.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        resetter.close()
        try:
            assert exchange(port, b"unaffected") == b"unaffected"
            proxy.waitFor(r"tcp shared .* reset by client")
        finally:
            stuck.close()


def test_engineThreadsFromTheEnvironment(proxy, monkeypatch):
    """
    PORTPROXY_ENGINE_THREADS=3 in twistd's environment gives the TCP
    engine 3 relay threads, and 30 connections spread over them each get
    their own bytes back (the Python path, which has no engine, relays the
    same).
    """
    from twistedproxy.tcp import engine

    monkeypatch.setenv("PORTPROXY_ENGINE_THREADS", "3")
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            proxyMap(mapping("threads", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        )
        conns = [connect(port) for _ in range(30)]
        try:
            echoEach(conns)
            wanted = ["tcprelay0", "tcprelay1", "tcprelay2"]
            if not (proxy.fastPath and engine.available()):
                wanted = []
            deadline = time.monotonic() + 10
            while threadNames(proxy.pid, "tcprelay") != wanted:
                assert time.monotonic() < deadline, threadNames(proxy.pid, "tcprelay")
                time.sleep(0.05)
        finally:
            for conn in conns:
                conn.close()
