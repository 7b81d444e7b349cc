"""
Unit tests of L{twistedproxy.udp}: the session table with fake sockets and
a fake clock, then the real socket classes on loopback, driven by hand.
"""

from __future__ import annotations

import socket
import time

import pytest
from fakes import messages, startedUDP, udpListener
from support import udpSocket
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor, MemoryReactorClock

from twistedproxy.model import Target
from twistedproxy.udp import relay as udp
from twistedproxy.udp.listener import UDPListener
from twistedproxy.udp.relay import (
    DRAIN,
    SESSION_BUFFER,
    connectDatagrams,
    connectedDatagramSocket,
    listenDatagrams,
)


@pytest.fixture
def reactor():
    return MemoryReactorClock()


A = ("10.0.0.1", 1111)
B = ("10.0.0.2", 2222)


def test_activityEitherWayDelaysExpiry(reactor):
    """
    A datagram from the client or a reply from the target restarts the
    timeout; expiry comes within a tenth of the timeout after it is due.
    """
    service = startedUDP(udpListener(timeout=10.0), reactor)
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
    service = startedUDP(udpListener(), reactor)
    for i in range(100):
        service.datagramReceived(b"x", ("10.0.0.1", 1000 + i % 10), None)
    assert len(reactor.getDelayedCalls()) == 1


def test_rejectionsLoggedAtABoundedRate(reactor, logged):
    """
    A flood of rejected datagrams is counted one by one but logged at most
    ten times a second, then one line says how many more were refused.
    """
    service = startedUDP(udpListener(), reactor)
    service.disable()
    for _ in range(100):
        service.datagramReceived(b"x", A, None)
    reactor.advance(1.0)
    service.datagramReceived(b"x", A, None)
    lines = [m for m in messages(logged) if "rejected" in m or "more refused" in m]
    assert service.counters.rejected == 101
    assert len(lines) == 12
    assert "listener disabled" in lines[0]
    assert lines[10] == "and 90 more refused"
    assert "listener disabled" in lines[11]


def test_reconfigureAffectsNewSessionsOnly(reactor):
    """
    After reconfigure, new sessions go to the new target with the new
    timeout; an open session keeps its target and timeout.
    """
    service = startedUDP(udpListener(timeout=100.0), reactor)
    service.datagramReceived(b"a", A, None)
    service.reconfigure(udpListener(target=Target("::1", 9001), timeout=10.0))
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
    service = startedUDP(udpListener(), reactor)
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
    service = startedUDP(udpListener(), reactor)
    service.datagramReceived(b"1", A, None)
    [port] = service.sessionPorts
    port.refusals = 2
    service.datagramReceived(b"2", A, None)
    service.datagramReceived(b"3", A, None)
    assert port.written == [b"1", b"3"]
    assert service.active == 1


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
    # on loopback a datagram is queued at its receiver when sendto returns
    waitReadable(listening.socket)
    listening.doRead()
    assert len(received.datagrams) == DRAIN
    waitReadable(listening.socket)
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
    service = UDPListener(udpListener(target=Target(*address)), reactor)
    service.port = udp.ListeningPort(reactor, udpSocket(), Receiver())
    sockets.append(service.port)
    service.datagramReceived(b"1", A, None)
    [session] = service.sessions.values()
    # the ICMP error, pending on the session's socket, makes it readable
    waitReadable(session.port.socket)
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
        # the ICMP error, pending on the socket, makes it readable
        waitReadable(session.socket)
        reactor.doIteration(0.5)
        assert session in reactor.getReaders()
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target.bind(address)
        target.settimeout(5)
        sockets.append(target)
        session.write(b"hello")
        _, source = target.recvfrom(100)
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
