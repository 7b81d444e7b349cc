"""
Fakes shared by the unit tests: listener services without sockets, flows
without connections, builders of small maps in model form, a name
resolver, TCP relays on fake transports and UDP listeners on fake sockets.
"""

from __future__ import annotations

import errno
import socket

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import CannotListenError
from twisted.internet.error import ConnectionRefusedError as TargetRefused
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy.listener import ListenerService
from twistedproxy.model import TCP, Listener, Mapping, ProxyMap, Target, Timeouts
from twistedproxy.tcp.listener import TCPListener
from twistedproxy.tcp.relay import Relay
from twistedproxy.udp.listener import UDPListener


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


@implementer(IHostnameResolver)
class FakeResolver:
    """
    A name resolver that answers every question with C{addresses} at once
    or, when they are L{None}, when the test calls L{answer}.

    @ivar asked: C{(receiver, hostName, portNumber, transportSemantics)}
        of every question, in order.
    """

    def __init__(self, addresses=None) -> None:
        self.addresses = addresses
        self.asked: list = []

    @property
    def names(self) -> list[str]:
        """
        The host names asked for, in order.
        """
        return [name for _, name, _, _ in self.asked]

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
        if self.addresses is not None:
            self._complete(receiver, self.addresses)
        return receiver

    def answer(self, index: int, *addresses) -> None:
        """
        Answer question C{index} with C{addresses} (none: the name does not
        resolve).
        """
        self._complete(self.asked[index][0], addresses)

    @staticmethod
    def _complete(receiver, addresses) -> None:
        for address in addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


def messages(events) -> list[str]:
    """
    The text of the portproxy lines among logged C{events}.
    """
    return [formatEvent(e) for e in events if e.get("log_namespace") == "portproxy"]


# -- TCP relays on fake transports -------------------------------------------


CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)


class FakeSocket:
    """
    Records socket options set on it.
    """

    def __init__(self):
        self.options = {}

    def setsockopt(self, level, name, value):
        self.options[(level, name)] = value


class RelayTransport(StringTransport):
    """
    A L{StringTransport} with the TCP bits the relay uses: half-close,
    socket options, and an abort that is recorded.
    """

    writeClosed = False
    aborted = False
    #: Given to L{ClosingClient} (a FIN, then its input dropped).
    finished = False
    noDelay = False
    keepAlive = False

    def __init__(self, peer=CLIENT):
        StringTransport.__init__(self, peerAddress=peer)
        self.handle = FakeSocket()

    def loseWriteConnection(self):
        self.writeClosed = True

    def abortConnection(self):
        self.aborted = True
        StringTransport.abortConnection(self)

    def unregisterProducer(self):
        # Twisted's transports allow this without a producer.
        self.producer = None

    def setTcpNoDelay(self, enabled):
        self.noDelay = enabled

    def setTcpKeepAlive(self, enabled):
        self.keepAlive = enabled

    def getHandle(self):
        return self.handle

    @property
    def reset(self):
        return (
            self.aborted
            and (socket.SOL_SOCKET, socket.SO_LINGER) in self.handle.options
        )


def tcpListener(**kwargs) -> Listener:
    """
    A TCP listener of mapping C{web} on 127.0.0.1:8080 forwarding to
    10.0.0.2:80, with C{kwargs} for its other settings.
    """
    values = dict(
        mapping="web",
        proto="tcp",
        host="127.0.0.1",
        port=8080,
        target=Target("10.0.0.2", 80),
        timeouts=Timeouts(connect=5, idle=0),
        maxConnections=0,
    )
    values.update(kwargs)
    return Listener(**values)


class Harness:
    """
    A L{TCPListener} on a memory reactor, with helpers to accept clients
    and answer their connects.
    """

    def __init__(self, **kwargs):
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.service = TCPListener(tcpListener(**kwargs), self.reactor, backlog=16)

    def accept(self, peer=CLIENT) -> tuple[Relay, RelayTransport]:
        relay = Relay(self.service, peer)
        transport = RelayTransport(peer)
        relay.makeConnection(transport)
        return relay, transport

    def lastDial(self):
        host, port, factory, timeout, _bindAddress = self.reactor.tcpClients[-1]
        return host, port, factory, timeout

    def answer(self):
        """
        Complete the most recent target connect; the target's transport.
        """
        host, port, factory, _timeout = self.lastDial()
        side = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = RelayTransport(IPv4Address("TCP", host, port))
        side.makeConnection(transport)
        return side, transport

    def refuse(self):
        _host, _port, factory, _timeout = self.lastDial()
        factory.clientConnectionFailed(
            self.reactor.connectors[-1],
            Failure(TargetRefused(errno.ECONNREFUSED, "Connection refused")),
        )

    def connected(self):
        relay, client = self.accept()
        side, target = self.answer()
        return relay, client, side, target


# -- UDP listeners on fake sockets --------------------------------------------


TARGET = Target("127.0.0.1", 9000)


def udpListener(
    host: str = "127.0.0.1",
    target: Target = TARGET,
    timeout: float = 30.0,
    port: int = 5353,
    mapping: str = "dns",
    **settings,
) -> Listener:
    """
    A UDP listener of C{mapping} on C{host}:C{port} forwarding to
    C{target}, with the udp timeout C{timeout} and the other
    L{Listener} C{settings}.
    """
    return Listener(
        mapping=mapping,
        proto="udp",
        host=host,
        port=port,
        target=target,
        timeouts=Timeouts(udp=timeout),
        **settings,
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


class UDPListenerOnFakes(UDPListener):
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


def startedUDP(listener: Listener, reactor) -> UDPListenerOnFakes:
    """
    A started L{UDPListenerOnFakes} of C{listener} on C{reactor}.
    """
    service = UDPListenerOnFakes(listener, reactor)
    service.privilegedStartService()
    service.startService()
    return service
