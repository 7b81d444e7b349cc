"""
Unit tests of L{twistedproxy.udp}: the session table with fake sockets and
a fake clock, then the real socket classes on loopback, driven by hand.
"""

from __future__ import annotations

import errno
import socket
import time

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from twistedproxy.listener import IFlow
from twistedproxy.model import Listener, Target, Timeouts
from twistedproxy.udp import relay as udp
from twistedproxy.udp.listener import UDPListener
from twistedproxy.udp.relay import (
    DRAIN,
    RESOLVING_QUEUE,
    SESSION_BUFFER,
    connectDatagrams,
    connectedDatagramSocket,
    listenDatagrams,
)


def makeListener(
    host="127.0.0.1",
    target=Target("127.0.0.1", 9000),
    timeout=30.0,
    maxConnections=0,
) -> Listener:
    return Listener(
        mapping="dns",
        proto="udp",
        host=host,
        port=5353,
        target=target,
        timeouts=Timeouts(udp=timeout),
        maxConnections=maxConnections,
    )


class FakeListeningPort:
    """
    The listening socket: records what is written to clients.
    """

    def __init__(self) -> None:
        self.sent: list = []
        self.reading = False
        self.closed = False

    def startReading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def replyRoute(self, local):
        return None if local is None else ("from", local)

    def write(self, data, client, route) -> None:
        self.sent.append((data, client, route))


class FakeSessionPort:
    """
    A session's socket: records what is written to the target; refuses
    the next C{refusals} writes as a stale ICMP error would.
    """

    def __init__(self, session, family, address) -> None:
        self.session = session
        self.family = family
        self.address = address
        self.written: list[bytes] = []
        self.refusals = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.refusals:
            self.refusals -= 1
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


class FakeUDPListener(UDPListener):
    """
    A L{UDPListener} whose sockets are fakes.

    @ivar socketError: raised instead of opening the next session socket.
    """

    socketError = None

    def __init__(self, listener, reactor) -> None:
        UDPListener.__init__(self, listener, reactor)
        self.sessionPorts: list[FakeSessionPort] = []

    def openListeningPort(self):
        return FakeListeningPort()

    def openSessionPort(self, session, family, address):
        if self.socketError is not None:
            raise self.socketError
        port = FakeSessionPort(session, family, address)
        self.sessionPorts.append(port)
        return port


@pytest.fixture
def reactor():
    return MemoryReactorClock()


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def started(listener: Listener, reactor) -> FakeUDPListener:
    service = FakeUDPListener(listener, reactor)
    service.privilegedStartService()
    service.startService()
    return service


def messages(events) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_namespace") == "portproxy"]


A = ("10.0.0.1", 1111)
B = ("10.0.0.2", 2222)


def test_firstDatagramOpensSession(reactor):
    """
    A client's first datagram opens a session whose socket is connected to
    the target and carries the datagram; the session is an open flow.
    """
    service = started(makeListener(), reactor)
    assert service.port.reading
    service.datagramReceived(b"hello", A, None)
    [port] = service.sessionPorts
    assert (port.family, port.address) == (socket.AF_INET, ("127.0.0.1", 9000))
    assert port.written == [b"hello"]
    [session] = service.flows.values()
    verifyObject(IFlow, session)
    assert session.client == "10.0.0.1:1111"
    assert session.bytesIn == 5
    assert (service.active, service.counters.total, service.bytesIn) == (1, 1, 5)


def test_clientKeepsItsSession(reactor):
    """
    Later datagrams of a client use its session; another client gets a
    session and a socket of its own.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"a1", A, None)
    service.datagramReceived(b"b1", B, None)
    service.datagramReceived(b"a2", A, None)
    portA, portB = service.sessionPorts
    assert portA.written == [b"a1", b"a2"]
    assert portB.written == [b"b1"]
    assert service.counters.total == 2


def test_repliesGoToTheirClient(reactor):
    """
    A reply on a session's socket goes to that session's client through
    the listening socket, and counts as bytes out.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"a", A, None)
    service.datagramReceived(b"b", B, None)
    portA, portB = service.sessionPorts
    portB.session.replyReceived(b"for b")
    portA.session.replyReceived(b"for a!")
    assert service.port.sent == [(b"for b", B, None), (b"for a!", A, None)]
    assert portA.session.bytesOut == 6
    assert service.bytesOut == 11


