"""
Who may connect: the map's C{allow} and C{deny} lists, the manhole's
run-time blocks, the per-client limits, and the one log of refusals.

Everything here works on a client's address as one integer (L{clientKey}):
IPv4 addresses are themselves, IPv4-mapped IPv6 addresses
(C{::ffff:a.b.c.d}) are the IPv4 address they carry, and other IPv6
addresses are above every IPv4 one (C{1 << 128} is added), so one sorted
list of intervals (L{AddressSet}) answers "is it in these networks" with
one bisection, whatever the number of networks.

L{twistedproxy.listener.ListenerService.admit} is the one place that asks
these questions, for every path (TCP and UDP, compiled and Python).
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from twisted.logger import Logger

from twistedproxy.model import Rate

log = Logger(namespace="portproxy")

#: Added to an IPv6 address's integer, so that it never equals an IPv4 one.
_V6 = 1 << 128
_V4_MAPPED = bytes(10) + b"\xff\xff"
_V4_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")


@lru_cache(maxsize=4096)
def clientKey(host: str) -> int:
    """
    The integer of a client's IP literal (as a socket gives it), as
    L{AddressSet} and L{ClientTable} key it.  Cached: the clients of the
    last moments come back, and each flow asks twice (admitted, counted).

    @raise OSError: when C{host} is not an IP literal.
    """
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        if packed[:12] == _V4_MAPPED:
            return int.from_bytes(packed[12:], "big")
        return int.from_bytes(packed, "big") | _V6
    return int.from_bytes(socket.inet_aton(host), "big")


def hostOf(client: str) -> str:
    """
    The host of a C{host:port} or C{[host]:port} client string.
    """
    if client[0] == "[":
        return client[1 : client.rindex("]")]
    return client[: client.rindex(":")]


def networkRange(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> tuple[int, int]:
    """
    The first and last key (L{clientKey}) of C{network}; an IPv6 network
    inside C{::ffff:0:0/96} is the IPv4 network it maps.
    """
    if network.version == 6 and network.subnet_of(_V4_MAPPED_NET):
        mask = (1 << 32) - 1
        return int(network.network_address) & mask, int(
            network.broadcast_address
        ) & mask
    offset = _V6 if network.version == 6 else 0
    return int(network.network_address) + offset, int(
        network.broadcast_address
    ) + offset


def parseNetwork(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    A CIDR (C{10.0.0.0/8}, C{2001:db8::/32}) or a single address, with
    host bits allowed (C{10.1.2.3/8} is C{10.0.0.0/8}).

    @raise ValueError: with a sentence saying what is wrong.
    """
    address, slash, length = text.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"'{text}' is not a CIDR (expected ADDRESS/LENGTH, as in 10.0.0.0/8)"
        ) from None
    if slash and (not length.isdigit() or int(length) > ip.max_prefixlen):
        raise ValueError(
            f"'{text}': the prefix length must be 0-{ip.max_prefixlen} for IPv{ip.version}"
        )
    return ipaddress.ip_network(text, strict=False)


