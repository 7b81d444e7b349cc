"""
Tests for the batch path of the TCP engine's forwarder with Twisted fakes:
L{EngineForwarder.dialBatch} (admission, flows, one dial of the engine
per batch), L{TCPEngine.dialFlows} (what each result means) and the end
of a batch of flows (L{ListenerService.flowsEnded},
L{AccessLog.writeMany}).  The compiled engine is a fake; each client is
one end of a real loopback connection, whose other end the test reads.
"""

from __future__ import annotations

import socket

import pytest
from fakes import messages, tcpListener
from twisted.internet.testing import MemoryReactorClock

from twistedproxy.listener import AccessLog
from twistedproxy.model import (
    PROXY_PROTOCOL_V1,
    TRANSPARENT,
    AccessPolicy,
    ClientIdentity,
    Target,
    Timeouts,
)
from twistedproxy.tcp.engine import EngineFlow, TCPEngine
from twistedproxy.tcp.forwarder import EngineForwarder
from twistedproxy.tcp.listener import TCPListener

TARGET = Target("127.0.0.1", 9000)


class FakeCompiledEngine:
    """
    What L{TCPEngine} uses of the compiled engine: C{dial} answers each
    client with the next of C{results} (0 when none is left), and records
    its calls and the access of each flow it adopts; C{reports} returns
    what the test queued, and C{finished} too, the flows with an access
    written up as the compiled engine does.
    """

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.results: list = []
        self.queued: list[tuple] = []
        self.closed: list[int] = []
        self.access: dict[int, tuple] = {}

    def dial(
        self,
        clientFds,
        flowIds,
        host,
        port,
        idleTimeout,
        headers=None,
        access=None,
        clients=None,
        started=0.0,
    ):
        self.calls.append(
            (list(clientFds), list(flowIds), host, port, idleTimeout, headers)
        )
        results = [self.results.pop(0) if self.results else 0 for _ in clientFds]
        for k, result in enumerate(results):
            if result == 0 and access is not None:
                self.access[flowIds[k]] = (access, clients[k], started)
        return results

    def reports(self):
        queued, self.queued = self.queued, []
        return queued

    def finished(self, now):
        plain: list[tuple] = []
        groups: list[list] = []
        for flowId, bytesIn, bytesOut, reason in self.reports():
            if flowId not in self.access:
                plain.append((flowId, bytesIn, bytesOut, reason))
                continue
            access, client, started = self.access.pop(flowId)
            if not groups or groups[-1][0] is not access:
                groups.append([access, [], [], [], [], 0, 0])
            group = groups[-1]
            duration = now - started
            group[1].append(flowId)
            group[2].append(
                f"{access[2]}{client}{access[3]}{duration:.3f}s"
                f" in={bytesIn} out={bytesOut} {reason}"
            )
            group[3].append(
                (flowId, access[1], client, duration, bytesIn, bytesOut, None, reason)
            )
            group[4].append(duration)
            group[5] += bytesIn
            group[6] += bytesOut
        return plain, [
            (g[0][0], g[1], "\n".join(g[2]), g[3], g[4], g[5], g[6]) for g in groups
        ]

    def counters(self, flowId):
        return None

    def close(self, flowId):
        self.closed.append(flowId)
        return True

    def fileno(self) -> int:
        return -1

    def stop(self) -> None:
        pass