def test_wildcardSessionPerLocalAddress(reactor):
    """
    On a wildcard listener, one client sending to two local addresses has
    two sessions, each answering from the address it was sent to.
    """
    service = started(makeListener(host="0.0.0.0"), reactor)
    service.datagramReceived(b"1", A, b"\x7f\0\0\x01")
    service.datagramReceived(b"2", A, b"\x7f\0\0\x02")
    service.datagramReceived(b"3", A, b"\x7f\0\0\x02")
    one, two = service.sessionPorts
    assert (one.written, two.written) == ([b"1"], [b"2", b"3"])
    two.session.replyReceived(b"r")
    assert service.port.sent == [(b"r", A, ("from", b"\x7f\0\0\x02"))]


def test_sessionExpiresAfterTimeout(reactor, logged):
    """
    A session with no datagram either way for udp_timeout is closed and
    logged; the next datagram opens a new session.
    """
    service = started(makeListener(timeout=30.0), reactor)
    service.datagramReceived(b"a", A, None)
    [port] = service.sessionPorts
    reactor.advance(29.9)
    assert service.active == 1
    reactor.advance(0.2)
    assert service.active == 0
    assert port.closed
    assert any(
        "10.0.0.1:1111" in m and "no datagram for 30s" in m for m in messages(logged)
    )
    service.datagramReceived(b"again", A, None)
    assert len(service.sessionPorts) == 2
    assert service.counters.total == 2


def test_activityEitherWayDelaysExpiry(reactor):
    """
    A datagram from the client or a reply from the target restarts the
    timeout; expiry comes within a tenth of the timeout after it is due.
    """
    service = started(makeListener(timeout=10.0), reactor)
    service.datagramReceived(b"a", A, None)
    [port] = service.sessionPorts
    reactor.advance(8)
    service.datagramReceived(b"a", A, None)
    reactor.advance(8)
    port.session.replyReceived(b"r")
    reactor.advance(9.9)
    assert service.active == 1
    reactor.advance(1.0)
    assert service.active == 0


def test_sweepDoesNotScheduleTimerPerDatagram(reactor):
    """
    Datagrams schedule nothing: one sweep call per listener is pending
    whatever the traffic.
    """
    service = started(makeListener(), reactor)
    for i in range(100):
        service.datagramReceived(b"x", ("10.0.0.1", 1000 + i % 10), None)
    assert len(reactor.getDelayedCalls()) == 1


def test_maxConnections(reactor):
    """
    A datagram that would open a session beyond max_connections is dropped
    and counted as rejected; open sessions carry on, and a new client gets
    in once one expired.
    """
    service = started(makeListener(maxConnections=1, timeout=5.0), reactor)
    service.datagramReceived(b"a", A, None)
    service.datagramReceived(b"b", B, None)
    service.datagramReceived(b"b", B, None)
    service.datagramReceived(b"a", A, None)
    [port] = service.sessionPorts
    assert port.written == [b"a", b"a"]
    assert (service.active, service.counters.total, service.counters.rejected) == (
        1,
        1,
        2,
    )
    reactor.advance(6)
    service.datagramReceived(b"b", B, None)
    assert service.sessionPorts[1].written == [b"b"]


def test_rejectionsLoggedAtABoundedRate(reactor, logged):
    """
    A flood of rejected datagrams is counted one by one but logged at most
    ten times a second, then one line says how many more were refused.
    """
    service = started(makeListener(), reactor)
    service.disable()
    for i in range(100):
        service.datagramReceived(b"x", A, None)
    reactor.advance(1.0)
    service.datagramReceived(b"x", A, None)
    lines = [m for m in messages(logged) if "rejected" in m or "more refused" in m]
    assert service.counters.rejected == 101
    assert len(lines) == 12
    assert "listener disabled" in lines[0]
    assert lines[10] == "and 90 more refused"
    assert "listener disabled" in lines[11]


