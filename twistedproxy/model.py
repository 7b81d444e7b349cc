"""
The proxy map as frozen values.

L{twistedproxy.config} turns a YAML file into a L{ProxyMap}; everything
after it (the reload plan, the listener services, the manhole) reads these
values and never the YAML.  Values are immutable so that a reload can build
a complete new map beside the running one and compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, NamedTuple, Optional

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


@dataclass(frozen=True)
class Target:
    """
    Where a listener forwards to: an IP literal or a host name (resolved
    when a connection or session starts), and a port.
    """

    host: str
    port: int

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


@dataclass(frozen=True)
class Listener:
    """
    One listening socket and where it forwards to.

    @ivar mapping: the name of the mapping this listener belongs to.
    @ivar maxConnections: TCP connections or UDP sessions at once; 0 is
        unlimited.
    @ivar line: the map line the mapping starts on, for messages; not part
        of the value.
    """

    mapping: str
    proto: str
    host: str
    port: int
    target: Target
    timeouts: Timeouts = Timeouts()
    maxConnections: int = 0
    line: int = field(default=0, compare=False)

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


@dataclass(frozen=True)
class Mapping:
    """
    One named entry of the map; a range or C{[tcp, udp]} gives it several
    listeners.
    """

    name: str
    listeners: tuple[Listener, ...]
    line: int = field(default=0, compare=False)


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


@dataclass(frozen=True)
class ProxyMap:
    """
    A whole, valid map file.
    """

    path: str
    mappings: tuple[Mapping, ...] = ()
    manhole: Optional[Manhole] = None

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
