"""
What a UDP listener does, written once and run against both ways of
forwarding its datagrams (the C{udpForwarding} fixture of conftest.py): in
Python, and through the compiled engine; on real loopback sockets under a
private epoll reactor.  What only one way has is tested in test_udp.py
(Python, with fakes) and test_fastudp.py (the engine).
"""

from __future__ import annotations

import errno
import os
import select
import time

import pytest
from fakes import FakeResolver, messages
from support import udpSocket
from twisted.internet.address import IPv4Address, IPv6Address
from zope.interface.verify import verifyObject

from twistedproxy.listener import IFlow
from twistedproxy.model import AccessPolicy, Rate, Target


def text(logged) -> str:
    return "\n".join(messages(logged))


def test_sessionsCarryDatagramsAndReplies(udpForwarding):
    """
    A client's first datagram opens a session (an open flow) whose socket
    carries it to the target; its later datagrams use that session and
    the target's replies reach it from the listening address; another
    client gets a session and a socket of its own; both are counted.
    """
    f = udpForwarding
    s = f.listen()
    svc = s.service
    a, b = s.client(), s.client()
    a.sendto(b"hello", s.address)
    data, sourceA = f.receive(s.target)
    assert data == b"hello"
    [flow] = svc.flows.values()
    verifyObject(IFlow, flow)
    assert flow.client == f"127.0.0.1:{a.getsockname()[1]}"
    s.target.sendto(b"hi there", sourceA)
    assert f.receive(a) == (b"hi there", s.address)
    a.sendto(b"again", s.address)
    assert f.receive(s.target) == (b"again", sourceA)
    b.sendto(b"b1", s.address)
    data, sourceB = f.receive(s.target)
    assert data == b"b1" and sourceB != sourceA
    s.target.sendto(b"for b", sourceB)
    assert f.receive(b) == (b"for b", s.address)
    f.spin(lambda: (flow.bytesIn, flow.bytesOut) == (10, 8), what="a's counters")
    assert (svc.active, svc.counters.total) == (2, 2)
    f.spin(lambda: (svc.bytesIn, svc.bytesOut) == (12, 13), what="the counters")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_largestDatagramWholeBothWays(udpForwarding, host):
    """
    A 65507-byte datagram crosses a session whole in both directions, over
    IPv4 and IPv6.
    """
    f = udpForwarding
    s = f.listen(host=host)
    c = s.client(host)
    big = os.urandom(65507)
    c.sendto(big, s.address)
    data, source = f.receive(s.target)
    assert data == big
    s.target.sendto(big[::-1], source)
    reply, where = f.receive(c)
    assert (reply, where[:2]) == (big[::-1], s.address)


def test_wildcardSessionPerLocalAddress(udpForwarding):
    """
    On a listener bound to 0.0.0.0, one client sending to two local
    addresses has two sessions, each answering from the address it was
    sent to.
    """
    f = udpForwarding
    s = f.listen(host="0.0.0.0")
    port = s.address[1]
    c = s.client()
    sources = {}
    for local in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
        c.sendto(local.encode(), (local, port))
        data, source = f.receive(s.target)
        assert data == local.encode()
        sources.setdefault(local, source)
        assert source == sources[local]
        s.target.sendto(b"from " + data, source)
        assert f.receive(c) == (b"from " + data, (local, port))
    assert len(set(sources.values())) == 2
    assert s.service.active == 2


def test_wildcardIPv6AnswersFromAddressUsed(udpForwarding):
    """
    On a listener bound to ::, the reply to a ::1 client leaves from ::1.
    """
    f = udpForwarding
    s = f.listen(host="::")
    c = s.client("::1")
    c.sendto(b"six", ("::1", s.address[1]))
    data, source = f.receive(s.target)
    assert data == b"six"
    s.target.sendto(b"back", source)
    reply, (host, port, *_) = f.receive(c)
    assert (reply, host, port) == (b"back", "::1", s.address[1])