def test_disableKeepsSessions(reactor):
    """
    A disabled listener drops and counts datagrams from new clients while
    open sessions go on; enabled again, it opens sessions.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"a", A, None)
    service.disable()
    service.datagramReceived(b"b", B, None)
    service.datagramReceived(b"a2", A, None)
    assert service.sessionPorts[0].written == [b"a", b"a2"]
    assert (service.active, service.counters.rejected) == (1, 1)
    assert not service.port.closed
    service.enable()
    service.datagramReceived(b"b", B, None)
    assert service.sessionPorts[1].written == [b"b"]


def test_reconfigureAffectsNewSessionsOnly(reactor):
    """
    After reconfigure, new sessions go to the new target with the new
    timeout; an open session keeps its target and timeout.
    """
    service = started(makeListener(timeout=100.0), reactor)
    service.datagramReceived(b"a", A, None)
    service.reconfigure(makeListener(target=Target("::1", 9001), timeout=10.0))
    service.datagramReceived(b"b", B, None)
    service.datagramReceived(b"a", A, None)
    portA, portB = service.sessionPorts
    assert portA.address == ("127.0.0.1", 9000)
    assert (portB.family, portB.address) == (socket.AF_INET6, ("::1", 9001))
    assert portA.session.listener.target == Target("127.0.0.1", 9000)
    reactor.advance(11)
    assert [s.client for s in service.flows.values()] == ["10.0.0.1:1111"]
    reactor.advance(100)
    assert service.active == 0


def test_staleRefusalRetriedOnce(reactor):
    """
    A send failing with a stale ICMP port-unreachable error is retried once,
    so the datagram reaches the target, and nothing is closed.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"1", A, None)
    [port] = service.sessionPorts
    port.refusals = 1
    service.datagramReceived(b"2", A, None)
    assert port.written == [b"1", b"2"]
    assert service.active == 1 and not port.closed


