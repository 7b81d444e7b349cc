"""
The proxy map as frozen values.

L{twistedproxy.config} turns a YAML file into a L{ProxyMap}; everything
after it (the reload plan, the listener services, the manhole) reads these
values and never the YAML.  Values are immutable so that a reload can build
a complete new map beside the running one and compare the two.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from twistedproxy.access import AddressSet

TCP = "tcp"
UDP = "udp"
PROTOCOLS = (TCP, UDP)

#: Wildcard hosts used for a listen address given without a host.
ANY_IPV4 = "0.0.0.0"
ANY_IPV6 = "::"


def formatHostPort(host: str, port: int) -> str:
    """
    Render C{host:port}, bracketing IPv6 literals (C{[::1]:53}).
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class ListenerKey(NamedTuple):
    """
    What identifies a listener across reloads: protocol, address and port.
    """

    proto: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.proto} {formatHostPort(self.host, self.port)}"


@dataclass(frozen=True, init=False)
class Target:
    """
    Where a listener forwards to: an IP literal or a host name (resolved
    when a connection or session starts), and a port.
    """

    host: str
    port: int

    def __init__(self, host: str, port: int) -> None:
        # A big map builds one per listener; see Listener.__init__.
        self.__dict__.update(host=host, port=port)

    def __str__(self) -> str:
        return formatHostPort(self.host, self.port)


@dataclass(frozen=True)
class Timeouts:
    """
    Per-mapping timeouts, in seconds.

    @ivar connect: TCP: give up connecting to the target after this long.
    @ivar idle: TCP: close when neither side sent anything this long; 0 is
        never.
    @ivar udp: UDP: end a client's session after this long without a
        datagram in either direction.
    """

    connect: float = 10.0
    idle: float = 0.0
    udp: float = 90.0


#: The values of C{client_address}.
PROXY_PROTOCOL_V1 = "proxy_protocol_v1"
PROXY_PROTOCOL_V2 = "proxy_protocol_v2"
TRANSPARENT = "transparent"
CLIENT_ADDRESS_MODES = (PROXY_PROTOCOL_V1, PROXY_PROTOCOL_V2, TRANSPARENT)


@dataclass(frozen=True)
class ClientIdentity:
    """
    Who a listener takes the client to be, and how the target learns it.

    @ivar clientAddress: C{client_address}: how the target learns the
        client's address (L{PROXY_PROTOCOL_V1}, L{PROXY_PROTOCOL_V2},
        L{TRANSPARENT}), or C{""}: it does not, it sees the proxy.
    @ivar acceptProxyProtocol: C{accept_proxy_protocol}: the networks
        (CIDR text, normalised) whose PROXY headers are taken as the
        client's address.
    """

    clientAddress: str = ""
    acceptProxyProtocol: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.clientAddress or self.acceptProxyProtocol)

    @cached_property
    def _networks(self) -> AddressSet:
        return _addressSet(self.acceptProxyProtocol)

    def trusts(self, host: str) -> bool:
        """
        Whether C{host} (an IP literal) may send PROXY headers: matched as
        the allow and deny lists match, so an IPv4-mapped IPv6 client
        matches its IPv4 network.
        """
        from twistedproxy.access import clientKey

        try:
            return clientKey(host) in self._networks
        except OSError:
            return False

    @property
    def proxyProtocolVersion(self) -> int:
        """
        The PROXY protocol version to send: 1, 2, or 0 for none.
        """
        if self.clientAddress == PROXY_PROTOCOL_V1:
            return 1
        if self.clientAddress == PROXY_PROTOCOL_V2:
            return 2
        return 0

    @property
    def transparent(self) -> bool:
        return self.clientAddress == TRANSPARENT


@dataclass(frozen=True)
class KeyPair:
    """
    A certificate (PEM, the leaf first, then its chain) and its private key,
    as read from their files when the map was loaded: a reload that finds
    other bytes in the files makes a different value, so the listener is
    reconfigured and new connections use the new pair.
    """

    cert: str
    key: str
    certPem: bytes = field(default=b"", repr=False)
    keyPem: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class ServerTLS:
    """
    C{tls:}: the proxy terminates TLS from its clients.

    @ivar default: the certificate for clients whose server name (SNI)
        matches none of C{byName}, or who send none.
    @ivar byName: C{(name, pair)} in map order; a name is exact or
        C{*.suffix} (see L{twistedproxy.tls.matchName}).
    @ivar clientCA: PEM of the CAs client certificates must chain to;
        L{None}: clients are not asked for one.
    @ivar minVersion: C{"1.2"} or C{"1.3"}.
    """

    default: KeyPair
    byName: tuple[tuple[str, KeyPair], ...] = ()
    clientCA: str | None = None
    clientCAPem: bytes | None = field(default=None, repr=False)
    minVersion: str = "1.2"