class Batch:
    """
    A listener whose forwarder is the engine's, on a memory reactor, and
    clients to give it.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("target", TARGET)
        kwargs.setdefault("timeouts", Timeouts(connect=2, idle=30))
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.service = TCPListener(tcpListener(**kwargs), self.reactor, backlog=16)
        self.fake = FakeCompiledEngine()
        self.engine = TCPEngine(self.reactor, self.fake)
        self.forwarder = EngineForwarder(self.service, self.engine)
        self.peers: list[socket.socket] = []

    def clients(self, *addresses: str) -> list[tuple[int, str]]:
        """
        Accepted clients with these C{host:port}: each a descriptor whose
        peer the test keeps.
        """
        accepted = []
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(len(addresses))
            for address in addresses:
                peer = socket.create_connection(server.getsockname())
                peer.settimeout(5)
                self.peers.append(peer)
                ours, _ = server.accept()
                ours.setblocking(False)
                accepted.append((ours.detach(), address))
        return accepted

    def report(self, *reports: tuple) -> None:
        self.fake.queued.extend(reports)
        self.engine.doRead()

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


@pytest.fixture
def batch():
    made: list[Batch] = []

    def make(**kwargs) -> Batch:
        b = Batch(**kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_oneDialForTheWholeBatch(batch) -> None:
    """
    Admitted clients become started flows, and the engine is asked to
    dial all of them in one call, with the flows' ids and the target.
    """
    b = batch()
    clients = b.clients("127.0.0.1:40001", "127.0.0.1:40002", "[::1]:40003")
    b.forwarder.dialBatch(clients)
    ((fds, ids, host, port, idle, headers),) = b.fake.calls
    assert fds == [fd for fd, _ in clients]
    assert ids == sorted(b.service.flows)
    assert (host, port, idle, headers) == ("127.0.0.1", 9000, 30, None)
    assert [f.client for f in b.service.flows.values()] == [c for _, c in clients]
    assert all(type(f) is EngineFlow for f in b.service.flows.values())
    assert b.service.counters.total == 3
    assert b.engine.flowCount() == 3


def test_endsOfABatchWriteTheUsualLines(batch, logged) -> None:
    """
    The flows a report ends are forgotten, counted and timed, and each
    gets the access line a flow ended alone gets; the manhole's reason
    wins over the engine's C{killed}.
    """
    b = batch()
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001", "127.0.0.1:40002"))
    first, second = sorted(b.service.flows)
    b.service.flows[second].close("killed from the manhole")
    assert b.fake.closed == [second]
    b.reactor.advance(0.25)
    b.report((first, 10, 20, "client closed"), (second, 3, 4, "killed"))
    assert b.service.flows == {}
    assert (b.service.counters.bytesIn, b.service.counters.bytesOut) == (13, 24)
    assert sum(b.service.durations.counts) == 2
    assert "\n".join(messages(logged)).split("\n") == [
        "tcp web 127.0.0.1:40001 -> 127.0.0.1:9000 0.250s in=10 out=20 client closed",
        "tcp web 127.0.0.1:40002 -> 127.0.0.1:9000 0.250s in=3 out=4"
        " killed from the manhole",
    ]
    # A second report of the same flow changes nothing.
    b.report((first, 10, 20, "client closed"))
    assert b.service.counters.bytesIn == 13


def test_maxConnectionsAdmitsTheFirst(batch, logged) -> None:
    """
    With C{max_connections}, the first clients of a batch that fit are
    dialed and the others closed cleanly (a FIN, as SPEC says of a client
    over a limit), counted as refused by a limit and logged with the rule.
    """
    b = batch(maxConnections=2)
    b.forwarder.dialBatch(b.clients(*(f"127.0.0.1:{4000 + i}" for i in range(3))))
    ((fds, _ids, *_),) = b.fake.calls
    assert len(fds) == 2
    assert b.service.counters.rejectedBy == {"limit": 1}
    assert any(
        "rejected 127.0.0.1:4002: max_connections 2 reached" in line
        for line in messages(logged)
    ), messages(logged)
    assert b.peers[2].recv(1) == b""


def test_denyListAsksForEachClient(batch) -> None:
    """
    A rule that reads the client's address is asked for each client: a
    denied one is reset, the others are dialed together.
    """
    b = batch(access=AccessPolicy(deny=("127.0.0.2/32",)))
    b.forwarder.dialBatch(
        b.clients("127.0.0.1:40001", "127.0.0.2:40002", "127.0.0.3:40003")
    )
    assert [c for c in (f.client for f in b.service.flows.values())] == [
        "127.0.0.1:40001",
        "127.0.0.3:40003",
    ]
    assert b.service.counters.rejectedBy == {"denied": 1}
    with pytest.raises(ConnectionResetError):
        b.peers[1].recv(1)


def test_perClientLimitCountsEarlierClientsOfTheBatch(batch) -> None:
    """
    C{max_connections_per_client} counts the clients of the same batch
    admitted before.
    """
    b = batch(access=AccessPolicy(maxPerClient=1))
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001", "127.0.0.1:40002"))
    assert len(b.service.flows) == 1
    assert b.service.counters.rejectedBy == {"limit": 1}


def test_disabledListenerRefusesTheBatch(batch) -> None:
    """
    A disabled listener dials nobody of a batch that was already queued.
    """
    b = batch()
    b.service.enabled = False
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001"))
    assert b.fake.calls == []
    assert b.service.counters.rejectedBy == {"disabled": 1}


def test_failedConnectEndsTheFlow(batch, logged) -> None:
    """
    A connect the engine reports failed ends its flow with the reason,
    counts it by kind, and ends the client with a FIN.
    """
    b = batch()
    b.fake.results = ["connection refused"]
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001"))
    assert b.service.flows == {}
    assert b.service.counters.connectFailed == {"connection refused": 1}
    assert messages(logged) == [
        "tcp web 127.0.0.1:40001 -> 127.0.0.1:9000 0.000s in=0 out=0"
        " connect failed: connection refused"
    ]
    assert b.peers[0].recv(1) == b""


def test_engineRefusalClosesTheClient(batch, logged) -> None:
    """
    A flow the engine would not take ends as on the one-by-one path.
    """
    b = batch()
    b.fake.results = [None]
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001"))
    assert b.service.flows == {}
    assert messages(logged)[-1].endswith("relay engine refused the connection")
    assert b.peers[0].recv(1) == b""


def test_connectUnderWayIsWaitedFor(batch, logged) -> None:
    """
    A connect still under way comes back to the flow, which waits for it
    in the reactor and gives up after C{connect_timeout}.
    """
    b = batch()
    pending, other = socket.socketpair()
    b.fake.results = [pending.detach()]
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001"))
    (flow,) = b.service.flows.values()
    assert b.reactor.getWriters() == [flow]
    b.reactor.advance(2)
    assert b.service.flows == {}
    assert messages(logged)[-1].endswith("connect failed: timed out after 2s")
    other.close()


def test_proxyHeadersGoWithTheBatch(batch) -> None:
    """
    With C{client_address: proxy_protocol_v1} each flow's PROXY header,
    from its own address, goes to the engine with the batch.
    """
    b = batch(identity=ClientIdentity(clientAddress=PROXY_PROTOCOL_V1))
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001", "127.0.0.9:40002"))
    ((*_, headers),) = b.fake.calls
    assert headers == [
        b"PROXY TCP4 127.0.0.1 127.0.0.1 40001 8080\r\n",
        b"PROXY TCP4 127.0.0.9 127.0.0.1 40002 8080\r\n",
    ]


@pytest.mark.parametrize(
    "settings, batches",
    [
        ({}, True),
        ({"identity": ClientIdentity(clientAddress=PROXY_PROTOCOL_V1)}, True),
        (
            {"identity": ClientIdentity(clientAddress=PROXY_PROTOCOL_V1), "host": ""},
            False,
        ),
        ({"identity": ClientIdentity(clientAddress=TRANSPARENT)}, False),
        ({"identity": ClientIdentity(acceptProxyProtocol=("10.0.0.0/8",))}, False),
    ],
)
def test_whichListenersBatch(batch, settings, batches) -> None:
    """
    The listeners whose clients need a system call each (a PROXY header
    to read, a transparent socket, the address a wildcard listener was
    reached on) keep the one-by-one path.
    """
    if settings.get("host") == "":
        settings = {**settings, "host": "0.0.0.0"}
    assert batch(**settings).forwarder.batches() is batches


@pytest.mark.parametrize("window", [0, 0.02])
def test_writeManyWritesAsWriteDoes(window) -> None:
    """
    L{AccessLog.writeMany} logs the same events, with the same lines, as
    L{AccessLog.write} of each line in turn.
    """

    def events(many: bool) -> list[tuple]:
        from twisted.logger import globalLogPublisher

        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        try:
            reactor = MemoryReactorClock()
            log = AccessLog(reactor, window)
            lines = [f"line {i}" for i in range(4)]
            rows = [(i, None, "c", 0.0, 0, 0, None, "closed") for i in range(4)]
            if many:
                log.writeMany(lines[:1], rows[:1])
                log.writeMany(lines[1:], rows[1:])
            else:
                for line, row in zip(lines, rows, strict=True):
                    log.write(line, row)
            reactor.advance(1)
        finally:
            globalLogPublisher.removeObserver(seen.append)
        return [(e.get("access"), e.get("accessRows")) for e in seen if "access" in e]

    assert events(True) == events(False)


class FakePort:
    """
    What L{EngineForwarder.acceptClients} uses of a listening port.
    """

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.numberAccepts = 100
        self.shedClients: list[str] = []

    def shed(self, client: str) -> None:
        self.shedClients.append(client)


def test_outOfDescriptorsShedsHalfTheBatch(batch, monkeypatch) -> None:
    """
    A batch that ended because the descriptors ran out is halved: the
    last half of its clients are closed and logged as shed, so that the
    first half have descriptors for their targets; then Twisted's accept
    sheds what is still queued.
    """
    import errno

    from twisted.internet import tcp

    from twistedproxy.tcp import forwarder

    b = batch()
    clients = b.clients(*(f"127.0.0.1:{40000 + i}" for i in range(4)))
    monkeypatch.setattr(
        forwarder, "acceptClients", lambda fd, most: (clients, errno.EMFILE)
    )
    twistedAccepts: list = []
    monkeypatch.setattr(tcp.Port, "doRead", twistedAccepts.append)
    port = FakePort()
    try:
        b.forwarder.acceptClients(port)  # type: ignore[arg-type]
    finally:
        port.socket.close()
    ((fds, *_),) = b.fake.calls
    assert fds == [fd for fd, _ in clients[:2]]
    assert port.shedClients == ["127.0.0.1:40002", "127.0.0.1:40003"]
    assert twistedAccepts == [port]
    assert b.peers[3].recv(1) == b""


def test_blockJoinsTheHeldLines(logged) -> None:
    """
    A block of lines written while lines are held joins them in order,
    with its rows, as one event when the window ends; a block on a quiet
    log is written at once as one event with all its rows.
    """
    reactor = MemoryReactorClock()
    log = AccessLog(reactor, window=0.02)
    log.writeBlock("a\nb", [("row a",), ("row b",)])
    log.write("c", ("row c",))
    log.writeBlock("d\ne", [("row d",), ("row e",)])
    reactor.advance(0.02)
    assert messages(logged) == ["a\nb", "c\nd\ne"]
    assert [e["accessRows"] for e in logged] == [
        [("row a",), ("row b",)],
        [("row c",), ("row d",), ("row e",)],
    ]


def test_endedFlowKeepsItsFinalBytes(batch) -> None:
    """
    A flow of a batch the engine reports ended keeps its final byte
    counts for whoever still holds it (the manhole), though the engine no
    longer knows it.
    """
    b = batch()
    b.forwarder.dialBatch(b.clients("127.0.0.1:40001"))
    (flow,) = b.service.flows.values()
    b.report((flow.id, 7, 9, "client closed"))
    assert (flow.bytesIn, flow.bytesOut) == (7, 9)
