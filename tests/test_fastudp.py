"""
Tests of the compiled UDP engine (L{twistedproxy.udp._engine}) on real
loopback sockets, and of a L{UDPListener} that uses it under a real epoll
reactor (not the global one).
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import time

import pytest
from support import proxyEnvironment
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistedproxy.listener import IFlow
from twistedproxy.model import Listener, Target, Timeouts
from twistedproxy.udp import engine as fastudp
from twistedproxy.udp.engine import EngineSession
from twistedproxy.udp.listener import UDPListener

needsEngine = pytest.mark.skipif(
    not fastudp.available(), reason="twistedproxy.udp._engine is not built"
)


def test_extensionBuiltWhereItCan():
    """
    On Linux with a C compiler the extension is built, for these tests and
    for the twistd that the end-to-end tests start, so no test that needs
    it can be skipped silently in CI.
    """
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not (sys.platform.startswith("linux") and shutil.which(compiler)):
        pytest.skip("no C compiler on Linux here: the pure-Python path is the one used")
    assert fastudp.available(), (
        "a C compiler is here but twistedproxy.udp._engine is not built: "
        "pip install . (or, in a source tree, python setup.py build_ext --inplace)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", "import twistedproxy.udp._engine"],
        env=proxyEnvironment(),
        cwd="/",
        capture_output=True,
    )
    assert imported.returncode == 0, (
        "the end-to-end tests' twistd cannot import twistedproxy.udp._engine from "
        "this checkout: python setup.py build_ext --inplace"
    )


def test_switchTurnsEngineOff(monkeypatch):
    """
    C{PORTPROXY_FASTPATH=0} makes the root service create no engine, so
    every listener is on the pure-Python path, even under a real reactor.
    """
    from twisted.internet.epollreactor import EPollReactor

    from twistedproxy.service import compiledEngines

    monkeypatch.setenv("PORTPROXY_FASTPATH", "0")
    reactor = EPollReactor()
    try:
        assert compiledEngines(reactor) == {"tcp": None, "udp": None, "tls": None}
    finally:
        reactor._poller.close()


def test_listenerWithoutEngineForwardsInPython():
    """
    A listener given no engine (as the listener's unit tests make them)
    forwards its datagrams in Python.
    """
    from twisted.internet.testing import MemoryReactorClock

    service = UDPListener(makeListener(), MemoryReactorClock())
    assert not service.forwarder.compiled


# -- the engine itself -------------------------------------------------------


def udpSocket(host="127.0.0.1", timeout=5.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    skt = socket.socket(family, socket.SOCK_DGRAM)
    skt.bind((host, 0))
    skt.settimeout(timeout)
    return skt


def listeningSocket(host="127.0.0.1", pktinfo=False) -> socket.socket:
    skt = udpSocket(host)
    skt.setblocking(False)
    if pktinfo and skt.family == socket.AF_INET6:
        skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    elif pktinfo:
        skt.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_PKTINFO", 8), 1)
    return skt


def connected(address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    skt = socket.socket(family, socket.SOCK_DGRAM)
    skt.setblocking(False)
    skt.connect(address)
    return skt


def nextEvents(engine, timeout=5.0) -> list:
    """
    Wait for the engine's eventfd and return what it reports.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([engine.fileno()], [], [], 0.1)
        events = engine.reports()
        if events:
            return events
    raise AssertionError("the engine reported nothing")


def fdOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Bench:
    """
    An engine with one listener, a target and cleanup.
    """

    def __init__(
        self, host="127.0.0.1", pktinfo=False, listenHost=None, gso=True
    ) -> None:
        from twistedproxy.udp._engine import UDPEngine

        self.engine = UDPEngine(gso=gso)
        self.listening = listeningSocket(listenHost or host, pktinfo)
        self.target = udpSocket(host)
        self.engine.addListener(self.listening.fileno(), 1, pktinfo)
        self.address = self.listening.getsockname()[:2]
        self.flowIds = iter(range(1, 1 << 20))
        self.opened = [self.listening, self.target]

    def client(self, host=None) -> socket.socket:
        skt = udpSocket(host or self.address[0])
        self.opened.append(skt)
        return skt

    def openSession(self, event, timeout=30.0, target=None, rate=()) -> int:
        kind, listenerId, key, client = event
        assert (kind, listenerId) == ("new", 1)
        flowId = next(self.flowIds)
        skt = connected(target or self.target.getsockname()[:2])
        self.engine.adopt(key, skt.detach(), flowId, timeout, b"", 0, *rate)
        return flowId

    def close(self) -> None:
        self.engine.stop()
        for skt in self.opened:
            skt.close()


@pytest.fixture
def bench():
    made: list[Bench] = []

    def make(**kw) -> Bench:
        made.append(Bench(**kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


@needsEngine
def test_newClientHeldUntilSessionOpens(bench):
    """
    A client without a session is reported once with its address while
    its datagrams are held; the session's socket gets them all, in order,
    and the target's replies come back from the listening address.
    """
    b = bench()
    c = b.client()
    for data in (b"one", b"two", b"three"):
        c.sendto(data, b.address)
    [event] = nextEvents(b.engine)
    assert event[3] == c.getsockname()
    time.sleep(0.05)
    assert b.engine.reports() == []
    flowId = b.openSession(event)
    received = [b.target.recvfrom(100) for _ in range(3)]
    assert [data for data, _ in received] == [b"one", b"two", b"three"]
    assert len({source for _, source in received}) == 1
    b.target.sendto(b"reply", received[0][1])
    assert c.recvfrom(100) == (b"reply", b.address)
    c.sendto(b"four", b.address)
    assert b.target.recv(100) == b"four"
    assert b.engine.counters(flowId) == (15, 5)
    assert b.engine.listenerCounters(1) == (1, 0, 0)


@needsEngine
def test_heldDatagramsLeaveBeforeNextOnes(bench):
    """
    The datagrams held for a new client reach the target before those the
    client sends right after its session is adopted, whichever of the
    engine thread's wake-up and the next datagrams comes first.
    """
    b = bench()
    for attempt in range(20):
        c = b.client()
        held = [b"held %d %d" % (attempt, i) for i in range(5)]
        for data in held:
            c.sendto(data, b.address)
        [event] = nextEvents(b.engine)
        b.openSession(event)
        after = [b"next %d %d" % (attempt, i) for i in range(20)]
        for data in after:
            c.sendto(data, b.address)
        assert [b.target.recv(100) for _ in held + after] == held + after


@needsEngine
def test_sessionDatagramRate(bench):
    """
    A session with a rate forwards its burst (held datagrams included) and
    drops the rest, counted in the listener's limited; after a while the
    bucket has refilled; another session is not limited.
    """
    b = bench()
    c, other = b.client(), b.client()
    for data in (b"h1", b"h2"):
        c.sendto(data, b.address)
    [event] = nextEvents(b.engine)
    b.openSession(event, rate=(1.0, 4))
    for i in range(10):
        c.sendto(b"d%d" % i, b.address)
    other.sendto(b"o", b.address)
    [event] = nextEvents(b.engine)
    b.openSession(event)
    b.target.settimeout(0.5)
    received = []
    try:
        while True:
            received.append(b.target.recv(100))
    except TimeoutError:
        pass
    assert sorted(received) == [b"d0", b"d1", b"h1", b"h2", b"o"]
    assert b.engine.listenerCounters(1) == (2, 0, 8)
    time.sleep(0.6)
    c.sendto(b"later", b.address)
    assert b.target.recv(100) == b"later"
    with pytest.raises(ValueError):
        b.engine.adopt(event[2], 0, 99, 30.0, b"", 0, 5.0, 0)


@needsEngine
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_largestDatagramsWholeBothWays(bench, host):
    """
    A 65000-byte datagram crosses the engine whole both ways, over IPv4
    and IPv6.
    """
    b = bench(host=host)
    c = b.client()
    big = os.urandom(65000)
    c.sendto(big, b.address)
    b.openSession(nextEvents(b.engine)[0])
    data, source = b.target.recvfrom(70000)
    assert data == big
    b.target.sendto(big[::-1], source)
    reply, source = c.recvfrom(70000)
    assert (reply, source[:2]) == (big[::-1], b.address)


@needsEngine
def test_wildcardAnswersFromAddressUsed(bench):
    """
    On a wildcard listener, one client sending to two local addresses has
    two sessions, and each reply leaves from the address it answers.
    """
    b = bench(listenHost="0.0.0.0", pktinfo=True)
    port = b.address[1]
    c = b.client("127.0.0.1")
    sources = {}
    for local in ("127.0.0.2", "127.0.0.1"):
        c.sendto(local.encode(), (local, port))
        b.openSession(nextEvents(b.engine)[0])
        data, source = b.target.recvfrom(100)
        assert data == local.encode()
        sources[local] = source
        b.target.sendto(b"from " + data, source)
        assert c.recvfrom(100) == (b"from " + data, (local, port))
    assert len(set(sources.values())) == 2


@needsEngine
def test_wildcardIPv6AnswersFromAddressUsed(bench):
    """
    On an IPv6 wildcard listener the reply to a client leaves from ::1,
    where the client sent.
    """
    b = bench(host="::1", listenHost="::", pktinfo=True)
    c = b.client("::1")
    c.sendto(b"six", ("::1", b.address[1]))
    b.openSession(nextEvents(b.engine)[0])
    data, source = b.target.recvfrom(100)
    b.target.sendto(b"back", source)
    reply, where = c.recvfrom(100)
    assert (reply, where[:2]) == (b"back", ("::1", b.address[1]))


@needsEngine
def test_heldDatagramsBounded(bench):
    """
    At most 8 datagrams of a client are held before its session opens;
    all of them count in its bytes, and those not held in the listener's
    dropped datagrams when the session opens.
    """
    from twistedproxy.udp._engine import PENDING_DATAGRAMS

    b = bench()
    c = b.client()
    for i in range(PENDING_DATAGRAMS + 4):
        c.sendto(b"%02d" % i, b.address)
    event = nextEvents(b.engine)[0]
    time.sleep(0.1)
    flowId = b.openSession(event)
    b.target.settimeout(0.3)
    got = []
    try:
        while True:
            got.append(b.target.recv(100))
    except TimeoutError:
        pass
    assert got == [b"%02d" % i for i in range(PENDING_DATAGRAMS)]
    assert b.engine.counters(flowId) == (2 * (PENDING_DATAGRAMS + 4), 0)
    assert b.engine.listenerCounters(1) == (1, 4, 0)


@needsEngine
def test_dropPendingForgetsClient(bench):
    """
    Dropping a client's held datagrams says how many there were (the
    listener counts them as it decides, not the engine); its next datagram
    is reported as new again.
    """
    b = bench()
    c = b.client()
    c.sendto(b"a", b.address)
    c.sendto(b"bb", b.address)
    event = nextEvents(b.engine)[0]
    time.sleep(0.05)
    assert b.engine.dropPending(event[2]) == (2, 3)
    assert b.engine.dropPending(event[2]) == (0, 0)
    assert b.engine.listenerCounters(1) == (0, 0, 0)
    c.sendto(b"c", b.address)
    assert nextEvents(b.engine)[0][2] == event[2]


@needsEngine
def test_sessionExpiresAfterTimeout(bench):
    """
    A session quiet for its timeout is ended by the engine and reported
    with its counters, not before the timeout; its socket is closed.
    """
    b = bench()
    c = b.client()
    c.sendto(b"ping", b.address)
    started = time.monotonic()
    flowId = b.openSession(nextEvents(b.engine)[0], timeout=0.3)
    assert b.target.recv(100) == b"ping"
    assert nextEvents(b.engine) == [("ended", flowId, 4, 0)]
    assert time.monotonic() - started >= 0.3
    assert b.engine.counters(flowId) is None
    assert b.engine.flowCount() == 0


@needsEngine
def test_activityDelaysExpiry(bench):
    """
    Replies alone keep a session open past its timeout.
    """
    b = bench()
    c = b.client()
    c.sendto(b"ping", b.address)
    flowId = b.openSession(nextEvents(b.engine)[0], timeout=0.6)
    _, source = b.target.recvfrom(100)
    for _ in range(10):
        b.target.sendto(b"pong", source)
        assert c.recv(100) == b"pong"
        time.sleep(0.15)
    assert b.engine.counters(flowId) == (4, 40)
    assert b.engine.reports() == []


@needsEngine
def test_staleRefusalRetried(bench):
    """
    The first datagram sent after the target starts listening meets the
    ICMP error left by the one before, is retried and arrives.
    """
    b = bench()
    address = b.target.getsockname()
    b.target.close()
    c = b.client()
    c.sendto(b"1", b.address)
    b.openSession(nextEvents(b.engine)[0], target=address)
    time.sleep(0.1)
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(address)
    target.settimeout(5)
    b.opened.append(target)
    c.sendto(b"2", b.address)
    data, source = target.recvfrom(100)
    assert data == b"2"
    target.sendto(b"welcome", source)
    assert c.recv(100) == b"welcome"


@needsEngine
def test_closeReturnsCountersAndClosesSocket(bench):
    """
    Closing a session returns its counters and closes its socket; a second
    close finds nothing.
    """
    b = bench()
    c = b.client()
    c.sendto(b"hello", b.address)
    event = nextEvents(b.engine)[0]
    skt = connected(b.target.getsockname())
    fd = skt.detach()
    b.engine.adopt(event[2], fd, 42, 30.0)
    assert b.target.recv(100) == b"hello"
    assert b.engine.close(42) == (5, 0)
    assert not fdOpen(fd)
    assert b.engine.close(42) is None


@needsEngine
def test_removeListenerEndsItsSessions(bench):
    """
    Removing a listener ends its sessions and returns their counters; its
    socket stays open for its owner and is no longer read.
    """
    b = bench()
    c = b.client()
    c.sendto(b"x", b.address)
    flowId = b.openSession(nextEvents(b.engine)[0])
    assert b.target.recv(100) == b"x"
    assert b.engine.removeListener(1) == [(flowId, 1, 0)]
    assert b.engine.flowCount() == 0
    c.sendto(b"unread", b.address)
    time.sleep(0.05)
    assert b.listening.recv(100) == b"unread"


@needsEngine
def test_adoptErrorsLeaveSocketToCaller(bench):
    """
    adopt for a listener the engine does not read, or for a client
    that has a session, raises ValueError and leaves the socket open.
    """
    b = bench()
    c = b.client()
    c.sendto(b"x", b.address)
    event = nextEvents(b.engine)[0]
    b.openSession(event)
    skt = connected(b.target.getsockname())
    with pytest.raises(ValueError):
        b.engine.adopt(event[2], skt.fileno(), 99, 30.0)
    b.engine.removeListener(1)
    with pytest.raises(ValueError):
        b.engine.adopt(event[2], skt.fileno(), 100, 30.0)
    assert fdOpen(skt.fileno())
    skt.close()
    with pytest.raises(ValueError):
        b.engine.adopt(b"not a key", 0, 101, 30.0)


@needsEngine
def test_manySessionsEachTheirOwn(bench):
    """
    Six hundred clients (past the first growth of the session table) each
    get their own session and only their own replies.
    """
    b = bench()
    b.target.settimeout(5)
    clients = [b.client() for _ in range(600)]
    sources = {}
    for i, c in enumerate(clients):
        c.sendto(b"%d" % i, b.address)
        for event in nextEvents(b.engine):
            b.openSession(event)
        data, source = b.target.recvfrom(100)
        sources[int(data)] = source
    assert len(set(sources.values())) == len(clients)
    for i in (0, 299, 599):
        b.target.sendto(b"to %d" % i, sources[i])
        assert clients[i].recv(100) == b"to %d" % i
    assert b.engine.flowCount() == 600


@needsEngine
def test_floodedSessionLeavesOthersTheirTurn(bench):
    """
    While one client floods the listener, another client's datagrams still
    reach their target.
    """
    import threading

    b = bench()
    sink = udpSocket()
    b.opened.append(sink)
    flooder, other = b.client(), b.client()
    flooder.sendto(b"hi", b.address)
    b.openSession(nextEvents(b.engine)[0], target=sink.getsockname())
    other.sendto(b"hi", b.address)
    b.openSession(nextEvents(b.engine)[0])
    assert b.target.recv(100) == b"hi"
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                flooder.sendto(b"f" * 500, b.address)
            except OSError:
                pass

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        b.target.settimeout(0.3)
        arrived = 0
        for i in range(30):
            other.sendto(b"mine", b.address)
            try:
                arrived += b.target.recv(100) == b"mine"
            except TimeoutError:
                pass
            if arrived == 3:
                break
    finally:
        stop.set()
        thread.join()
    assert arrived == 3


@needsEngine
def test_stopEndsEverything(bench):
    """
    stop() joins the thread, closes the session sockets and returns the
    sessions; a second stop is harmless and later calls raise.
    """
    b = bench()
    c = b.client()
    c.sendto(b"x", b.address)
    event = nextEvents(b.engine)[0]
    skt = connected(b.target.getsockname())
    fd = skt.detach()
    b.engine.adopt(event[2], fd, 5, 30.0)
    assert b.engine.stop() == [(5, 1, 0)]
    assert not fdOpen(fd)
    assert b.engine.stop() == []
    with pytest.raises(RuntimeError):
        b.engine.addListener(b.listening.fileno(), 2, False)


# -- runs of one session sent with UDP GSO -----------------------------------

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
SO_NO_CHECK = getattr(socket, "SO_NO_CHECK", 11)


def kernelHasGso() -> bool:
    """
    Whether the kernel knows UDP_SEGMENT, which the bursts below are sent
    with (an older kernel would send each burst as one datagram).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as skt:
        try:
            skt.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1024)
        except OSError:
            return False
    return True


needsGso = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not kernelHasGso(),
    reason="the kernel has no UDP GSO (Linux >= 4.18)",
)


def sendBurst(client, address, burst) -> None:
    """
    Send the datagrams of burst (one size, the last may be shorter) so that
    they reach the listener together: in one UDP GSO send, which the
    kernel cuts back into those datagrams and queues at once.
    """
    if len(burst) == 1:
        client.sendto(burst[0], address)
        return
    size = struct.pack("=H", len(burst[0]))
    client.sendmsg(burst, [(socket.SOL_UDP, UDP_SEGMENT, size)], 0, address)


def receive(target, count) -> list:
    """
    The next count datagrams at target, checking that no more follow.
    """
    got = [target.recv(70000) for _ in range(count)]
    target.settimeout(0.05)
    try:
        extra = target.recv(70000)
    except TimeoutError:
        extra = None
    finally:
        target.settimeout(5)
    assert extra is None, f"a datagram of {len(extra)} bytes more than sent"
    return got


def openedSession(b, client, sessionSocket=None) -> int:
    """
    Open the session of client (on sessionSocket, or a new socket
    connected to the target) and return its flow id, once its first
    datagram has arrived.  The listening and target sockets get receive
    buffers for bursts of 128 datagrams.
    """
    for skt in (b.listening, b.target):
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.sendto(b"hello", b.address)
    key = nextEvents(b.engine)[0][2]
    if sessionSocket is None:
        sessionSocket = connected(b.target.getsockname()[:2])
    flowId = next(b.flowIds)
    b.engine.adopt(key, sessionSocket.detach(), flowId, 30.0)
    assert b.target.recv(100) == b"hello"
    return flowId


def equalBursts(b, client) -> int:
    """
    Send bursts of equal-size datagrams through client's session: more than
    64 at once, two back to back of more bytes together than one send may
    carry (65507), and tiny ones; check that the target gets each burst
    exactly; return the bytes sent.
    """
    sent = 0
    for size, count, sends in (
        (1400, 46, 1),
        (1100, 59, 2),
        (500, 100, 1),
        (1, 128, 1),
    ):
        for _ in range(4):
            bursts = [[os.urandom(size) for _ in range(count)] for _ in range(sends)]
            for burst in bursts:
                sendBurst(client, b.address, burst)
            assert receive(b.target, count * sends) == sum(bursts, [])
            sent += size * count * sends
    return sent


@needsEngine
@needsGso
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_equalDatagramsCrossWholeWithGso(bench, host):
    """
    Bursts of equal-size datagrams from one client reach the target as the
    same datagrams, same sizes, same order, none merged or split, and are
    counted exactly, while the engine sends them with UDP GSO within the
    kernel's limits (so it never has to give GSO up for the session).
    """
    b = bench(host=host)
    c = b.client()
    flowId = openedSession(b, c)
    sent = equalBursts(b, c)
    assert b.engine.counters(flowId) == (len(b"hello") + sent, 0)
    before = b.engine.gsoSends()
    assert before > 0
    # no send the engine made was refused: the session still uses GSO
    sendBurst(c, b.address, [b"x" * 1000] * 10)
    assert receive(b.target, 10) == [b"x" * 1000] * 10
    assert b.engine.gsoSends() > before


@needsEngine
@needsGso
def test_mixedSizesCrossWhole(bench):
    """
    Runs whose datagrams change size, whose last datagram is shorter, that
    hold empty datagrams, or datagrams too big to share a send, reach the
    target as the same datagrams in the same order, counted exactly.
    """
    b = bench()
    c = b.client()
    flowId = openedSession(b, c)
    # each round fits the sockets' default buffers, sent back to back
    rounds = [
        [[1000] * 30 + [333], [700] * 10, [1400] * 10, [700] * 5 + [10]],
        [[0], [64] * 5, [0], [0], [64] * 20 + [63], [2], [3]],
        [[1200] * 46 + [1199]],
        [[33000], [33000], [2], [65000]],
    ]
    sent = len(b"hello")
    for sizes in rounds * 5:
        bursts = [[os.urandom(size) for size in burst] for burst in sizes]
        for burst in bursts:
            sendBurst(c, b.address, burst)
        expected = [datagram for burst in bursts for datagram in burst]
        assert receive(b.target, len(expected)) == expected
        sent += sum(map(len, expected))
    assert b.engine.counters(flowId) == (sent, 0)
    assert b.engine.gsoSends() > 0


@needsEngine
@needsGso
def test_withoutGsoSameDatagrams(bench):
    """
    An engine told not to use UDP GSO (gso=False, as on a kernel without
    it) forwards the same bursts exactly, one datagram per message.
    """
    b = bench(gso=False)
    c = b.client()
    flowId = openedSession(b, c)
    sent = equalBursts(b, c)
    assert b.engine.counters(flowId) == (len(b"hello") + sent, 0)
    assert b.engine.gsoSends() == 0


@needsEngine
@needsGso
def test_refusedGsoFallsBackForThatSession(bench):
    """
    A session whose socket refuses UDP GSO (SO_NO_CHECK: the kernel answers
    EINVAL) still delivers every datagram of its runs exactly, sent again
    one by one, and stops trying; another session of the same engine goes
    on with GSO.
    """
    b = bench()
    refusing, other = b.client(), b.client()
    sessionSocket = connected(b.target.getsockname()[:2])
    sessionSocket.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    refusingFlow = openedSession(b, refusing, sessionSocket)
    otherFlow = openedSession(b, other)
    sent = equalBursts(b, other)
    assert b.engine.counters(otherFlow) == (len(b"hello") + sent, 0)
    before = b.engine.gsoSends()
    assert before > 0
    sent = equalBursts(b, refusing)
    assert b.engine.counters(refusingFlow) == (len(b"hello") + sent, 0)
    assert b.engine.gsoSends() == before
    equalBursts(b, other)
    assert b.engine.gsoSends() > before


# -- a UDPListener on the engine, under a real epoll reactor ----------------


def makeListener(
    target=Target("127.0.0.1", 9), timeout=30.0, maxConnections=0
) -> Listener:
    return Listener(
        mapping="echo",
        proto="udp",
        host="127.0.0.1",
        port=0,
        target=target,
        timeouts=Timeouts(udp=timeout),
        maxConnections=maxConnections,
    )


@implementer(IHostnameResolver)
class Resolver:
    """
    Resolves every name to one address, when told to.
    """

    def __init__(self, address) -> None:
        self.address = address
        self.waiting: list = []

    def resolveHostName(
        self,
        receiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        self.waiting.append((receiver, hostName))
        return receiver

    def finish(self) -> None:
        for receiver, name in self.waiting:
            receiver.resolutionBegan(None)
            if self.address is not None:
                receiver.addressResolved(IPv4Address("UDP", self.address, 0))
            receiver.resolutionComplete()
        self.waiting = []


@pytest.fixture
def reactor(monkeypatch):
    from twisted.internet.epollreactor import EPollReactor

    # whatever the environment running the tests says
    monkeypatch.setenv("PORTPROXY_FASTPATH", "1")
    reactor = EPollReactor()
    yield reactor
    reactor.removeAll()
    reactor._poller.close()


@pytest.fixture
def logged():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(events) -> str:
    return "\n".join(
        formatEvent(e) for e in events if e.get("log_namespace") == "portproxy"
    )


def spin(reactor, done, timeout=5.0) -> None:
    """
    Run the reactor's iterations until C{done()}.
    """
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        reactor.runUntilCurrent()
        reactor.doIteration(0.05)


@pytest.fixture
def engine(reactor):
    """
    The engine the root service would own, stopped after the test.
    """
    engine = fastudp.UDPEngine(reactor) if fastudp.available() else None
    yield engine
    if engine is not None:
        engine.stop()


class Service:
    """
    A started L{UDPListener} on C{engine}, with a target.
    """

    def __init__(self, reactor, engine, **kw) -> None:
        self.target = udpSocket()
        kw.setdefault("target", Target(*self.target.getsockname()))
        self.service = UDPListener(makeListener(**kw), reactor, engine)
        assert self.service.engine is not None
        self.service.privilegedStartService()
        self.service.startService()
        self.address = self.service.port.socket.getsockname()
        self.clients: list = []

    def client(self) -> socket.socket:
        skt = udpSocket()
        self.clients.append(skt)
        return skt

    def close(self) -> None:
        if self.service.running:
            self.service.stopService()
        for skt in [self.target, *self.clients]:
            skt.close()


@pytest.fixture
def service(reactor, engine):
    made: list[Service] = []

    def make(**kw) -> Service:
        made.append(Service(reactor, engine, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


@needsEngine
def test_listenerSessionThroughEngine(reactor, service, logged):
    """
    A listener on the engine opens a session for a new client, which the
    manhole sees with the engine's counters; a kill ends it with its
    access line.
    """
    s = service()
    svc = s.service
    c = s.client()
    c.sendto(b"hello", s.address)
    spin(reactor, lambda: svc.active == 1)
    data, source = s.target.recvfrom(100)
    s.target.sendto(b"hi there", source)
    assert c.recv(100) == b"hi there"
    [flow] = svc.flows.values()
    assert isinstance(flow, EngineSession)
    assert verifyObject(IFlow, flow)
    forwarder = svc.forwarder
    assert forwarder.engine.listenerCounters(forwarder.listenerId) == (1, 0, 0)
    spin(reactor, lambda: (flow.bytesIn, flow.bytesOut) == (5, 8))
    assert (svc.bytesIn, svc.bytesOut) == (5, 8)
    flow.close("killed from the manhole")
    assert svc.active == 0
    assert "in=5 out=8 killed from the manhole" in lines(logged)
    assert (svc.bytesIn, svc.bytesOut) == (5, 8)


@needsEngine
def test_listenerTimeoutThroughEngine(reactor, service, logged):
    """
    The engine's expiry of a session writes the access line with the
    listener's reason.
    """
    s = service(timeout=0.2)
    c = s.client()
    c.sendto(b"x", s.address)
    spin(reactor, lambda: s.service.active == 1)
    spin(reactor, lambda: s.service.active == 0)
    assert "in=1 out=0 no datagram for 0.2s" in lines(logged)


@needsEngine
def test_disabledListenerRejectsNewClients(reactor, service, logged):
    """
    A disabled listener keeps its open session forwarding and rejects a
    new client's datagrams, counting them.
    """
    s = service()
    svc = s.service
    old, new = s.client(), s.client()
    old.sendto(b"old", s.address)
    spin(reactor, lambda: svc.active == 1)
    assert s.target.recv(100) == b"old"
    svc.disable()
    new.sendto(b"new", s.address)
    spin(reactor, lambda: svc.counters.rejected >= 1)
    old.sendto(b"still", s.address)
    assert s.target.recv(100) == b"still"
    assert svc.active == 1
    assert "rejected 127.0.0.1" in lines(logged) and "listener disabled" in lines(
        logged
    )
    svc.enable()
    new.sendto(b"now", s.address)
    spin(reactor, lambda: svc.active == 2)
    assert s.target.recv(100) == b"now"


@needsEngine
def test_maxConnectionsThroughEngine(reactor, service, logged):
    """
    A client over max_connections is rejected and gets no session.
    """
    s = service(maxConnections=1)
    svc = s.service
    first, second = s.client(), s.client()
    first.sendto(b"1", s.address)
    spin(reactor, lambda: svc.active == 1)
    second.sendto(b"2", s.address)
    spin(reactor, lambda: svc.counters.rejected >= 1)
    assert svc.active == 1
    assert "max_connections 1 reached" in lines(logged)


@needsEngine
def test_datagramsNotHeldCountAsDroppedThroughEngine(reactor, service):
    """
    The datagrams of a new client that the engine did not hold while the
    listener opened its session count in the listener's dropped datagrams.
    """
    from twistedproxy.udp._engine import PENDING_DATAGRAMS

    s = service()
    svc = s.service
    c = s.client()
    for i in range(PENDING_DATAGRAMS + 4):
        c.sendto(b"%02d" % i, s.address)
    time.sleep(0.1)
    spin(reactor, lambda: svc.active == 1)
    assert [s.target.recv(100) for _ in range(PENDING_DATAGRAMS)] == [
        b"%02d" % i for i in range(PENDING_DATAGRAMS)
    ]
    assert (svc.dropped, svc.counters.rejected) == (4, 0)


@needsEngine
def test_noSocketCountsDroppedThroughEngine(reactor, service, logged):
    """
    Every datagram the engine held for a client that no socket could be
    opened for counts as dropped, not rejected; the client's next datagram
    tries again.
    """
    s = service()
    svc = s.service
    opened = svc.openSessionSocket

    def outOfDescriptors(family, address, source=None):
        raise OSError(errno.EMFILE, "Too many open files")

    svc.openSessionSocket = outOfDescriptors
    c = s.client()
    c.sendto(b"a", s.address)
    c.sendto(b"b", s.address)
    time.sleep(0.05)
    spin(reactor, lambda: svc.dropped == 2)
    assert svc.active == 0 and svc.counters.rejected == 0
    assert "cannot open a socket" in lines(
        logged
    ) and "out of file descriptors" in lines(logged)
    svc.openSessionSocket = opened
    c.sendto(b"c", s.address)
    spin(reactor, lambda: svc.active == 1)
    assert s.target.recv(100) == b"c"
    assert svc.dropped == 2


@needsEngine
def test_hostNameTargetThroughEngine(reactor, service):
    """
    With a host-name target the engine holds the client's datagrams while
    the name resolves, then sends them on the session's socket.
    """
    target = udpSocket()
    resolver = Resolver(target.getsockname()[0])
    reactor.installNameResolver(resolver)
    try:
        s = service(target=Target("echo.test", target.getsockname()[1]))
        c = s.client()
        c.sendto(b"a", s.address)
        c.sendto(b"b", s.address)
        spin(reactor, lambda: s.service.active == 1)
        [flow] = s.service.flows.values()
        assert flow.resolving
        time.sleep(0.05)
        resolver.finish()
        assert [target.recv(100), target.recv(100)] == [b"a", b"b"]
        assert flow.bytesIn == 2
    finally:
        target.close()


@needsEngine
def test_unresolvableTargetThroughEngine(reactor, service, logged):
    """
    A host name that does not resolve ends the session and drops what the
    engine held; the client's next datagram tries again.
    """
    resolver = Resolver(None)
    reactor.installNameResolver(resolver)
    s = service(target=Target("nowhere.test", 9))
    c = s.client()
    c.sendto(b"abc", s.address)
    spin(reactor, lambda: s.service.active == 1)
    resolver.finish()
    assert s.service.active == 0
    assert "in=3 out=0 cannot resolve nowhere.test" in lines(logged)
    c.sendto(b"again", s.address)
    spin(reactor, lambda: len(resolver.waiting) == 1)


@needsEngine
def test_stoppedEngineLeavesListenerToPython(reactor, engine, service, logged):
    """
    A listener whose engine cannot take it (here: stopped) forwards its
    datagrams itself, and says so.
    """
    engine.stop()
    s = service()
    assert not s.service.forwarder.compiled
    assert "forwarding in Python" in lines(logged)
    c = s.client()
    c.sendto(b"py", s.address)
    spin(reactor, lambda: s.service.active == 1)
    assert s.target.recv(100) == b"py"


@needsEngine
def test_stopServiceClosesSessionsThroughEngine(reactor, service, logged):
    """
    Stopping the listener ends its sessions (listener closed) and closes
    its socket.
    """
    s = service()
    c = s.client()
    c.sendto(b"bye", s.address)
    spin(reactor, lambda: s.service.active == 1)
    port = s.service.port
    s.service.stopService()
    assert s.service.active == 0
    assert "in=3 out=0 listener closed" in lines(logged)
    assert port.socket.fileno() == -1


def _headerCases():
    from twistedproxy.proxyprotocol import SIGNATURE, Addresses, encode

    good = encode(2, Addresses(("192.0.2.1", 1), ("192.0.2.2", 2)), datagram=True)
    return [
        good + b"payload",
        SIGNATURE + b"\x20\x00\x00\x00" + b"local",
        SIGNATURE + b"\x21\x00\x00\x02ab" + b"unspec",
        good[:14] + b"\x00\x11" + bytes(17) + b"tlv",
        SIGNATURE + b"\x11\x12\x00\x0c" + bytes(12) + b"badversion",
        SIGNATURE + b"\x23\x12\x00\x0c" + bytes(12) + b"badcommand",
        SIGNATURE + b"\x21\x42\x00\x0c" + bytes(12) + b"badfamily",
        SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12) + b"badtransport",
        SIGNATURE + b"\x21\x22\x00\x0c" + bytes(12) + b"short6",
        SIGNATURE + b"\x21\x12\xff\xff" + b"truncated",
        SIGNATURE + b"\x21",
        b"no header at all",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nv1 is payload",
    ]


@needsEngine
@pytest.mark.parametrize("mode", [1, 2])
def test_headersAgreeWithPython(bench, mode):
    """
    In a session that takes (1) or refuses (2) PROXY headers, the engine
    forwards, strips and drops exactly what proxyprotocol.datagramHeader
    says, in open sessions and among the datagrams held before one opens.
    """
    from twistedproxy.proxyprotocol import HeaderError, datagramHeader

    cases = _headerCases()
    expected = []
    for data in cases:
        try:
            length, _ = datagramHeader(mode, data)
        except HeaderError:
            continue
        expected.append(data[length:])
    b = bench(gso=False)
    c = b.client()
    c.sendto(cases[0], b.address)
    [event] = nextEvents(b.engine)
    flowId = next(b.flowIds)
    skt = connected(b.target.getsockname()[:2])
    b.engine.adopt(event[2], skt.detach(), flowId, 30.0, b"", mode)
    for data in cases[1:]:
        c.sendto(data, b.address)
    b.target.settimeout(2.0)
    got = []
    try:
        while len(got) < len(expected):
            got.append(b.target.recv(65535))
    except TimeoutError:
        pass
    assert got == expected
    assert b.engine.listenerCounters(1)[1] == len(cases) - len(expected)