@dataclass(frozen=True)
class TargetTLS:
    """
    C{target_tls:}: the proxy speaks TLS to the target.

    @ivar ca: PEM of the CAs the target's certificate must chain to;
        L{None}: the system's trust store.
    @ivar serverName: the name sent (SNI) and checked against the
        target's certificate; L{None}: the target's host as written.
    @ivar verify: C{False} accepts any certificate (C{check} warns).
    @ivar client: the proxy's own certificate for targets that ask for one.
    """

    ca: str | None = None
    caPem: bytes | None = field(default=None, repr=False)
    serverName: str | None = None
    verify: bool = True
    client: KeyPair | None = None
    minVersion: str = "1.2"


@dataclass(frozen=True)
class TLSSettings:
    """
    Everything TLS of one listener: what it terminates, what it
    originates, and its SNI passthrough routes (C{(name, target)} in map
    order; the listener's own target is the default route).
    """

    terminate: ServerTLS | None = None
    originate: TargetTLS | None = None
    sniRoutes: tuple[tuple[str, Target], ...] = ()


@dataclass(frozen=True)
class Rate:
    """
    A token bucket's settings: C{perSecond} tokens are added each second,
    up to C{burst}.
    """

    perSecond: float
    burst: int

    @cached_property
    def refill(self) -> float:
        """
        Seconds an empty bucket takes to fill, and at least one: how often
        a table of buckets forgets the full ones.
        """
        return max(1.0, self.burst / self.perSecond)

    def __str__(self) -> str:
        return f"{self.perSecond:g}/s (burst {self.burst})"