def test_sessionExpiresAfterTimeout(udpForwarding, logged):
    """
    A session with no datagram either way for its udp timeout is ended, not
    before, with its socket closed and an access line; the client's next
    datagram opens a new session.
    """
    f = udpForwarding
    s = f.listen(timeout=0.3)
    svc = s.service
    c = s.client()
    c.sendto(b"ping", s.address)
    sent = time.monotonic()
    assert f.receive(s.target)[0] == b"ping"
    [flow] = svc.flows.values()
    f.spin(lambda: svc.active == 0, what="the session's expiry")
    assert time.monotonic() - sent >= 0.3
    assert f.released(svc, flow)
    assert "in=4 out=0 no datagram for 0.3s" in text(logged)
    c.sendto(b"again", s.address)
    assert f.receive(s.target)[0] == b"again"
    assert (svc.active, svc.counters.total) == (1, 2)


def test_activityEitherWayDelaysExpiry(udpForwarding):
    """
    Datagrams from the client and replies from the target, each within the
    timeout of the one before, keep a session open past twice its timeout;
    quiet, it ends one timeout after the last.
    """
    f = udpForwarding
    s = f.listen(timeout=0.6)
    svc = s.service
    c = s.client()
    c.sendto(b"ping", s.address)
    _, source = f.receive(s.target)
    started = time.monotonic()
    while time.monotonic() - started < 1.3:
        f.spinFor(0.15)  # paces the traffic
        s.target.sendto(b"pong", source)
        assert f.receive(c)[0] == b"pong"
        f.spinFor(0.15)
        c.sendto(b"ping", s.address)
        assert f.receive(s.target)[0] == b"ping"
        assert svc.active == 1
    last = time.monotonic()
    f.spin(lambda: svc.active == 0, what="the session's expiry")
    assert time.monotonic() - last >= 0.6
    assert svc.counters.total == 1


def test_maxConnections(udpForwarding, logged):
    """
    A client whose datagrams would open a session beyond max_connections is
    rejected, each datagram counted, and gets no session; the open session
    carries on, and the client gets in once that one ended.
    """
    f = udpForwarding
    s = f.listen(maxConnections=1)
    svc = s.service
    first, second = s.client(), s.client()
    first.sendto(b"1", s.address)
    assert f.receive(s.target)[0] == b"1"
    second.sendto(b"2", s.address)
    second.sendto(b"2", s.address)
    f.spin(lambda: svc.counters.rejected == 2, what="two rejections")
    first.sendto(b"1 again", s.address)
    # a session of the second client would have sent its datagrams first
    assert f.receive(s.target)[0] == b"1 again"
    assert (svc.active, svc.counters.total) == (1, 1)
    assert "max_connections 1 reached" in text(logged)
    [flow] = svc.flows.values()
    flow.close("killed")
    second.sendto(b"3", s.address)
    assert f.receive(s.target)[0] == b"3"
    assert (svc.active, svc.counters.total, svc.counters.rejected) == (1, 2, 2)


def test_disabledListenerKeepsSessions(udpForwarding, logged):
    """
    A disabled listener rejects and counts a new client's datagrams while
    its open session goes on; enabled again, it opens sessions.
    """
    f = udpForwarding
    s = f.listen()
    svc = s.service
    old, new = s.client(), s.client()
    old.sendto(b"old", s.address)
    assert f.receive(s.target)[0] == b"old"
    svc.disable()
    new.sendto(b"new", s.address)
    f.spin(lambda: svc.counters.rejected == 1, what="a rejection")
    old.sendto(b"still", s.address)
    assert f.receive(s.target)[0] == b"still"
    assert svc.active == 1 and svc.port.socket.fileno() != -1
    assert "rejected 127.0.0.1" in text(logged)
    assert "listener disabled" in text(logged)
    svc.enable()
    new.sendto(b"now", s.address)
    assert f.receive(s.target)[0] == b"now"
    assert svc.active == 2


def test_kill(udpForwarding, logged):
    """
    Closing a session (the manhole's kill) closes its socket and ends the
    flow once, with the reason given and its counters; the client's next
    datagram opens a new session.
    """
    f = udpForwarding
    s = f.listen()
    svc = s.service
    c = s.client()
    c.sendto(b"abc", s.address)
    _, source = f.receive(s.target)
    s.target.sendto(b"hi", source)
    assert f.receive(c)[0] == b"hi"
    [flow] = svc.flows.values()
    f.spin(lambda: (flow.bytesIn, flow.bytesOut) == (3, 2), what="the counters")
    flow.close("killed")
    flow.close("killed twice")
    assert svc.active == 0 and f.released(svc, flow)
    assert (svc.bytesIn, svc.bytesOut) == (3, 2)
    assert sum("killed" in m for m in messages(logged)) == 1
    assert "in=3 out=2 killed" in text(logged)
    c.sendto(b"d", s.address)
    assert f.receive(s.target)[0] == b"d"
    [again] = svc.flows.values()
    assert again.id != flow.id


