"""
Tests of the compiled UDP engine (L{twistedproxy.udp._engine}) on real
loopback sockets, and of a L{UDPListener} that uses it under a real epoll
reactor (not the global one).
"""

from __future__ import annotations

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
from fakes import messages
from support import proxyEnvironment, queueEmpty, udpSocket, waitUntil

from twistedproxy.udp import engine as fastudp

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
    from fakes import udpListener
    from twisted.internet.testing import MemoryReactorClock

    from twistedproxy.udp.listener import UDPListener

    service = UDPListener(udpListener(), MemoryReactorClock())
    assert not service.forwarder.compiled


# -- the engine itself -------------------------------------------------------


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
        self, host="127.0.0.1", pktinfo=False, listenHost=None, gso=True, **options
    ) -> None:
        from twistedproxy.udp._engine import UDPEngine

        self.engine = UDPEngine(gso=gso, **options)
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
        kind, listenerId, key, _ = event
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
    waitUntil(lambda: queueEmpty(b.listening), what="the datagrams read")
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
def test_rateWithoutBurstRefused(bench):
    """
    A session rate with no burst is refused with ValueError.
    """
    b = bench()
    c = b.client()
    c.sendto(b"x", b.address)
    [event] = nextEvents(b.engine)
    with pytest.raises(ValueError):
        b.engine.adopt(event[2], 0, 99, 30.0, b"", 0, 5.0, 0)


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
    waitUntil(lambda: queueEmpty(b.listening), what="the datagrams read")
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
    waitUntil(lambda: queueEmpty(b.listening), what="the datagrams read")
    assert b.engine.dropPending(event[2]) == (2, 3)
    assert b.engine.dropPending(event[2]) == (0, 0)
    assert b.engine.listenerCounters(1) == (0, 0, 0)
    c.sendto(b"c", b.address)
    assert nextEvents(b.engine)[0][2] == event[2]


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
    waitUntil(lambda: select.select([b.listening], [], [], 0)[0], what="the datagram")
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
        waitUntil(
            lambda: select.select([sink], [], [], 0)[0], what="the flood at the sink"
        )
        b.target.settimeout(0.3)
        arrived = 0
        for _ in range(30):
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
            assert receive(b.target, count * sends) == [
                d for burst in bursts for d in burst
            ]
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
#
# What the listener does on both paths is in test_udpforwarding.py.

onEngine = pytest.mark.parametrize("udpForwarding", ["engine"], indirect=True)


@onEngine
def test_datagramsNotHeldCountAsDroppedThroughEngine(udpForwarding):
    """
    The datagrams of a new client that the engine did not hold while the
    listener opened its session count in the listener's dropped datagrams.
    """
    from twistedproxy.udp._engine import PENDING_DATAGRAMS

    f = udpForwarding
    s = f.listen()
    svc = s.service
    c = s.client()
    for i in range(PENDING_DATAGRAMS + 4):
        c.sendto(b"%02d" % i, s.address)
    # the engine reads them all before the listener hears of the client
    waitUntil(lambda: queueEmpty(svc.port.socket), what="the datagrams read")
    got = [f.receive(s.target)[0] for _ in range(PENDING_DATAGRAMS)]
    assert got == [b"%02d" % i for i in range(PENDING_DATAGRAMS)]
    assert (svc.dropped, svc.counters.rejected) == (4, 0)


@onEngine
def test_stoppedEngineLeavesListenerToPython(udpForwarding, logged):
    """
    A listener whose engine cannot take it (here: stopped) forwards its
    datagrams itself, and says so.
    """
    f = udpForwarding
    f.udpEngine.stop()
    s = f.listen(engine=False)
    assert "forwarding in Python" in "\n".join(messages(logged))
    c = s.client()
    c.sendto(b"py", s.address)
    assert f.receive(s.target)[0] == b"py"
    assert s.service.active == 1


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


@needsEngine
def test_burstOfRepliesCrossesInOrder(bench):
    """
    More replies than one read takes (DRAIN) sent at once by the target
    all reach the client, in order and whole, from the listening address,
    and the session's counter has every byte of them.
    """
    from twistedproxy.udp._engine import DRAIN

    b = bench()
    c = b.client()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    flowId = openedSession(b, c)
    c.sendto(b"go", b.address)
    _, session = b.target.recvfrom(100)
    replies = [b"reply %d " % i + b"x" * (i % 50) for i in range(3 * DRAIN + 5)]
    for data in replies:
        b.target.sendto(data, session)
    assert [c.recvfrom(200) for _ in replies] == [(d, b.address) for d in replies]
    waitUntil(
        lambda: b.engine.counters(flowId) == (7, sum(map(len, replies))),
        what="the replies counted",
    )


@needsEngine
def test_icmpErrorLeavesSessionRelaying(bench):
    """
    A session whose target stopped listening (its socket gets the ICMP
    error of the datagram sent there) goes on: once a target listens at
    that address again, its reply reaches the client and the client's next
    datagram reaches it.
    """
    b = bench()
    # a second listener, whose removal waits for the engine thread's batch
    # in progress to end
    other = listeningSocket()
    b.opened.append(other)
    b.engine.addListener(other.fileno(), 2, False)
    c = b.client()
    flowId = openedSession(b, c)
    c.sendto(b"first", b.address)
    _, sessionAddress = b.target.recvfrom(100)
    address = b.target.getsockname()[:2]
    b.target.close()
    c.sendto(b"lost", b.address)
    waitUntil(lambda: b.engine.counters(flowId)[0] == 14, what="the datagram read")
    # the batch that read it has sent it (nothing listens: an ICMP error
    # on the session's socket) once it is over
    b.engine.removeListener(2)
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(address)
    target.settimeout(5)
    b.opened.append(target)
    target.sendto(b"late reply", sessionAddress)
    assert c.recvfrom(100) == (b"late reply", b.address)
    c.sendto(b"again", b.address)
    received = target.recv(100)
    if received == b"lost":
        # the kernel had not yet delivered it when the target came back
        received = target.recv(100)
    assert received == b"again"