def test_refusalTwiceDropsOnlyThatDatagram(reactor):
    """
    A datagram refused on the retry too is dropped; the session stays open
    and the next datagram is forwarded.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"1", A, None)
    [port] = service.sessionPorts
    port.refusals = 2
    service.datagramReceived(b"2", A, None)
    service.datagramReceived(b"3", A, None)
    assert port.written == [b"1", b"3"]
    assert service.active == 1


def test_kill(reactor, logged):
    """
    Closing a session (the manhole's kill) closes its socket, ends the flow
    with the reason given, and the client's next datagram opens a new one.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"abc", A, None)
    [session] = service.flows.values()
    session.close("killed")
    session.close("killed twice")
    assert service.sessionPorts[0].closed
    assert service.active == 0 and service.counters.bytesIn == 3
    assert sum("killed" in m for m in messages(logged)) == 1
    service.datagramReceived(b"d", A, None)
    [again] = service.flows.values()
    assert again.id != session.id


def test_outOfFileDescriptors(reactor, logged):
    """
    When no socket can be opened for a new session, that datagram is
    dropped, counted as dropped (not rejected) and logged, nothing else
    changes, and the next one succeeds once descriptors are free.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"a", A, None)
    service.socketError = OSError(errno.EMFILE, "Too many open files")
    service.datagramReceived(b"b", B, None)
    service.datagramReceived(b"b", B, None)
    service.datagramReceived(b"a", A, None)
    assert (service.active, service.counters.rejected, service.dropped) == (1, 0, 2)
    assert any(
        "out of file descriptors" in m and "10.0.0.2:2222" in m
        for m in messages(logged)
    )
    service.socketError = None
    service.datagramReceived(b"b", B, None)
    assert service.sessionPorts[1].written == [b"b"]


def test_stopServiceClosesEverything(reactor, logged):
    """
    Stopping the listener closes its socket and every session, each with
    an access line, and cancels its sweep.
    """
    service = started(makeListener(), reactor)
    service.datagramReceived(b"a", A, None)
    service.datagramReceived(b"b", B, None)
    listening = service.port
    service.stopService()
    assert listening.closed and not service.bound
    assert all(p.closed for p in service.sessionPorts)
    assert service.active == 0
    assert sum("listener closed" in m for m in messages(logged)) == 2
    assert reactor.getDelayedCalls() == []


class ManualResolver:
    """
    A name resolver answering when the test says.
    """

    def __init__(self) -> None:
        self.asked: list = []

    def resolveHostName(
        self,
        receiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        self.asked.append((receiver, hostName, portNumber, transportSemantics))
        receiver.resolutionBegan(None)

    def answer(self, index, *addresses) -> None:
        receiver = self.asked[index][0]
        for address in addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


def test_hostNameResolvedWhenSessionOpens(reactor):
    """
    A host-name target is resolved without blocking when a session opens;
    datagrams arriving meanwhile are held (up to a bound) and forwarded in
    order once the session's socket is connected.
    """
    from twisted.internet.address import IPv6Address

    resolver = ManualResolver()
    reactor.installNameResolver(resolver)
    service = started(makeListener(target=Target("backend.example", 53)), reactor)
    for i in range(RESOLVING_QUEUE + 3):
        service.datagramReceived(b"%d" % i, A, None)
    [(receiver, host, port, semantics)] = resolver.asked
    assert (host, port, semantics) == ("backend.example", 53, "UDP")
    assert service.sessionPorts == [] and service.active == 1
    resolver.answer(0, IPv6Address("UDP", "fd00::5", 53))
    [sessionPort] = service.sessionPorts
    assert sessionPort.family == socket.AF_INET6
    assert sessionPort.address == ("fd00::5", 53, 0, 0)
    assert sessionPort.written == [b"%d" % i for i in range(RESOLVING_QUEUE)]
    service.datagramReceived(b"later", A, None)
    assert sessionPort.written[-1] == b"later"


def test_datagramsNotHeldWhileResolvingCountAsDropped(reactor):
    """
    The datagrams a client sends while its target's name resolves, beyond
    those held, count as dropped when its session opens; a session whose
    name does not resolve drops nothing more than its access line says.
    """
    from twisted.internet.address import IPv4Address

    resolver = ManualResolver()
    reactor.installNameResolver(resolver)
    service = started(makeListener(target=Target("backend.example", 53)), reactor)
    for i in range(RESOLVING_QUEUE + 3):
        service.datagramReceived(b"a", A, None)
        service.datagramReceived(b"b", B, None)
    assert service.dropped == 0
    resolver.answer(0, IPv4Address("UDP", "127.0.0.1", 53))
    assert service.dropped == 3
    resolver.answer(1)
    assert service.active == 1
    assert service.dropped == 3


def test_unresolvableTargetEndsSession(reactor, logged):
    """
    A target host name that does not resolve ends the session with a
    reason naming it; the client's next datagram tries again.
    """
    resolver = ManualResolver()
    reactor.installNameResolver(resolver)
    service = started(makeListener(target=Target("nowhere.invalid", 53)), reactor)
    service.datagramReceived(b"a", A, None)
    resolver.answer(0)
    assert service.active == 0
    assert any("cannot resolve nowhere.invalid" in m for m in messages(logged))
    service.datagramReceived(b"a", A, None)
    assert len(resolver.asked) == 2


def test_resolutionAfterKillIgnored(reactor):
    """
    A resolution finishing after its session was closed opens no socket.
    """
    from twisted.internet.address import IPv4Address

    resolver = ManualResolver()
    reactor.installNameResolver(resolver)
    service = started(makeListener(target=Target("backend.example", 53)), reactor)
    service.datagramReceived(b"a", A, None)
    [session] = service.flows.values()
    session.close("killed")
    resolver.answer(0, IPv4Address("UDP", "127.0.0.1", 53))
    assert service.sessionPorts == []


# -- the real sockets, on loopback, read by hand ------------------------


class Receiver:
    """
    Collects what a real port hands over.
    """

    def __init__(self) -> None:
        self.datagrams: list = []
        self.replies: list[bytes] = []

    def datagramReceived(self, data, client, local) -> None:
        self.datagrams.append((data, client, local))

    def replyReceived(self, data) -> None:
        self.replies.append(data)


def udpSocket(host="127.0.0.1", family=socket.AF_INET) -> socket.socket:
    skt = socket.socket(family, socket.SOCK_DGRAM)
    skt.bind((host, 0))
    skt.settimeout(5)
    return skt


def waitReadable(skt, timeout=5.0) -> None:
    import select

    assert select.select([skt], [], [], timeout)[0], "nothing arrived"


@pytest.fixture
def sockets():
    opened: list = []
    yield opened
    for thing in opened:
        thing.close()


def test_listeningPortRegistersWithReactor(sockets):
    """
    A listening port is read by the reactor it was given once started, and
    leaves it when closed.
    """
    reactor = MemoryReactor()
    port = listenDatagrams(reactor, "127.0.0.1", 0, Receiver())
    port.startReading()
    assert port in reactor.getReaders()
    port.close()
    assert port not in reactor.getReaders()


def test_largestDatagramWholeBothWays(sockets):
    """
    A 65507-byte datagram crosses the listening socket and a session socket
    whole in both directions.
    """
    reactor = MemoryReactor()
    received = Receiver()
    listening = listenDatagrams(reactor, "127.0.0.1", 0, received)
    target = udpSocket()
    client = udpSocket()
    sockets.extend([listening, target, client])
    session = connectDatagrams(reactor, socket.AF_INET, target.getsockname(), received)
    sockets.append(session)
    big = bytes(range(256)) * 255 + b"x" * 227
    assert len(big) == 65507
    client.sendto(big, listening.socket.getsockname())
    waitReadable(listening.socket)
    listening.doRead()
    assert received.datagrams == [(big, client.getsockname(), None)]
    session.write(big)
    data, source = target.recvfrom(70000)
    assert data == big
    target.sendto(big[::-1], source)
    waitReadable(session.socket)
    session.doRead()
    assert received.replies == [big[::-1]]
    listening.write(big, client.getsockname(), None)
    assert client.recvfrom(70000) == (big, listening.socket.getsockname())


def test_wildcardAnswersFromAddressUsed(sockets):
    """
    A listener bound to 0.0.0.0 learns which local address each datagram
    was sent to, and answers from it: a client sending to 127.0.0.2 gets
    its reply from 127.0.0.2.
    """
    reactor = MemoryReactor()
    received = Receiver()
    listening = listenDatagrams(reactor, "0.0.0.0", 0, received)
    sockets.append(listening)
    port = listening.socket.getsockname()[1]
    for address in ("127.0.0.2", "127.0.0.1"):
        client = udpSocket()
        sockets.append(client)
        client.sendto(b"ping", (address, port))
        waitReadable(listening.socket)
        listening.doRead()
        data, source, local = received.datagrams.pop()
        assert (data, source) == (b"ping", client.getsockname())
        assert local == socket.inet_aton(address)
        listening.write(b"pong", source, listening.replyRoute(local))
        assert client.recvfrom(100) == (b"pong", (address, port))


def test_wildcardIPv6AnswersFromAddressUsed(sockets):
    """
    A listener bound to :: answers ::1 clients from ::1 through
    IPV6_PKTINFO.
    """
    reactor = MemoryReactor()
    received = Receiver()
    listening = listenDatagrams(reactor, "::", 0, received)
    client = udpSocket("::1", socket.AF_INET6)
    sockets.extend([listening, client])
    port = listening.socket.getsockname()[1]
    client.sendto(b"ping", ("::1", port))
    waitReadable(listening.socket)
    listening.doRead()
    [(data, source, local)] = received.datagrams
    assert local[:16] == socket.inet_pton(socket.AF_INET6, "::1")
    listening.write(b"pong", source, listening.replyRoute(local))
    data, (host, sport, *_) = client.recvfrom(100)
    assert (data, host, sport) == (b"pong", "::1", port)


def test_wildcardIPv4AndIPv6ShareAPort(sockets):
    """
    0.0.0.0 and :: bind the same port side by side; a second bind of a port
    in use fails with CannotListenError.
    """
    reactor = MemoryReactor()
    four = listenDatagrams(reactor, "0.0.0.0", 0, Receiver())
    sockets.append(four)
    port = four.socket.getsockname()[1]
    six = listenDatagrams(reactor, "::", port, Receiver())
    sockets.append(six)
    with pytest.raises(CannotListenError):
        listenDatagrams(reactor, "127.0.0.1", port, Receiver())


def test_drainIsBounded(sockets):
    """
    One readiness event reads at most DRAIN datagrams, leaving the rest for
    the next turn.
    """
    reactor = MemoryReactor()
    received = Receiver()
    listening = listenDatagrams(reactor, "127.0.0.1", 0, received)
    client = udpSocket()
    sockets.extend([listening, client])
    for i in range(DRAIN + 10):
        client.sendto(b"%d" % i, listening.socket.getsockname())
    time.sleep(0.05)
    listening.doRead()
    assert len(received.datagrams) == DRAIN
    listening.doRead()
    assert len(received.datagrams) == DRAIN + 10


def test_realStaleRefusalRetried(sockets):
    """
    Through a real connected socket: the first datagram after the target
    starts listening meets the stale ICMP error of the one before, and is
    retried and delivered.
    """
    reactor = MemoryReactorClock()
    target = udpSocket()
    address = target.getsockname()
    target.close()
    service = UDPListener(makeListener(target=Target(*address)), reactor)
    service.port = udp.ListeningPort(reactor, udpSocket(), Receiver())
    sockets.append(service.port)
    service.datagramReceived(b"1", A, None)
    time.sleep(0.05)
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(address)
    target.settimeout(5)
    sockets.append(target)
    service.datagramReceived(b"2", A, None)
    assert target.recv(100) == b"2"
    assert service.active == 1
    service.stopService()


def test_icmpErrorKeepsSessionReading(sockets):
    """
    Under a real epoll reactor (not the global one), the ICMP error a
    session's socket gets while nothing listens at the target leaves the
    socket registered, and the reply sent once the target listens arrives.
    """
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    try:
        target = udpSocket()
        address = target.getsockname()
        target.close()
        received = Receiver()
        session = connectDatagrams(reactor, socket.AF_INET, address, received)
        sockets.append(session)
        session.write(b"nobody there")
        time.sleep(0.05)
        reactor.doIteration(0.5)
        assert session in reactor.getReaders()
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target.bind(address)
        target.settimeout(5)
        sockets.append(target)
        session.write(b"hello")
        data, source = target.recvfrom(100)
        target.sendto(b"welcome", source)
        deadline = time.monotonic() + 5
        while not received.replies and time.monotonic() < deadline:
            reactor.doIteration(0.1)
        assert received.replies == [b"welcome"]
    finally:
        reactor.removeAll()
        reactor._poller.close()


def test_sessionSocketHasTheListeningSocketsBuffers():
    """
    A session's socket gets SESSION_BUFFER receive and send buffers (the
    kernel reports twice the size), beyond rmem_max as the tests run as
    root, not the system default.
    """
    skt = connectedDatagramSocket(socket.AF_INET, ("127.0.0.1", 9))
    with skt:
        assert skt.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * SESSION_BUFFER
        assert skt.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * SESSION_BUFFER
    assert SESSION_BUFFER >= 4 * 1024 * 1024
