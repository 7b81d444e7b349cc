"""
Fakes shared by the unit tests: listener services without sockets, flows
without connections, and builders of small maps in model form.
"""

from __future__ import annotations

import errno

from twisted.application.service import Service
from twisted.internet.defer import succeed
from twisted.internet.error import CannotListenError

from twistedproxy.listener import ListenerService
from twistedproxy.model import TCP, Listener, Mapping, ProxyMap, Target


class FakeListener(ListenerService):
    """
    A TCP listener service that binds nothing: counters and flows only.

    Ports in the class attribute C{busy} fail to bind and to enable, as a
    port another socket holds would; C{stopping}, when set, is the
    L{Deferred} that stopping the service returns.
    """

    proto = TCP
    busy: set = set()
    stopping = None

    def __init__(self, listener: Listener, reactor) -> None:
        ListenerService.__init__(self, listener, reactor)
        self._bound = False

    @property
    def bound(self) -> bool:
        return self._bound

    def _refuseBusy(self) -> None:
        if self.listener.port in self.busy:
            raise CannotListenError(
                self.listener.host,
                self.listener.port,
                OSError(errno.EADDRINUSE, "Address already in use"),
            )

    def bind(self) -> None:
        self._refuseBusy()
        self._bound = True

    def stopService(self):
        Service.stopService(self)
        self._bound = False
        return self.stopping or succeed(None)

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self._refuseBusy()
        self.enabled = True


class FakeUDPListener(FakeListener):
    """
    A UDP listener service with no socket: it also counts the datagrams of
    new clients it dropped.
    """

    proto = "udp"
    dropped = 0


class FakeFlow:
    """
    An open flow of C{service}, registered with it, that remembers being
    closed.
    """

    def __init__(
        self,
        service: ListenerService,
        flowId: int,
        client: str = "127.0.0.1:5000",
        started: float = 0.0,
        bytesIn: int = 0,
        bytesOut: int = 0,
    ) -> None:
        self.id = flowId
        self.listener = service.listener
        self.client = client
        self.started = started
        self.bytesIn = bytesIn
        self.bytesOut = bytesOut
        self.closedWith: str | None = None
        self.service = service
        service.flowStarted(self)

    def close(self, reason: str) -> None:
        self.closedWith = reason
        self.service.flowEnded(self, reason)


def listener(
    port: int,
    name: str = "web",
    proto: str = TCP,
    host: str = "127.0.0.1",
    target: int = 80,
    **kw,
) -> Listener:
    """
    A listener of mapping C{name} forwarding to C{127.0.0.2:target}; its
    map line is its port unless given.
    """
    kw.setdefault("line", port)
    return Listener(name, proto, host, port, Target("127.0.0.2", target), **kw)


def proxyMap(*listeners: Listener, manhole=None) -> ProxyMap:
    """
    A map of C{listeners}, grouped into mappings by their mapping name.
    """
    mappings: dict[str, list[Listener]] = {}
    for each in listeners:
        mappings.setdefault(each.mapping, []).append(each)
    return ProxyMap(
        "map.yaml", tuple(Mapping(n, tuple(ls)) for n, ls in mappings.items()), manhole
    )