def test_outOfFileDescriptors(udpForwarding, logged):
    """
    When no socket can be opened for a new session, the client's datagrams
    are dropped, counted as dropped (not rejected) and logged; the open
    session goes on, and the client gets a session once descriptors are
    free again.
    """
    f = udpForwarding
    s = f.listen()
    svc = s.service
    a, b = s.client(), s.client()
    a.sendto(b"a", s.address)
    assert f.receive(s.target)[0] == b"a"
    f.failSessionSockets(OSError(errno.EMFILE, "Too many open files"))
    b.sendto(b"b1", s.address)
    b.sendto(b"b2", s.address)
    f.spin(lambda: svc.dropped == 2, what="two dropped datagrams")
    a.sendto(b"a2", s.address)
    assert f.receive(s.target)[0] == b"a2"
    assert (svc.active, svc.counters.rejected) == (1, 0)
    assert any(
        "out of file descriptors" in m and f"127.0.0.1:{b.getsockname()[1]}" in m
        for m in messages(logged)
    )
    f.failSessionSockets(None)
    b.sendto(b"b3", s.address)
    assert f.receive(s.target)[0] == b"b3"
    assert (svc.active, svc.dropped) == (2, 2)


def test_hostNameResolvedWhenSessionOpens(udpForwarding):
    """
    A host-name target is resolved without blocking when a session opens;
    the client's datagrams meanwhile are held up to a bound, then sent in
    order on the session's socket (here IPv6); those beyond the bound count
    in the session's bytes and as dropped.
    """
    f = udpForwarding
    resolver = FakeResolver()
    f.reactor.installNameResolver(resolver)
    s = f.listen(targetName="backend.test")
    port = s.target.getsockname()[1]
    target = udpSocket(address=("::1", port))
    s.sockets.append(target)
    svc = s.service
    c = s.client()
    count = f.held + 3
    for i in range(count):
        c.sendto(b"%02d" % i, s.address)
    f.spin(lambda: resolver.asked, what="the question")
    [(_, name, asked, semantics)] = resolver.asked
    assert (name, asked, semantics) == ("backend.test", port, "UDP")
    assert svc.active == 1
    f.readEmpty(s)
    assert svc.dropped == 0
    # the port is the map's, whatever the answer says
    resolver.answer(0, IPv6Address("UDP", "::1", 1))
    got = [f.receive(target)[0] for _ in range(f.held)]
    assert got == [b"%02d" % i for i in range(f.held)]
    c.sendto(b"later", s.address)
    assert f.receive(target)[0] == b"later"
    assert svc.dropped == 3
    [flow] = svc.flows.values()
    f.spin(lambda: flow.bytesIn == 2 * count + 5, what="the session's bytes")


def test_unresolvableTargetEndsSession(udpForwarding, logged):
    """
    A target host name that does not resolve ends the session, with a
    reason naming it and every datagram of the client in its bytes and
    nowhere else; the client's next datagram asks again.
    """
    f = udpForwarding
    resolver = FakeResolver()
    f.reactor.installNameResolver(resolver)
    s = f.listen(targetName="nowhere.test")
    svc = s.service
    c = s.client()
    for _ in range(f.held + 3):
        c.sendto(b"abc", s.address)
    f.spin(lambda: resolver.asked, what="the question")
    f.readEmpty(s)
    resolver.answer(0)
    assert svc.active == 0
    line = f"in={3 * (f.held + 3)} out=0 cannot resolve nowhere.test"
    assert line in text(logged)
    assert (svc.dropped, svc.counters.rejected) == (0, 0)
    c.sendto(b"again", s.address)
    f.spin(lambda: len(resolver.asked) == 2, what="the second question")