class AddressSet:
    """
    A set of networks, asked whether a client key is in it: sorted
    disjoint intervals and one bisection per question.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, networks: Iterable) -> None:
        ranges = sorted(networkRange(n) for n in networks)
        starts: list[int] = []
        ends: list[int] = []
        for start, end in ranges:
            if ends and start <= ends[-1] + 1:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts = starts
        self._ends = ends

    def __contains__(self, key: int) -> bool:
        i = bisect_right(self._starts, key) - 1
        return i >= 0 and key <= self._ends[i]

    def __bool__(self) -> bool:
        return bool(self._starts)


class ClientTable:
    """
    Per-client state of one scope (the whole process, or one mapping):
    open flows and the token bucket of new ones, by client key.  An entry
    goes when its client has nothing open and a full bucket, so the table
    holds only clients seen within about a bucket's refill time.
    """

    def __init__(self) -> None:
        self.open: dict[int, int] = {}
        self.buckets: dict[int, list[float]] = {}
        self._swept = float("-inf")

    def opened(self, key: int) -> None:
        self.open[key] = self.open.get(key, 0) + 1

    def closed(self, key: int) -> None:
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)

    def take(self, key: int, rate: Rate, now: float) -> bool:
        """
        Take a token from C{key}'s bucket; C{False} when it is empty.
        """
        if now - self._swept >= rate.refill:
            self._sweep(rate, now)
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = [rate.burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * rate.perSecond
        if tokens > rate.burst:
            tokens = rate.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def _sweep(self, rate: Rate, now: float) -> None:
        self._swept = now
        full = [
            key
            for key, (tokens, stamp) in self.buckets.items()
            if tokens + (now - stamp) * rate.perSecond >= rate.burst
        ]
        for key in full:
            del self.buckets[key]


class ClientTables:
    """
    The L{ClientTable} of every scope, made on first use; they outlive
    reloads, so that a reload keeps counting the connections already open.
    """

    def __init__(self) -> None:
        self._tables: dict[str, ClientTable] = {}

    def get(self, scope: str) -> ClientTable:
        table = self._tables.get(scope)
        if table is None:
            table = self._tables[scope] = ClientTable()
        return table


#: The process's per-client state.
clientTables = ClientTables()


class TokenBucket:
    """
    One token bucket (a UDP session's datagrams on the Python path).
    """

    __slots__ = ("burst", "perSecond", "stamp", "tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self.perSecond = rate.perSecond
        self.burst = float(rate.burst)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.perSecond)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


@dataclass
class Blocklist:
    """
    The manhole's run-time deny list, for every listener of the process.
    It is not part of the map, so a reload leaves it alone.

    @ivar networks: the blocked networks, in the order they were blocked.
    @ivar addresses: them as an L{AddressSet}; L{None} when there are none.
    """

    networks: list = field(default_factory=list)
    addresses: AddressSet | None = None

    def block(self, network) -> bool:
        """
        Add C{network}; C{False} when it was blocked already.
        """
        if network in self.networks:
            return False
        self.networks.append(network)
        self.addresses = AddressSet(self.networks)
        return True

    def unblock(self, network) -> bool:
        """
        Remove C{network}; C{False} when it was not blocked.
        """
        if network not in self.networks:
            return False
        self.networks.remove(network)
        self.addresses = AddressSet(self.networks) if self.networks else None
        return True


#: The process's run-time blocks.
blocklist = Blocklist()


class RefusalLog:
    """
    The log of refused clients, for every listener of the process: at
    most C{limit} lines per C{interval} seconds in all, then one line
    saying how many more were refused, so that a scan of thousands of
    ports writes a handful of lines, not one per port.

    @ivar byReason: refusals since start by reason (the first word of the
        reason: C{deny}, C{allow}, C{blocked}, C{max_connections}, ...).
    """

    def __init__(self, limit: int = 10, interval: float = 1.0) -> None:
        self.limit = limit
        self.interval = interval
        self.byReason: dict[str, int] = {}
        self._windowStart = float("-inf")
        self._written = 0
        self._unwritten = 0
        self._summary = None

    def refused(
        self,
        reactor,
        proto: str,
        mapping: str,
        client: str,
        reason: str,
        count: int = 1,
    ) -> None:
        """
        Count C{count} refusals of C{client} and log one, unless the limit
        of this interval is reached; C{reactor} is the listener's.
        """
        kind = reason.partition(" ")[0]
        self.byReason[kind] = self.byReason.get(kind, 0) + count
        now = reactor.seconds()
        if now - self._windowStart >= self.interval:
            self._windowStart = now
            self._written = 0
        if self._written < self.limit:
            self._written += 1
            log.info(
                "{proto} {mapping} rejected {client}: {reason}",
                proto=proto,
                mapping=mapping,
                client=client,
                reason=reason,
            )
            return
        self._unwritten += count
        if self._summary is None:
            self._summary = reactor.callLater(
                self._windowStart + self.interval - now, self.summarize
            )

    def summarize(self) -> None:
        """
        Write how many refusals were not logged, if any.
        """
        self._summary = None
        unwritten, self._unwritten = self._unwritten, 0
        if unwritten:
            log.info("and {count} more refused", count=unwritten)


#: The process's log of refusals.
refusalLog = RefusalLog()
