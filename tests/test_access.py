"""
Unit tests of who may connect: the CIDR matcher, the token buckets, the
per-client table, the refusal log, the map keys, L{ListenerService.admit}
on both protocols' Python paths, and the manhole's block helpers.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from fakes import Harness, startedUDP, tcpListener, udpListener
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from twistedproxy.access import (
    AddressSet,
    ClientTable,
    RefusalLog,
    TokenBucket,
    clientKey,
    hostOf,
    parseNetwork,
)
from twistedproxy.admin import Console
from twistedproxy.config import ConfigError, parseMap
from twistedproxy.model import AccessPolicy, Rate

pytestmark = pytest.mark.usefixtures("recordFarewells")


def networks(*cidrs):
    return [ipaddress.ip_network(c) for c in cidrs]


# -- the matcher ------------------------------------------------------------


def test_addressSetMatchesIPv4AndIPv6():
    """
    An address set holds exactly the addresses of its IPv4 and IPv6
    networks, edges included.
    """
    s = AddressSet(networks("10.0.0.0/8", "192.0.2.128/25", "2001:db8::/32"))
    for host in (
        "10.0.0.0",
        "10.255.255.255",
        "192.0.2.128",
        "192.0.2.255",
        "2001:db8::1",
    ):
        assert clientKey(host) in s, host
    for host in (
        "9.255.255.255",
        "11.0.0.0",
        "192.0.2.127",
        "2001:db9::",
        "::1",
        "127.0.0.1",
    ):
        assert clientKey(host) not in s, host


def test_ipv4MappedClientsMatchIPv4Rules():
    """
    An IPv4-mapped IPv6 client (::ffff:a.b.c.d) matches the IPv4 networks,
    and an IPv4-mapped rule matches the IPv4 client.
    """
    s = AddressSet(networks("198.51.100.0/24"))
    assert clientKey("::ffff:198.51.100.7") in s
    assert clientKey("::ffff:198.51.101.7") not in s
    mapped = AddressSet(networks("::ffff:198.51.100.0/120"))
    assert clientKey("198.51.100.9") in mapped
    # IPv4 and IPv6 keys never collide: ::10.0.0.1 is not 10.0.0.1
    assert clientKey("::10.0.0.1") not in AddressSet(networks("10.0.0.0/8"))


def test_addressSetMergesOverlaps():
    """
    Overlapping and adjacent networks merge, so the set answers the same
    as a plain scan of its networks for random addresses.
    """
    nets = networks(
        "10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", "10.0.3.0/24", "0.0.0.0/32"
    )
    s = AddressSet(nets)
    assert len(s._starts) == 3
    rng = random.Random(7)
    for _ in range(2000):
        ip = ipaddress.IPv4Address(rng.randrange(0x0A000000 - 5, 0x0A000500))
        assert (clientKey(str(ip)) in s) == any(ip in n for n in nets)


def test_lookupIsABisection():
    """
    A lookup in 1,000 networks compares the client with about log2(1000)
    of them, not with each: the cost does not grow with the list.
    """
    # every other /24, so that none merge
    big = AddressSet(
        networks(*(f"10.{i // 125}.{i % 125 * 2}.0/24" for i in range(1000)))
    )
    assert len(big._starts) == 1000
    compared = []

    class CountingKey(int):
        def __lt__(self, other):
            compared.append(other)
            return int(self) < other

        def __le__(self, other):
            compared.append(other)
            return int(self) <= other

    for host, expected in (
        ("127.0.0.1", False),
        ("10.2.100.7", True),
        ("10.2.101.7", False),
    ):
        compared.clear()
        assert (CountingKey(clientKey(host)) in big) == expected
        assert len(compared) <= 12


def test_parseNetworkErrors():
    """
    Prefix lengths past the family's size and non-addresses are refused
    with a sentence; host bits are allowed.
    """
    with pytest.raises(ValueError, match="0-32 for IPv4"):
        parseNetwork("10.0.0.0/33")
    with pytest.raises(ValueError, match="0-128 for IPv6"):
        parseNetwork("::/129")
    with pytest.raises(ValueError, match="not a CIDR"):
        parseNetwork("example.com/8")
    assert str(parseNetwork("10.1.2.3/8")) == "10.0.0.0/8"
    assert str(parseNetwork("2001:db8::1")) == "2001:db8::1/128"


def test_hostOf():
    """
    The host of a client string, IPv6 brackets removed.
    """
    assert hostOf("192.0.2.1:80") == "192.0.2.1"
    assert hostOf("[2001:db8::1]:80") == "2001:db8::1"


# -- token buckets and the client table ---------------------------------------


def test_tokenBucketBurstThenRate():
    """
    A bucket gives its burst at once, then tokens at its rate.
    """
    clock = Clock()
    bucket = TokenBucket(Rate(2.0, 3), clock.seconds())
    assert [bucket.take(clock.seconds()) for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert bucket.take(clock.seconds())
    assert not bucket.take(clock.seconds())
    clock.advance(10)
    assert [bucket.take(clock.seconds()) for _ in range(4)] == [True, True, True, False]


def test_clientTableBucketsPerClient():
    """
    Each client has its own bucket: one over its rate leaves another's
    untouched.
    """
    clock = Clock()
    table = ClientTable()
    rate = Rate(1.0, 2)
    a, b = clientKey("127.0.0.2"), clientKey("127.0.0.3")
    assert [table.take(a, rate, clock.seconds()) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert table.take(b, rate, clock.seconds())
    clock.advance(1.0)
    assert table.take(a, rate, clock.seconds())


def test_clientTableStaysBounded():
    """
    Clients with nothing open and a full bucket are forgotten; open counts
    go when they reach zero.
    """
    clock = Clock()
    table = ClientTable()
    rate = Rate(10.0, 10)
    for i in range(5000):
        table.take(i, rate, clock.seconds())
    assert len(table.buckets) == 5000
    clock.advance(2.0)
    table.take(99999, rate, clock.seconds())
    assert list(table.buckets) == [99999]
    table.opened(1)
    table.opened(1)
    table.closed(1)
    assert table.open == {1: 1}
    table.closed(1)
    assert table.open == {}


# -- the refusal log ------------------------------------------------------------


def test_refusalLogBoundedForTheWholeProcess():
    """
    10,000 refusals in one second on 10,000 listeners write ten lines and
    one summary, and every one is counted by reason.
    """
    clock = Clock()
    log = RefusalLog(limit=10, interval=1.0)
    with capturedLogs() as events:
        for port in range(10000):
            log.refused(clock, "tcp", f"m{port}", "192.0.2.1:1", "deny list")
        clock.advance(1.0)
    lines = [e for e in events if e.get("log_namespace") == "portproxy"]
    assert len(lines) == 11
    assert lines[-1]["count"] == 9990
    assert log.byReason == {"deny": 10000}


# -- the map ------------------------------------------------------------------------


def test_mapKeysBuildThePolicy():
    """
    Lists are normalized, a mapping's list replaces the default's, rates
    take a burst, and a mapping that sets a per-client limit counts in its
    own scope while one that does not shares the process-wide one.
    """
    m = parseMap(
        "defaults:\n"
        "  deny: [10.1.2.3/8]\n"
        "  max_connections_per_client: 4\n"
        "mappings:\n"
        "  - {name: a, listen: 1000, target: 'h:1', allow: ['2001:db8::/32'],"
        " new_connections_per_client: 5/s}\n"
        "  - {name: b, listen: 1001, target: 'h:1', deny: [],"
        " datagrams_per_client: {rate: 0.5/s, burst: 4}}\n"
        "  - {name: c, listen: 1002, target: 'h:1'}\n",
        "map.yaml",
    )
    a, b, c = (m.mapping(n).listeners[0].access for n in "abc")
    assert a == AccessPolicy(
        allow=("2001:db8::/32",),
        deny=("10.0.0.0/8",),
        maxPerClient=4,
        newPerClient=Rate(5.0, 5),
        scope="a",
    )
    assert b == AccessPolicy(maxPerClient=4, datagramsPerClient=Rate(0.5, 4), scope="b")
    assert c == AccessPolicy(deny=("10.0.0.0/8",), maxPerClient=4, scope="")


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "deny: [10.0.0.0/33]",
            "deny: '10.0.0.0/33': the prefix length must be 0-32 for IPv4",
        ),
        ("allow: 10.0.0.0/8", "allow: expected a list of CIDRs"),
        ("deny: [example.com]", "deny: 'example.com' is not a CIDR"),
        (
            "new_connections_per_client: 5/minute",
            "new_connections_per_client: '5/minute' is not a rate (expected N/s",
        ),
        ("datagrams_per_client: 100", "datagrams_per_client: expected N/s"),
        (
            "max_connections_per_client: -1",
            "max_connections_per_client: must not be negative",
        ),
        (
            "new_connections_per_client: {rate: 5/s, burst: 0}",
            "new_connections_per_client.burst: must be at least 1",
        ),
        (
            "new_connections_per_client: {burst: 3}",
            "new_connections_per_client: missing key 'rate'",
        ),
    ],
)
def test_badAccessValues(line, message):
    """
    Bad lists and rates are errors with the line of the bad value.
    """
    text = f"mappings:\n  - listen: 80\n    target: db:80\n    {line}\n"
    with pytest.raises(ConfigError) as e:
        parseMap(text, "map.yaml")
    assert len(e.value.errors) == 1
    assert e.value.errors[0].startswith(f"map.yaml:4: {message}"), e.value.errors


# -- admit on the Python paths ------------------------------------------------------


def tcpHarness(**access_):
    return Harness(access=AccessPolicy(**access_))


def test_tcpDeniedClientIsReset():
    """
    A TCP client in the deny list is reset at once, never dials, and is
    counted as rejected; others are served.
    """
    h = tcpHarness(deny=("192.0.2.0/24",))
    with capturedLogs() as events:
        _, client = h.accept(IPv4Address("TCP", "192.0.2.8", 1234))
    assert client.reset
    assert h.reactor.tcpClients == []
    assert h.service.counters.rejected == 1
    assert any(e.get("reason") == "deny list" for e in events)
    _relay, client = h.accept(IPv4Address("TCP", "198.51.100.1", 1234))
    assert not client.aborted
    assert len(h.reactor.tcpClients) == 1


def test_tcpAllowListAndMappedClients():
    """
    With an allow list only its clients get in, IPv4-mapped IPv6 clients
    judged by their IPv4 address.
    """
    h = tcpHarness(allow=("198.51.100.0/24",))
    _, inside = h.accept(IPv6Address("TCP", "::ffff:198.51.100.9", 1))
    _, outside = h.accept(IPv4Address("TCP", "203.0.113.1", 1))
    assert not inside.aborted
    assert outside.reset


def test_tcpMaxConnectionsPerClient():
    """
    A client at max_connections_per_client is closed cleanly (a FIN, not
    a reset) while another client is served; when one of its connections
    ends it may connect again.
    """
    h = tcpHarness(maxPerClient=2, scope="t1")
    a = IPv4Address("TCP", "127.0.0.2", 1)
    first, _ = h.accept(a)
    h.accept(a)
    _, third = h.accept(a)
    assert third.finished and not third.aborted
    _, other = h.accept(IPv4Address("TCP", "127.0.0.3", 1))
    assert not other.aborted
    first.close("test")
    first.connectionLost(Failure(ConnectionAborted()))
    assert h.service.active == 2
    _, again = h.accept(a)
    assert not again.aborted


def test_tcpNewConnectionsPerClient():
    """
    A client over new_connections_per_client is closed cleanly until its
    bucket refills; another client is untouched.
    """
    h = tcpHarness(newPerClient=Rate(1.0, 2), scope="t2")
    a = IPv4Address("TCP", "127.0.0.2", 1)
    results = [h.accept(a)[1].finished for _ in range(3)]
    assert results == [False, False, True]
    assert not h.accept(IPv4Address("TCP", "127.0.0.3", 1))[1].aborted
    h.reactor.advance(1.0)
    assert not h.accept(a)[1].aborted


def test_perClientLimitsAcrossListenersOfAScope():
    """
    Two listeners whose policies share a scope count one client together.
    """
    policy = AccessPolicy(maxPerClient=1, scope="shared")
    h1 = Harness(access=policy)
    h2 = Harness(access=policy, port=8081)
    a = IPv4Address("TCP", "127.0.0.2", 1)
    h1.accept(a)
    assert h2.accept(a)[1].finished


def test_reconfigureAppliesToNewConnectionsOnly():
    """
    A reload that denies a client leaves its open connection alone and
    refuses its next one.
    """
    h = tcpHarness()
    _relay, client = h.accept(IPv4Address("TCP", "192.0.2.8", 1))
    h.service.reconfigure(tcpListener(access=AccessPolicy(deny=("192.0.2.0/24",))))
    assert not client.aborted and h.service.active == 1
    assert h.accept(IPv4Address("TCP", "192.0.2.8", 2))[1].reset


def test_udpDeniedAndRateLimited():
    """
    UDP on the Python path: a denied client's datagram opens no session and
    counts as rejected; a session's datagrams over datagrams_per_client are
    dropped and counted, and those of another client go on.
    """
    reactor = MemoryReactorClock()
    listener = udpListener()
    from dataclasses import replace

    listener = replace(
        listener,
        access=AccessPolicy(deny=("10.9.0.0/16",), datagramsPerClient=Rate(10.0, 2)),
    )
    service = startedUDP(listener, reactor)
    service.datagramReceived(b"x", ("10.9.1.1", 5), None)
    assert (service.active, service.counters.rejected) == (0, 1)
    for i in range(5):
        service.datagramReceived(b"%d" % i, ("10.0.0.1", 5), None)
    service.datagramReceived(b"b", ("10.0.0.2", 5), None)
    assert service.sessionPorts[0].written == [b"0", b"1"]
    assert service.sessionPorts[1].written == [b"b"]
    assert service.limited == 3
    assert service.refused == 4
    reactor.advance(0.1)
    service.datagramReceived(b"later", ("10.0.0.1", 5), None)
    assert service.sessionPorts[0].written[-1] == b"later"


def test_udpSessionsPerClient():
    """
    max_connections_per_client bounds a client's UDP sessions (one per
    source port), not other clients'.
    """
    reactor = MemoryReactorClock()
    from dataclasses import replace

    listener = replace(udpListener(), access=AccessPolicy(maxPerClient=2, scope="u"))
    service = startedUDP(listener, reactor)
    for port in (1, 2, 3):
        service.datagramReceived(b"x", ("10.0.0.1", port), None)
    service.datagramReceived(b"x", ("10.0.0.2", 1), None)
    assert service.active == 3
    assert service.counters.rejected == 1


# -- the manhole -----------------------------------------------------------------------


class FakeProxy:
    def __init__(self, services):
        self.services = services
        self.listeners = {s.listener.key: s for s in services}

    def allListeners(self):
        return iter(self.services)


def test_blockUnblockBlocked(capsys):
    """
    block() refuses new clients of a network at once on every listener,
    kill=True closes their open connections, blocked() lists the blocks
    and unblock() lets them in again.
    """
    h = tcpHarness()
    _relay, client = h.accept(IPv4Address("TCP", "198.51.100.7", 1))
    console = Console(FakeProxy([h.service]), print)
    console.block("198.51.100.0/24")
    assert h.accept(IPv4Address("TCP", "198.51.100.8", 1))[1].reset
    assert not client.aborted
    console.block("198.51.100.0/24", kill=True)
    assert client.aborted
    console.blocked()
    out = capsys.readouterr().out
    assert "blocked 198.51.100.0/24 on every listener" in out
    assert "is blocked already" in out
    assert "closed 1 open connections or sessions of 198.51.100.0/24" in out
    assert "blocked from the manhole: 198.51.100.0/24" in out
    assert "refused since start: blocked 1" in out
    console.unblock("198.51.100.0/24")
    console.unblock("198.51.100.0/24")
    console.block("10.0.0.0/33")
    out = capsys.readouterr().out
    assert "unblocked 198.51.100.0/24" in out
    assert "198.51.100.0/24 is not blocked (blocked: none)" in out
    assert "cannot block: '10.0.0.0/33'" in out
    assert not h.accept(IPv4Address("TCP", "198.51.100.8", 1))[1].aborted