def test_resolutionAfterKillIgnored(udpForwarding):
    """
    A resolution finishing after its session was closed opens no socket.
    """
    f = udpForwarding
    resolver = FakeResolver()
    f.reactor.installNameResolver(resolver)
    s = f.listen(targetName="backend.test")
    c = s.client()
    c.sendto(b"a", s.address)
    f.spin(lambda: resolver.asked, what="the question")
    [flow] = s.service.flows.values()
    flow.close("killed")
    f.failSessionSockets(AssertionError("a session socket was opened"))
    resolver.answer(0, IPv4Address("UDP", "127.0.0.1", 0))
    assert s.service.active == 0
    f.nothingArrives(s.target)


def test_staleRefusalRetried(udpForwarding):
    """
    The first datagram sent after the target starts listening, which may
    meet the ICMP error left by the one before, arrives, and so does the
    reply.
    """
    f = udpForwarding
    gone = udpSocket()
    address = gone.getsockname()
    gone.close()
    s = f.listen(target=Target(*address))
    c = s.client()
    c.sendto(b"1", s.address)
    f.spin(lambda: s.service.active == 1, what="the session")
    # lets the ICMP error of the first datagram come back: its arrival
    # cannot be seen without taking it from the socket
    f.spinFor(0.1)
    target = udpSocket(address=address)
    s.sockets.append(target)
    c.sendto(b"2", s.address)
    data, source = f.receive(target)
    assert data == b"2"
    target.sendto(b"welcome", source)
    assert f.receive(c)[0] == b"welcome"
    assert s.service.active == 1


def test_staleRefusalPendingAtTheFirstSend(udpForwarding):
    """
    A session socket that holds the ICMP port-unreachable error of a
    datagram sent before its target listened (left there by the test)
    still carries the client's first datagram, and the reply comes back:
    the send that meets the stale error is retried, or the error is read
    off the socket first, and the session stays open.
    """
    f = udpForwarding
    gone = udpSocket()
    address = gone.getsockname()
    gone.close()
    targets = []

    def leaveStaleError(skt):
        skt.send(b"nobody there")
        # the error pending on the socket makes it readable
        assert select.select([skt], [], [], 5)[0], "no ICMP error came back"
        targets.append(udpSocket(address=address))
        return skt

    f.wrapSessionSockets(leaveStaleError)
    s = f.listen(target=Target(*address))
    c = s.client()
    c.sendto(b"first", s.address)
    f.spin(lambda: targets, what="the session socket")
    [target] = targets
    s.sockets.append(target)
    data, source = f.receive(target)
    assert data == b"first"
    target.sendto(b"welcome", source)
    assert f.receive(c)[0] == b"welcome"
    assert s.service.active == 1


def test_stopServiceClosesEverything(udpForwarding, logged):
    """
    Stopping the listener closes its socket and every session, each with
    an access line, and leaves nothing scheduled.
    """
    f = udpForwarding
    s = f.listen()
    svc = s.service
    a, b = s.client(), s.client()
    for c in (a, b):
        c.sendto(b"bye", s.address)
        f.receive(s.target)
    flows = list(svc.flows.values())
    port = svc.port
    svc.stopService()
    assert svc.active == 0 and not svc.bound
    assert port.socket.fileno() == -1
    assert all(f.released(svc, flow) for flow in flows)
    assert text(logged).count("in=3 out=0 listener closed") == 2
    assert f.reactor.getDelayedCalls() == []


def test_datagramsPerClient(udpForwarding):
    """
    A session forwards its datagrams_per_client burst (the datagrams held
    while it opens included) and drops the rest, counted as limited; once
    the bucket refilled it forwards again; another client's session is not
    limited by it.
    """
    f = udpForwarding
    s = f.listen(access=AccessPolicy(datagramsPerClient=Rate(2.0, 4)))
    svc = s.service
    c, other = s.client(), s.client()
    c.sendto(b"h1", s.address)
    c.sendto(b"h2", s.address)
    assert f.receive(s.target)[0] == b"h1"
    for i in range(10):
        c.sendto(b"d%d" % i, s.address)
    other.sendto(b"o", s.address)
    received = [b"h1"]
    while b"o" not in received:
        received.append(f.receive(s.target)[0])
    f.nothingArrives(s.target)
    assert sorted(received) == [b"d0", b"d1", b"h1", b"h2", b"o"]
    f.spin(lambda: svc.refused == 8, what="eight limited datagrams")
    f.spinFor(0.6)  # the bucket refills: one datagram's worth at 2 a second
    c.sendto(b"later", s.address)
    assert f.receive(s.target)[0] == b"later"
    assert svc.counters.total == 2