@dataclass(frozen=True)
class AccessPolicy:
    """
    Who may connect to a listener, from the map.

    @ivar allow: CIDRs (normalized text); when not empty, only clients in
        one of them may connect.
    @ivar deny: CIDRs whose clients may not connect; deny wins over allow.
    @ivar maxPerClient: TCP connections plus UDP sessions one client
        address may have open at once in C{scope}; 0 is unlimited.
    @ivar newPerClient: new TCP connections plus UDP sessions of one client
        address in C{scope}, or L{None} for unlimited.
    @ivar datagramsPerClient: datagrams from the client of one UDP session
        to its target, or L{None} for unlimited.
    @ivar scope: whose per-client counts the limits use: C{""} for the
        process-wide ones of C{defaults}, or the name of the mapping that
        sets its own.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    maxPerClient: int = 0
    newPerClient: Rate | None = None
    datagramsPerClient: Rate | None = None
    scope: str = ""

    @cached_property
    def allowed(self) -> AddressSet | None:
        """
        The C{allow} list as an L{AddressSet}; L{None} lets everyone in.
        """
        if not self.allow:
            return None
        return _addressSet(self.allow)

    @cached_property
    def denied(self) -> AddressSet | None:
        if not self.deny:
            return None
        return _addressSet(self.deny)

    @property
    def perClient(self) -> bool:
        """
        Whether a per-client limit on connections or sessions is set.
        """
        return self.maxPerClient > 0 or self.newPerClient is not None


#: Nobody refused, nothing limited.
OPEN = AccessPolicy()


def _addressSet(cidrs: tuple[str, ...]):
    from twistedproxy.access import AddressSet

    return AddressSet(ipaddress.ip_network(c) for c in cidrs)


@dataclass(frozen=True, init=False)
class Listener:
    """
    One listening socket and where it forwards to.

    @ivar mapping: the name of the mapping this listener belongs to.
    @ivar maxConnections: TCP connections or UDP sessions at once; 0 is
        unlimited.
    @ivar identity: who the client is and how the target learns it.
    @ivar access: who may connect, and the per-client limits.
    @ivar line: the map line the mapping starts on, for messages; not part
        of the value.
    @ivar tls: TLS termination, origination or SNI routing; L{None} for
        plain TCP (and always for UDP).
    """

    mapping: str
    proto: str
    host: str
    port: int
    target: Target
    timeouts: Timeouts = Timeouts()
    maxConnections: int = 0
    identity: ClientIdentity = ClientIdentity()
    access: AccessPolicy = OPEN
    line: int = field(default=0, compare=False)
    tls: TLSSettings | None = None

    def __init__(
        self,
        mapping: str,
        proto: str,
        host: str,
        port: int,
        target: Target,
        timeouts: Timeouts = Timeouts(),
        maxConnections: int = 0,
        identity: ClientIdentity = ClientIdentity(),
        access: AccessPolicy = OPEN,
        line: int = 0,
        tls: TLSSettings | None = None,
    ) -> None:
        # What the dataclass would write, at once: a frozen dataclass sets
        # each field with its own object.__setattr__ call, three times as
        # long, and a big map builds 100,000 listeners or more.
        self.__dict__.update(
            mapping=mapping,
            proto=proto,
            host=host,
            port=port,
            target=target,
            timeouts=timeouts,
            maxConnections=maxConnections,
            identity=identity,
            access=access,
            line=line,
            tls=tls,
        )

    @property
    def key(self) -> ListenerKey:
        return ListenerKey(self.proto, self.host, self.port)

    @property
    def listen(self) -> str:
        """
        The listen address as C{host:port}.
        """
        return formatHostPort(self.host, self.port)

    def __str__(self) -> str:
        return f"{self.key} -> {self.target} [{self.mapping}]"

    @cached_property
    def accessLineParts(self) -> tuple[str, str]:
        """
        What an access line of this listener has around the client's
        address: C{("tcp web ", " -> 10.0.0.2:80 ")}.
        """
        return f"{self.proto} {self.mapping} ", f" -> {self.target} "


@dataclass(frozen=True, init=False)
class Mapping:
    """
    One named entry of the map; a range or C{[tcp, udp]} gives it several
    listeners.
    """

    name: str
    listeners: tuple[Listener, ...]
    line: int = field(default=0, compare=False)

    def __init__(
        self, name: str, listeners: tuple[Listener, ...], line: int = 0
    ) -> None:
        # See Listener.__init__.
        self.__dict__.update(name=name, listeners=listeners, line=line)


@dataclass(frozen=True)
class Manhole:
    """
    The SSH admin shell's settings.

    @ivar loginGraceTime: seconds from accept a connection has to
        authenticate, as sshd's C{LoginGraceTime}.
    @ivar maxStartups: connections not yet authenticated at once; more are
        closed at accept (sshd's C{MaxStartups}); 0 is unlimited.
    """

    host: str
    port: int
    authorizedKeys: str
    hostKey: str
    allowRemote: bool = False
    loginGraceTime: float = 30.0
    maxStartups: int = 10
    line: int = field(default=0, compare=False)

    @property
    def listen(self) -> str:
        return formatHostPort(self.host, self.port)


#: Where the control socket is when the map's C{control} section does not
#: say, and where the docker-proxy shim looks for it.
DEFAULT_CONTROL_SOCKET = "/run/portproxy/control.sock"


@dataclass(frozen=True)
class Control:
    """
    The unix control socket through which local programs (the Docker
    shim) publish mappings at run time.

    @ivar socket: its absolute path.
    @ivar mode: the socket file's permission bits.
    """

    socket: str = DEFAULT_CONTROL_SOCKET
    mode: int = 0o600
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Http:
    """
    The HTTP endpoint's settings: C{/metrics}, C{/healthz} and the status
    page.
    """

    host: str
    port: int
    allowRemote: bool = False
    line: int = field(default=0, compare=False)

    @property
    def listen(self) -> str:
        return formatHostPort(self.host, self.port)


#: The values of the map's C{log_format}.
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ProxyMap:
    """
    A whole, valid map file.
    """

    path: str
    mappings: tuple[Mapping, ...] = ()
    manhole: Manhole | None = None
    http: Http | None = None
    logFormat: str = "text"
    #: C{FILE:LINE: warning: ...} lines about a valid map (a TLS check
    #: turned off, a key file others can read); C{check} prints them and
    #: the proxy logs them.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    control: Control | None = None

    def listeners(self) -> Iterator[Listener]:
        for mapping in self.mappings:
            yield from mapping.listeners

    def mapping(self, name: str) -> Mapping:
        """
        The mapping called C{name}; L{KeyError} when there is none.
        """
        for mapping in self.mappings:
            if mapping.name == name:
                return mapping
        raise KeyError(name)
