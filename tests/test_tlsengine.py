"""
Unit tests of L{twistedproxy.tcp.tlsengine}: a L{TLSDial}'s life on a memory
reactor, with a fake engine standing for L{twistedproxy.tcp._tlsengine}, and
the C contexts built from the map's PEM bytes.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import sys
import sysconfig
import time

import pytest
from certs import Authority
from support import threadCount, threadsBackTo, unansweringTarget
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from twistedproxy.model import (
    KeyPair,
    Listener,
    ServerTLS,
    Target,
    Timeouts,
    TLSSettings,
)
from twistedproxy.tcp import tlsengine
from twistedproxy.tcp.forwarder import EngineForwarder
from twistedproxy.tcp.listener import TCPListener
from twistedproxy.tls import NameTable, readKeyPair


class FakeEngine:
    """
    Records what L{TLSEngine} asks of the engine; the test queues its
    reports.
    """

    def __init__(self) -> None:
        self.adopted: list[tuple] = []
        self.closed: list[tuple[int, bool]] = []
        self.queued: list[tuple] = []

    def adopt(self, fd, flowId, context, target, connectTimeout, idleTimeout) -> None:
        self.adopted.append((fd, flowId, target, connectTimeout, idleTimeout))

    def close(self, flowId: int, reset: bool) -> bool:
        self.closed.append((flowId, reset))
        return True

    def counters(self, flowId: int):
        return (3, 4)

    def reports(self) -> list[tuple]:
        queued, self.queued = self.queued, []
        return queued

    def fileno(self) -> int:
        return -1

    def stop(self) -> None:
        pass


@pytest.fixture
def pair(tmp_path) -> KeyPair:
    ca = Authority(tmp_path / "pki")
    return readKeyPair(*ca.issue("server", "localhost", ("localhost",)))


class Harness:
    """
    A TLS listener with a fake engine, and a real loopback target to dial
    (the dial itself is L{twistedproxy.tcp.engine.EngineFlow}'s).
    """

    def __init__(self, pair: KeyPair, connect: float = 2.0) -> None:
        self.target = socket.socket()
        self.target.bind(("127.0.0.1", 0))
        self.target.listen(4)
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        listener = Listener(
            mapping="secure",
            proto="tcp",
            host="127.0.0.1",
            port=8443,
            target=Target("127.0.0.1", self.target.getsockname()[1]),
            timeouts=Timeouts(connect=connect, idle=30),
            maxConnections=0,
            tls=TLSSettings(terminate=ServerTLS(default=pair)),
        )
        self.service = TCPListener(listener, self.reactor, backlog=16)
        self.fake = FakeEngine()
        self.engine = tlsengine.TLSEngine(self.reactor, self.fake)
        self.service.tlsEngine = self.engine
        # The TCP engine's forwarder, whose accept path the TLS engine
        # shares; a TLS client never reaches the TCP engine itself.
        self.forwarder = EngineForwarder(self.service, None)

    def accept(self) -> int:
        """
        A client accepted: its descriptor (one end of a socket pair).
        """
        ours, self.peer = socket.socketpair()
        fd = ours.detach()
        self.forwarder.dial(fd, "127.0.0.1:40000")
        return fd

    def report(self, *report) -> None:
        self.fake.queued.append(report)
        self.engine.doRead()

    def close(self) -> None:
        self.target.close()
        self.peer.close()


def _lines(events) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "portproxy"]


def test_engineDialsAfterTheHandshake(pair) -> None:
    """
    The client goes to the engine at once with its target, connect and
    idle timeouts, for the engine to dial itself after the handshake; the
    handshake report gives the subject and stops the connect timer, and
    the end report writes the access line with the engine's reason.
    """
    h = Harness(pair)
    try:
        fd = h.accept()
        [(adoptedFd, flowId, target, connect, idle)] = h.fake.adopted
        assert (adoptedFd, target, connect, idle) == (
            fd,
            ("127.0.0.1", h.target.getsockname()[1]),
            2.0,
            30,
        )
        h.report("handshake", flowId, "localhost", "CN=alice")
        assert h.reactor.getDelayedCalls() == []
        flow = h.engine.flows[flowId]
        assert (flow.peer, flow.serverName) == ("CN=alice", "localhost")
        with capturedLogs() as events:
            h.report("ended", flowId, 0, 0, "connect failed: connection refused")
        assert _lines(events)[0].endswith(
            "in=0 out=0 peer='CN=alice' connect failed: connection refused"
        )
        assert h.engine.flowCount() == 0
    finally:
        h.close()


def test_noHandshakeByConnectTimeout(pair) -> None:
    """
    The reactor runs no timer for a TLS client: the engine keeps
    connect_timeout (it has it from the adopt), and its end report of a
    handshake not done in time gives the access line.
    """
    h = Harness(pair, connect=2.0)
    try:
        h.accept()
        flowId = h.fake.adopted[0][1]
        assert h.fake.adopted[0][3] == 2.0
        assert h.reactor.getDelayedCalls() == []
        with capturedLogs() as events:
            h.report("ended", flowId, 0, 0, "tls: no handshake in 2s")
        assert _lines(events)[0].endswith("in=0 out=0 tls: no handshake in 2s")
        assert h.fake.closed == []
    finally:
        h.close()


def test_failedHandshakeEndsTheFlow(pair) -> None:
    """
    A handshake that fails ends the flow with the engine's reason, and
    leaves no timer behind.
    """
    h = Harness(pair)
    try:
        h.accept()
        flowId = h.fake.adopted[0][1]
        with capturedLogs() as events:
            h.report("ended", flowId, 0, 0, "tls: http request")
        assert _lines(events)[0].endswith("in=0 out=0 tls: http request")
        assert h.reactor.getDelayedCalls() == []
    finally:
        h.close()


def test_killFromTheManhole(pair) -> None:
    """
    Closing a flow (the manhole's kill) resets it in the engine and the
    access line gives the manhole's reason, not the engine's.
    """
    h = Harness(pair)
    try:
        h.accept()
        flowId = h.fake.adopted[0][1]
        h.engine.flows[flowId].close("killed by operator")
        assert h.fake.closed == [(flowId, True)]
        with capturedLogs() as events:
            h.report("ended", flowId, 0, 0, "killed")
        assert _lines(events)[0].endswith("killed by operator")
    finally:
        h.close()


def test_nameTableEntriesInMatchOrder() -> None:
    """
    The engine gets the names in the order NameTable matches them: exact
    names (the first of duplicates), then suffixes, longest first.
    """
    table = NameTable(
        [("*.b.example", 1), ("A.example", 2), ("*.example", 3), ("a.example", 4)]
    )
    assert table.entries() == [
        ("a.example", 2),
        ("*.b.example", 1),
        ("*.example", 3),
    ]


@pytest.mark.skipif(not tlsengine.available(), reason="the TLS engine is not built")
def test_contextRefusesAMismatchedKey(tmp_path) -> None:
    """
    The C context checks that the key is the certificate's, and is built
    once per distinct setting.
    """
    ca = Authority(tmp_path / "pki")
    one = readKeyPair(*ca.issue("one", "one", ("one",)))
    two = readKeyPair(*ca.issue("two", "two", ("two",)))
    settings = ServerTLS(default=one, byName=(("two", two),))
    assert tlsengine.serverContext(settings) is tlsengine.serverContext(settings)
    with pytest.raises(ValueError, match="cannot build the TLS context"):
        tlsengine.Context([(one.certPem, two.keyPem)], [], None, "1.2")


def test_extensionBuiltWhereItCan() -> None:
    """
    On Linux with a C compiler and OpenSSL's headers the TLS engine is
    built, so its tests and the fast path of the TLS end-to-end tests
    cannot be skipped silently in CI.
    """
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if (
        sys.platform.startswith("linux")
        and shutil.which(compiler)
        and os.path.exists("/usr/include/openssl/ssl.h")
    ):
        assert tlsengine.available(), (
            "a C compiler and OpenSSL's headers are here but "
            "twistedproxy.tcp._tlsengine is not built: pip install . (or, in a "
            "source tree, python setup.py build_ext --inplace)"
        )
    else:
        assert not tlsengine.available() or sys.platform.startswith("linux")


def _waitReports(engine, kind: str, count: int) -> list[tuple]:
    """
    The next C{count} reports of C{kind} from the compiled C{engine}
    (within 10 s); none of another kind may come meanwhile.
    """
    got: list[tuple] = []
    deadline = time.monotonic() + 10
    while len(got) < count:
        assert time.monotonic() < deadline, got
        select.select([engine.fileno()], [], [], 0.2)
        for report in engine.reports():
            assert report[0] == kind, report
            got.append(report)
    return got


def _recvExactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, data
        data += chunk
    return data


@pytest.mark.skipif(not tlsengine.available(), reason="the TLS engine is not built")
def test_engineThreadsSpreadFlows(tmp_path) -> None:
    """
    A TLS engine with 3 threads starts them with its first client, gives
    6 clients with consecutive ids two to each thread (flowId mod 3), runs
    every handshake, dials each client's target and relays its own bytes
    both ways, and
    stop() ends them all ("proxy stopped") and joins every thread.
    """
    ca = Authority(tmp_path / "pki")
    pair = readKeyPair(*ca.issue("server", "localhost", ("localhost",)))
    context = tlsengine.Context([(pair.certPem, pair.keyPem)], [], None, "1.2")
    engine = tlsengine.CompiledTLSEngine(threads=3)
    assert engine.threadFlows() == [0, 0, 0]
    before = threadCount()
    server = socket.create_server(("127.0.0.1", 0))
    target = socket.create_server(("127.0.0.1", 0))
    clients, targets = [], []
    try:
        for i in range(6):
            clients.append(socket.create_connection(server.getsockname(), timeout=10))
            accepted, _ = server.accept()
            engine.adopt(
                accepted.detach(), 30 + i, context, target.getsockname(), 5.0, 0.0
            )
        assert engine.threadFlows() == [2, 2, 2]
        assert threadCount() == before + 3
        verify = ssl.create_default_context(cafile=str(ca.path))
        clients = [verify.wrap_socket(c, server_hostname="localhost") for c in clients]
        handshakes = _waitReports(engine, "handshake", 6)
        assert sorted(r[1] for r in handshakes) == list(range(30, 36))
        # The engine dials each client's target once its handshake is done:
        # which target is which client's is learnt from its first bytes.
        for i, client in enumerate(clients):
            client.sendall(b"%d;" % i)
        dialed = {}
        for _ in range(6):
            conn, _ = target.accept()
            conn.settimeout(10)
            first = _recvExactly(conn, 2)
            dialed[int(first[:1])] = conn
        targets = [dialed[i] for i in range(6)]
        for i, (client, target_) in enumerate(zip(clients, targets, strict=True)):
            client.sendall(b"q" * (i + 1))
            target_.sendall(b"a" * (2 * i + 1))
        for i, (client, target_) in enumerate(zip(clients, targets, strict=True)):
            assert _recvExactly(target_, i + 1) == b"q" * (i + 1)
            assert _recvExactly(client, 2 * i + 1) == b"a" * (2 * i + 1)
            assert engine.counters(30 + i) == (i + 3, 2 * i + 1)
        engine.stop()
        ended = _waitReports(engine, "ended", 6)
        assert sorted(r[1:] for r in ended) == [
            (30 + i, i + 3, 2 * i + 1, "proxy stopped") for i in range(6)
        ]
        assert engine.threadFlows() == [0, 0, 0]
        assert threadsBackTo(before)
    finally:
        engine.stop()
        server.close()
        target.close()
        for conn in clients + targets:
            conn.close()


@pytest.mark.skipif(not tlsengine.available(), reason="the TLS engine is not built")
def test_engineThreadsByDefault() -> None:
    """
    By default the TLS engine has one thread per CPU this process may use
    (at most 16), as the TCP engine; threads= outside 0 to 256 is refused.
    """
    engine = tlsengine.CompiledTLSEngine()
    assert len(engine.threadFlows()) == min(len(os.sched_getaffinity(0)), 16)
    assert len(tlsengine.CompiledTLSEngine(threads=256).threadFlows()) == 256
    for bad in (-1, 257):
        with pytest.raises(ValueError):
            tlsengine.CompiledTLSEngine(threads=bad)


@pytest.mark.skipif(not tlsengine.available(), reason="the TLS engine is not built")
def test_engineDialTimesOut(tmp_path) -> None:
    """
    A target that never answers the engine's dial (its accept queue full,
    so its SYNs go unanswered) ends the flow at connectTimeout after the
    adopt: the client gets a close_notify and a FIN, and the end report
    says "connect failed: timed out after 0.5s", as the Python dial does.
    """
    ca = Authority(tmp_path / "pki")
    pair = readKeyPair(*ca.issue("server", "localhost", ("localhost",)))
    context = tlsengine.Context([(pair.certPem, pair.keyPem)], [], None, "1.2")
    engine = tlsengine.CompiledTLSEngine(threads=1)
    server = socket.create_server(("127.0.0.1", 0))
    queued = []
    with unansweringTarget() as target:
        try:
            client = socket.create_connection(server.getsockname(), timeout=10)
            queued.append(client)
            accepted, _ = server.accept()
            began = time.monotonic()
            engine.adopt(accepted.detach(), 7, context, target, 0.5, 0.0)
            verify = ssl.create_default_context(cafile=str(ca.path))
            tlsClient = verify.wrap_socket(client, server_hostname="localhost")
            queued.append(tlsClient)
            assert tlsClient.recv(10) == b""
            waited = time.monotonic() - began
            reports = []
            deadline = time.monotonic() + 10
            while len(reports) < 2:
                assert time.monotonic() < deadline, reports
                select.select([engine.fileno()], [], [], 0.2)
                reports.extend(engine.reports())
            assert reports[0][:2] == ("handshake", 7)
            assert reports[1] == (
                "ended",
                7,
                0,
                0,
                "connect failed: timed out after 0.5s",
            )
            assert 0.4 < waited < 3, waited
        finally:
            engine.stop()
            server.close()
            for conn in queued:
                conn.close()


@pytest.mark.skipif(not tlsengine.available(), reason="the TLS engine is not built")
def test_engineHandshakeDeadline(tmp_path) -> None:
    """
    A client that never sends its ClientHello is closed by the engine at
    connectTimeout after the adopt (checked every 250 ms), with a FIN and
    nothing else, and one end report: "tls: no handshake in 0.5s".
    """
    ca = Authority(tmp_path / "pki")
    pair = readKeyPair(*ca.issue("server", "localhost", ("localhost",)))
    context = tlsengine.Context([(pair.certPem, pair.keyPem)], [], None, "1.2")
    engine = tlsengine.CompiledTLSEngine(threads=1)
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname(), timeout=10)
    try:
        accepted, _ = server.accept()
        began = time.monotonic()
        engine.adopt(accepted.detach(), 9, context, ("127.0.0.1", 9), 0.5, 0.0)
        assert client.recv(10) == b""
        waited = time.monotonic() - began
        assert 0.4 < waited < 3, waited
        assert _waitReports(engine, "ended", 1) == [
            ("ended", 9, 0, 0, "tls: no handshake in 0.5s")
        ]
    finally:
        engine.stop()
        server.close()
        client.close()
