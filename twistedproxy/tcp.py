"""
TCP forwarding: the listening socket of a TCP listener, and the relay that
copies bytes between each accepted client and its own connection to the
target.

A listener is a L{TCPListener} service holding one L{ListeningPort}.  Each
accepted client becomes a L{Relay} (the client-side protocol, and the
L{IFlow} the manhole and the access log see), which dials the target and
hands the target connection to a L{TargetSide} protocol.  The two
protocols do nothing on the hot path but count and write; flow control is
Twisted's own: each transport is the other's streaming producer, so a
side that cannot keep up stops the reading of the other, and memory per
connection stays at about two transport write buffers.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import (
    CannotListenError,
    ConnectError,
    ConnectionAborted,
    ConnectionDone,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReadDescriptor,
    IResolutionReceiver,
    IWriteDescriptor,
)
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy import proxyprotocol, tls
from twistedproxy.access import hostOf
from twistedproxy.compat import closeWithoutShutdown, reserveDescriptor
from twistedproxy.fastrelay import EngineFlow, HandedOff, acceptClient, releaseTransport
from twistedproxy.listener import (
    IFlow,
    ListenerService,
    clientAddress,
    listeningSocketOptions,
    nextFlowId,
)
from twistedproxy.model import ANY_IPV4, ANY_IPV6, TCP, Listener, formatHostPort
from twistedproxy.proxyprotocol import Addresses, HeaderError, HeaderReader
from twistedproxy.transparency import bindTransparent, transparentSocket

if TYPE_CHECKING:
    from twistedproxy.tlsengine import TLSEngine

#: Used when C{/proc/sys/net/core/somaxconn} cannot be read.
DEFAULT_BACKLOG = 4096

#: The idle check runs this many times per C{idle_timeout}, so a quiet
#: connection is closed between 1 and 1 + 1/IDLE_CHECKS timeouts after
#: its last byte, at the cost of a few timer calls per timeout and no
#: work at all per relayed chunk.
IDLE_CHECKS = 4

#: C{SO_LINGER} on, zero seconds: closing then sends a TCP reset.
_LINGER_RESET = struct.pack("ii", 1, 0)

#: TCP states (C{tcpi_state}, the first byte of C{TCP_INFO}; Linux).
_TCP_SYN_SENT = 2
_TCP_CLOSE = 7

#: A client whose target cannot be reached gets a FIN at once; what it
#: sends then is read and dropped until it closes too, for at most this
#: many seconds and bytes, because closing a socket with unread data makes
#: Linux send a reset instead of (or right after) the FIN.
FAREWELL_SECONDS = 2.0
FAREWELL_BYTES = 1 << 20

#: accept() errors that concern one client only: take the next.
_ACCEPT_AGAIN = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR)

#: Seconds a client of a listener with C{accept_proxy_protocol} has to
#: send its PROXY header (or, from an unlisted source, its first bytes).
HEADER_TIMEOUT = 3.0


def listenBacklog(path: str = "/proc/sys/net/core/somaxconn") -> int:
    """
    The accept queue length to ask for: the kernel's ceiling, so that a
    burst of connects is queued rather than dropped.
    """
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def resetConnection(transport) -> None:
    """
    Close C{transport} with a TCP reset rather than a FIN, so that its peer
    learns that the other side failed instead of taking a clean end of
    stream for a complete one.
    """
    # A TLS transport's handle is its OpenSSL connection; the socket is
    # its transport's.
    tcpTransport = transport.transport if tls.isTLSTransport(transport) else transport
    try:
        tcpTransport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET
        )
    except OSError:
        # The socket is already gone; abortConnection closes what is left.
        pass
    transport.abortConnection()


def resetDescriptor(fd: int) -> None:
    """
    Close the bare socket descriptor C{fd} with a TCP reset: a refused
    client learns at once that it may not connect.
    """
    skt = socket.socket(fileno=fd)
    try:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    skt.close()


def flushAndClose(transport) -> None:
    """
    Close C{transport} once what is buffered for it has gone out.
    """
    # With a paused producer still registered, a drained transport would
    # resume that producer instead of closing.
    transport.unregisterProducer()
    transport.loseConnection()


def connectFailureText(reason: Failure) -> str:
    """
    The short OS message of a failed connect (C{connection refused}), not
    Twisted's long sentence around it.
    """
    error = reason.value
    if isinstance(error, ConnectError):
        # Built from an OSError as (errno, strerror).
        words = error.args[0] if error.args else ""
        if isinstance(words, str) and words:
            return words[0].lower() + words[1:]
    return reason.getErrorMessage()


@implementer(IReadDescriptor)
class ClosingClient:
    """
    A client the proxy could not serve (its target refused, timed out or
    has no address), ended the same way on every path: a FIN at once
    (C{shutdown(SHUT_WR)}, so the client reads a clean end of stream, as
    from docker-proxy), then whatever the client sent or still sends read
    and dropped until it closes its end, L{FAREWELL_SECONDS} pass or
    L{FAREWELL_BYTES} were dropped, and the socket closed.
    """

    def __init__(self, fd: int, reactor) -> None:
        self._socket = socket.socket(fileno=fd)
        self._socket.setblocking(False)
        self.reactor = reactor
        self._left = FAREWELL_BYTES
        self._timer = None

    @classmethod
    def takeOver(cls, transport, reactor) -> None:
        """
        End the client of a Twisted TCP C{transport} this way; its protocol
        sees L{HandedOff}.  Without a descriptor to spare the transport is
        closed as it is, and so is one that is not a plain TCP connection
        (a TLS client: its TLS layer ends with close_notify, then a FIN).
        """
        if not isinstance(transport, tcp.Connection):
            transport.loseConnection()
            return
        try:
            fd = os.dup(transport.fileno())
        except OSError:
            transport.loseConnection()
            return
        releaseTransport(transport)
        cls(fd, reactor).start()

    def start(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        if self._dropInput():
            self._close()
            return
        self.reactor.addReader(self)
        self._timer = self.reactor.callLater(FAREWELL_SECONDS, self._close)

    def _dropInput(self) -> bool:
        """
        Read and drop what the client sent; C{True} once it is done
        (closed, failed, or sent too much).
        """
        while True:
            try:
                data = self._socket.recv(65536)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            self._left -= len(data)
            if self._left <= 0:
                return True

    def _close(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._socket.fileno() >= 0:
            self.reactor.removeReader(self)
            self._socket.close()

    # -- IReadDescriptor ------------------------------------------------------

    def fileno(self) -> int:
        return self._socket.fileno()

    def doRead(self) -> None:
        if self._dropInput():
            self._close()

    def connectionLost(self, reason: Failure) -> None:
        self._close()

    def logPrefix(self) -> str:
        return "portproxy"


class ListeningPort(tcp.Port):
    """
    A Twisted TCP port with portproxy's socket options that can stop
    accepting while it keeps its address.

    On Linux, C{shutdown(SHUT_RD)} on a listening socket takes it out of
    the listening state (queued and new connects are refused) while the
    socket stays bound to its explicit port, and C{listen()} resumes it.

    Twisted's own C{"RelayFactory starting on PORT"} and C{"(TCP Port PORT
    Closed)"} log lines are not written: portproxy logs one line per
    listener itself, and a range of 1000 ports would log 2000 more.
    """

    #: A bound socket to listen on instead of binding one (socket
    #: activation).
    inherited: socket.socket | None = None

    def startListening(self) -> None:
        """
        Bind and listen as C{tcp.Port.startListening} does, without its log
        line, which it writes unconditionally (Twisted has no hook for it).
        """
        # Keeps a descriptor in reserve for Twisted's accept to shed a
        # client with when the process runs out of them.
        reserveDescriptor()
        skt = None
        try:
            if self.inherited is not None:
                skt = self.inherited
                closeWithoutShutdown(self)
                skt.setblocking(False)
                self.acceptedSocketOptions(skt)
            else:
                skt = self.createInternetSocket()
                # The map refuses IPv6 zone indexes, so a plain (host, port)
                # binds IPv6 addresses too.
                skt.bind((self.interface, self.port))
            skt.listen(self.backlog)
        except OSError as e:
            if skt is not None:
                skt.close()
            raise CannotListenError(self.interface, self.port, e) from e
        self._realPortNumber = skt.getsockname()[1]
        self._logger = Logger(namespace="portproxy", observer=self._acceptLogged)
        self.factory.doStart()
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno
        self.numberAccepts = 100
        self.startReading()

    def _acceptLogged(self, event: dict) -> None:
        """
        Where Twisted's accept loop logs (C{tcp.Port._logger}).  Out of
        descriptors, it sheds each client with its reserved descriptor and
        logs three lines per client; a flood of clients would flood the
        log.  Instead, one rate-limited notice per shed client (or failed
        accept), at most one line a second per listener, saying how many
        more there were.
        """
        service = self.factory.service
        listener = service.listener
        if "address" in event:
            service.notice(
                "emfile",
                "{proto} {mapping} {listen}: out of file descriptors; closed "
                "client {client} at once",
                proto=listener.proto,
                mapping=listener.mapping,
                listen=listener.listen,
                client=clientAddress(event["address"]),
            )
        elif "acceptError" in event:
            service.notice(
                "accept",
                "{proto} {mapping} {listen}: could not accept a client ({error})",
                proto=listener.proto,
                mapping=listener.mapping,
                listen=listener.listen,
                error=event["acceptError"],
            )

    def _logConnectionLostMsg(self) -> None:
        """
        Log nothing when the port closes (Twisted's hook for its line).
        """

    def createInternetSocket(self) -> socket.socket:
        skt = tcp.Port.createInternetSocket(self)
        listeningSocketOptions(skt, self.interface)
        self.acceptedSocketOptions(skt)
        return skt

    @staticmethod
    def acceptedSocketOptions(skt: socket.socket) -> None:
        # Accepted sockets inherit these from the listening socket (Linux),
        # so a client costs no system call for them.
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def doRead(self) -> None:
        """
        Accept clients.  While the relay engine is there and the target is
        an address, a client goes straight to a L{Dial} and then to the
        engine, with no Twisted transport or protocol built for it;
        otherwise (and always for TLS or SNI routing, whose client speaks
        first) Twisted's own accept builds a L{Relay}.
        """
        service = self.factory.service
        if (
            service.fastRelay is None
            or not service.targetIsAddress
            or (service.listener.tls and not service.tlsEngineApplies())
        ):
            tcp.Port.doRead(self)
            return
        accepted = 0
        # A bare descriptor, already non-blocking, and the client's address
        # already written as the access line wants it: the client's socket
        # goes to the engine without a Python socket object ever being built.
        listeningFd = self.socket.fileno()
        while accepted < self.numberAccepts:
            try:
                client = acceptClient(listeningFd)
            except OSError as e:
                if e.errno in _ACCEPT_AGAIN:
                    continue
                # Out of descriptors or memory, or worse: Twisted's accept
                # knows how to shed the client and log it.
                tcp.Port.doRead(self)
                return
            if client is None:
                break
            accepted += 1
            service.dial(*client)
        # Scaled as Twisted's own accept loop does.
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)

    def pauseAccepting(self) -> None:
        """
        Refuse new connections, keeping the socket bound.
        """
        # Out of the reactor first: an un-listened socket polls readable
        # and accept() on it fails.
        self.stopReading()
        self.socket.shutdown(socket.SHUT_RD)

    def resumeAccepting(self) -> None:
        """
        Listen again after L{pauseAccepting}; L{CannotListenError} when
        another socket took the address meanwhile.
        """
        try:
            self.socket.listen(self.backlog)
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from e
        self.startReading()

    def closeNow(self) -> None:
        """
        Close the socket in this reactor turn (C{stopListening} waits for
        the next one), so that a listener bound right after this one is
        stopped finds the address free.
        """
        self.disconnecting = True
        self.stopReading()
        if self.connected:
            self.connectionLost(Failure(CONNECTION_DONE))


class RelayFactory(Factory):
    """
    Makes a L{Relay} for each client a L{TCPListener} accepts.
    """

    noisy = False

    def __init__(self, service: TCPListener) -> None:
        self.service = service

    def buildProtocol(self, addr) -> Relay:
        settings = self.service.listener.tls
        if settings is not None:
            if settings.terminate is not None:
                return TerminatingRelay(self.service, addr)
            if settings.sniRoutes:
                return RoutingRelay(self.service, addr)
        return Relay(self.service, addr)


class TCPListener(ListenerService):
    """
    A TCP listening socket forwarding each client to the listener's target.

    @ivar backlog: the accept queue length asked of the kernel.
    """

    proto = TCP

    #: The relay engine (L{twistedproxy.fastrelay.FastRelay}) that takes
    #: established connections, or L{None} to relay them in Python; the
    #: root service sets it.
    fastRelay = None

    #: The TLS engine (L{twistedproxy.tlsengine.TLSEngine}) that terminates
    #: the TLS of C{tls:} listeners, or L{None}; the root service sets it.
    tlsEngine: TLSEngine | None = None

    def __init__(self, listener: Listener, reactor, backlog: int | None = None) -> None:
        ListenerService.__init__(self, listener, reactor)
        self.backlog = listenBacklog() if backlog is None else backlog
        self._port: ListeningPort | None = None
        self.targetIsAddress = _isAddress(listener.target.host)

    def reconfigure(self, listener: Listener) -> None:
        ListenerService.reconfigure(self, listener)
        self.targetIsAddress = _isAddress(listener.target.host)
        port = self._port
        if port is not None and _terminates(listener) != isinstance(
            port.factory, tls.TLSMemoryBIOFactory
        ):
            # TLS termination turned on or off: clients accepted from now
            # on get the other factory.
            port.factory = self._relayFactory()

    def dial(self, clientFd: int, client: str) -> None:
        """
        A client accepted for the relay engine (its bare non-blocking
        descriptor, and its C{host:port}): connect to the target, an
        address, and hand both sockets to the engine when it answers.
        """
        listener = self.listener
        if listener.identity:
            if listener.identity.acceptProxyProtocol or listener.host in (
                ANY_IPV4,
                ANY_IPV6,
            ):
                self._identifyDescriptor(clientFd, client)
                return
            # Both ends are known without asking the socket.
            host, _, port = client.rpartition(":")
            addresses = Addresses(
                (host.strip("[]"), int(port)), (listener.host, listener.port)
            )
            self.dialIdentified(clientFd, client, addresses)
            return
        self.dialIdentified(clientFd, client, None)

    def dialIdentified(
        self, clientFd: int, client: str, addresses: Addresses | None
    ) -> None:
        """
        Admit and dial for a client of the relay engine whose real address
        is known: C{client} (C{host:port}), and C{addresses} when the
        listener's C{client_address} or C{accept_proxy_protocol} needed
        them.
        """
        refusal = self.admit(hostOf(client))
        if refusal is not None:
            resetDescriptor(clientFd)
            self.rejected(client, refusal)
            return
        if self.listener.tls is not None and self.tlsEngine is not None:
            self.tlsEngine.dial(self, clientFd, client, addresses)
            return
        Dial(self, clientFd, client, addresses).start()

    def tlsEngineApplies(self) -> bool:
        """
        Whether this listener's TLS goes to the TLS engine (see
        L{twistedproxy.tlsengine.applies}).
        """
        return self.tlsEngine is not None and self.tlsEngine.applies(self.listener)

    def _identifyDescriptor(self, clientFd: int, client: str) -> None:
        """
        L{identify} a client of the relay engine, then L{dialIdentified} it.
        """
        try:
            skt = socket.socket(fileno=clientFd)
        except OSError as e:
            os.close(clientFd)
            self.refusedHeader(client, f"cannot read the client's socket: {e.strerror}")
            return

        def identified(addresses: Addresses | None, problem: str | None) -> None:
            fd = skt.detach()
            if problem is not None:
                # A FIN: a client that misbehaved is not owed a reset.
                os.close(fd)
                self.refusedHeader(client, problem)
                return
            self.dialIdentified(fd, formatHostPort(*addresses.source), addresses)

        self.identify(skt, identified)

    def identify(self, skt: socket.socket, identified) -> HeaderReader | None:
        """
        Learn who the client on C{skt} is, for both paths: from its PROXY
        header when the listener has C{accept_proxy_protocol} (the
        returned L{HeaderReader} is reading it), else from the socket.
        C{identified(addresses, problem)} follows: the client's
        L{Addresses} and L{None}, or L{None} and why the client must be
        closed.
        """
        identity = self.listener.identity
        try:
            peer = skt.getpeername()[:2]
            if self.listener.host in (ANY_IPV4, ANY_IPV6):
                local = skt.getsockname()[:2]
            else:
                local = (self.listener.host, self.listener.port)
        except OSError as e:
            identified(None, f"client gone: {(e.strerror or str(e)).lower()}")
            return None
        own = Addresses(peer, local)
        if not identity.acceptProxyProtocol:
            identified(own, None)
            return None

        def read(result: proxyprotocol.HeaderResult) -> None:
            if isinstance(result, HeaderError):
                identified(None, str(result))
            else:
                identified(result or own, None)

        reader = HeaderReader(
            self.reactor, skt, identity.trusts(peer[0]), HEADER_TIMEOUT, read
        )
        reader.start()
        return reader

    def refusedHeader(self, client: str, reason: str) -> None:
        """
        Count a client closed for its PROXY header (or the lack of one);
        a flood of them is logged once a second.
        """
        self.countRejected("header")
        self.notice(
            "header",
            "tcp {mapping} closed {client}: {reason}",
            mapping=self.listener.mapping,
            client=client,
            reason=reason,
        )

    @property
    def bound(self) -> bool:
        return self._port is not None

    @property
    def port(self) -> ListeningPort | None:
        """
        The listening port while bound.
        """
        return self._port

    def _relayFactory(self):
        """
        The factory of this listener's relays: wrapped in TLS when the
        listener terminates it.
        """
        factory = RelayFactory(self)
        if _terminates(self.listener):
            factory = tls.serverFactory(self, factory)
            # The port finds its listener through its factory.
            factory.service = self
        return factory

    def bind(self) -> None:
        port = ListeningPort(
            self.listener.port,
            self._relayFactory(),
            self.backlog,
            self.listener.host,
            self.reactor,
        )
        port.inherited = self.inheritedSocket
        port.startListening()
        self._port = port
        if not self.enabled:
            port.pauseAccepting()

    def stopService(self) -> None:
        """
        Close the listening socket now; open connections run on until they
        end (L{whenDrained} says when).
        """
        Service.stopService(self)
        port, self._port = self._port, None
        if port is not None:
            port.closeNow()

    def disable(self) -> None:
        """
        Refuse new connections, keeping the socket bound; connections in
        the accept queue are refused too.
        """
        if self.enabled:
            self.enabled = False
            if self._port is not None:
                self._port.pauseAccepting()

    def enable(self) -> None:
        if not self.enabled:
            if self._port is not None:
                self._port.resumeAccepting()
            self.enabled = True


def _isAddress(host: str) -> bool:
    return isIPAddress(host) or isIPv6Address(host)


def proxyHeader(listener: Listener, addresses: Addresses | None) -> bytes:
    """
    The PROXY header a flow of C{listener} sends the target first, or
    C{b""}: for both paths.
    """
    version = listener.identity.proxyProtocolVersion
    if not version:
        return b""
    return proxyprotocol.encode(version, addresses)


def sendHeader(skt: socket.socket, header: bytes) -> str | None:
    """
    Send C{header} on the just connected C{skt}, whose send buffer is
    empty, in one call; what went wrong, or L{None}.
    """
    try:
        sent = skt.send(header)
    except OSError as e:
        return f"cannot send the PROXY header: {(e.strerror or str(e)).lower()}"
    if sent != len(header):
        return f"cannot send the PROXY header: {sent} of {len(header)} bytes sent"
    return None


class _TransparentClient(tcp.Client):
    """
    A Twisted TCP client whose socket is transparent: bound to the
    client's C{source} address, which need not be this host's.
    """

    def __init__(self, host, port, source: tuple[str, int], connector, reactor) -> None:
        self._source = source
        tcp.Client.__init__(self, host, port, None, connector, reactor)

    def createInternetSocket(self) -> socket.socket:
        skt = tcp.Client.createInternetSocket(self)
        try:
            bindTransparent(skt, self._source)
        except OSError:
            skt.close()
            raise
        return skt


class TransparentConnector(tcp.Connector):
    """
    Connects to a target from the client's own address (C{client_address:
    transparent}) on the pure-Python path: C{reactor.connectTCP} can only
    bind after its socket exists, and the option must come before the
    bind.
    """

    def __init__(self, host, port, factory, source: tuple[str, int], reactor) -> None:
        tcp.Connector.__init__(self, host, port, factory, None, None, reactor)
        self.source = source

    def _makeTransport(self) -> tcp.Client:
        return _TransparentClient(self.host, self.port, self.source, self, self.reactor)


def _terminates(listener: Listener) -> bool:
    return listener.tls is not None and listener.tls.terminate is not None


@implementer(IResolutionReceiver)
class _TargetAddresses:
    """
    Collects the addresses a target host name resolves to for one L{Relay}.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.hosts: list[str] = []

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        if address.host not in self.hosts:
            self.hosts.append(address.host)

    def resolutionComplete(self) -> None:
        self.relay.resolved(self.hosts)


class _TargetConnector(ClientFactory):
    """
    Dials one target address for a L{Relay}.
    """

    noisy = False

    def __init__(self, relay: Relay, side: type[TargetSide]) -> None:
        self.relay = relay
        self.side = side

    def buildProtocol(self, addr) -> TargetSide:
        return self.side(self.relay)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.relay.connectFailed(reason)


@implementer(IHalfCloseableProtocol)
class TargetSide(Protocol):
    """
    The target end of a L{Relay}: whatever the target sends goes to the
    client.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        self.relay.targetConnected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        relay.bytesOut += len(data)
        relay.transport.write(data)

    def readConnectionLost(self) -> None:
        self.relay.targetFinished()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        # A connection that completed after its relay had given up was
        # never the relay's target.
        if self.relay.targetTransport is self.transport:
            self.relay.targetLost(reason)


@implementer(IFlow, IHalfCloseableProtocol)
class Relay(Protocol):
    """
    One accepted client and its connection to the target.

    The client is not read until the target has answered.  Each side's end
    of stream half-closes the other side, and the flow ends, with one access
    line, when both sockets are closed.

    @ivar listener: the settings of the listener when the client came;
        a reload changes them for later clients only.
    @ivar targetTransport: the connection to the target, once it answered.
    @ivar reason: why the flow ended or is ending (a reset, a timeout, a
        kill, a failed connect); L{None} while nothing went wrong, and then
        the side that finished sending first gives the access line's
        reason.
    """

    id: int = 0
    started: float = 0.0

    def __init__(self, service: TCPListener, address) -> None:
        self.service = service
        self.reactor = service.reactor
        self.listener = service.listener
        self.client = clientAddress(address)
        self.bytesIn = 0
        self.bytesOut = 0
        self.reason: str | None = None
        self._finishedFirst: str | None = None
        self.targetTransport = None
        self._clientOpen = False
        self._targetOpen = False
        self._clientDone = False
        self._targetDone = False
        self._dialing = False
        self._connector = None
        self._hosts: list[str] = []
        self._timer = None
        self._seen = 0
        self._quietChecks = 0
        self._ended = False
        #: the client's and its destination's addresses, when the
        #: listener's identity settings needed them
        self.addresses: Addresses | None = None

    # -- the hot path ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self.targetTransport.write(data)

    # -- the client ---------------------------------------------------------

    def connectionMade(self) -> None:
        if self.listener.identity:
            # Nothing is read by Twisted until the target answers; the
            # header, if any, is read from the socket itself.
            self.transport.pauseProducing()
            self.service.identify(self.transport.socket, self._identified)
            return
        self._admit()

    def _identified(self, addresses: Addresses | None, problem: str | None) -> None:
        """
        The client's real address is known (L{TCPListener.identify}), or
        it is closed for C{problem}.
        """
        if problem is not None:
            self.transport.loseConnection()
            self.service.refusedHeader(self.client, problem)
            return
        self.addresses = addresses
        self.client = formatHostPort(*addresses.source)
        self._admit()

    def _admit(self) -> None:
        service = self.service
        # Admission, with the real client.
        refusal = service.admit(hostOf(self.client))
        if refusal is not None:
            resetConnection(self.transport)
            service.rejected(self.client, refusal)
            return
        self._clientOpen = True
        # Read nothing until the target answers: an unreachable target must
        # not make the proxy buffer what the client sends.
        self.transport.pauseProducing()
        self.id = nextFlowId()
        self.started = self.reactor.seconds()
        service.flowStarted(self)
        self._timer = self.reactor.callLater(
            self.listener.timeouts.connect, self._connectTimedOut
        )
        self._dial()

    def readConnectionLost(self) -> None:
        if self._clientDone:
            return
        self._clientDone = True
        if self._finishedFirst is None:
            self._finishedFirst = "client closed"
        target = self.targetTransport
        # The client will send no more; unregistered, it is not resumed
        # when the target's buffer drains (Twisted would read the end of
        # stream a second time).
        target.unregisterProducer()
        target.loseWriteConnection()
        if self._targetDone:
            self._closeBoth()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        if not self._clientOpen or reason.check(HandedOff):
            # A rejected client (it never was a flow), or one the relay
            # engine took over.
            return
        if self._proxyStopping():
            return
        self._clientOpen = False
        if not reason.check(ConnectionDone, ConnectionAborted):
            self._because("reset by client")
            if self._targetOpen:
                resetConnection(self.targetTransport)
        elif self._targetOpen:
            flushAndClose(self.targetTransport)
        self._stopDialing()
        self._maybeEnded()

    # -- dialing the target -------------------------------------------------

    def _dial(self) -> None:
        target = self.listener.target
        self._dialing = True
        if isIPAddress(target.host) or isIPv6Address(target.host):
            self.resolved([target.host])
        else:
            # Resolved per connection, so that a target that moved is found.
            self.reactor.nameResolver.resolveHostName(
                _TargetAddresses(self), target.host, target.port
            )

    def resolved(self, hosts: list[str]) -> None:
        """
        The target's name resolved to C{hosts} (IP literals); dial them in
        turn.
        """
        if not self._dialing:
            # Given up while the name was being looked up.
            return
        if not hosts:
            self._connectGaveUp(f"no address for {self.listener.target.host}")
            return
        self._hosts = hosts
        self._dialNext()

    def _dialNext(self) -> None:
        host = self._hosts.pop(0)
        target = self.listener.target
        originate = (
            self.listener.tls.originate if self.listener.tls is not None else None
        )
        if originate is None:
            factory = _TargetConnector(self, TargetSide)
        else:
            factory = tls.targetFactory(
                originate,
                target.host,
                _TargetConnector(self, TLSTargetSide),
                self.reactor,
            )
        if self.listener.identity.transparent:
            connector = TransparentConnector(
                host, target.port, factory, self.addresses.source, self.reactor
            )
            connector.connect()
            self._connector = connector
            return
        self._connector = self.reactor.connectTCP(
            host, target.port, factory, timeout=None
        )

    def connectFailed(self, reason: Failure) -> None:
        """
        A connect to one target address failed.
        """
        self._connector = None
        if not self._dialing:
            # Given up already; whoever gave up ends the flow.
            return
        if self._proxyStopping():
            return
        if self._hosts:
            # A name with several addresses: try the next one (localhost is
            # often ::1 first, with the target on 127.0.0.1 only).
            self._dialNext()
            return
        self._connectGaveUp(connectFailureText(reason))

    def _connectTimedOut(self) -> None:
        self._timer = None
        self._connectGaveUp(f"timed out after {self.listener.timeouts.connect:g}s")

    def _connectGaveUp(self, why: str) -> None:
        self._because(f"connect failed: {why}")
        self._stopDialing()
        self._clientOpen = False
        ClosingClient.takeOver(self.transport, self.reactor)
        self._maybeEnded()

    def _stopDialing(self) -> None:
        self._dialing = False
        self._hosts = []
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.stopConnecting()

    # -- the target ---------------------------------------------------------

    def targetConnected(self, transport) -> None:
        """
        The target answered on C{transport}: start relaying.
        """
        self._connector = None
        if not self._dialing:
            transport.abortConnection()
            return
        self._dialing = False
        self._cancelTimer()
        self.targetTransport = transport
        self._targetOpen = True
        client = self.transport
        header = proxyHeader(self.listener, self.addresses)
        if header:
            problem = sendHeader(transport.socket, header)
            if problem is not None:
                self._because(f"connect failed: {problem}")
                transport.abortConnection()
                client.abortConnection()
                return
        for side in (client, transport):
            side.setTcpNoDelay(True)
            side.setTcpKeepAlive(True)
        if self._handOff():
            return
        transport.registerProducer(client, True)
        client.registerProducer(transport, True)
        client.resumeProducing()
        idle = self.listener.timeouts.idle
        if idle > 0:
            self._timer = self.reactor.callLater(idle / IDLE_CHECKS, self._checkIdle)

    def targetFinished(self) -> None:
        """
        The target will send no more (FIN): finish sending to the client.
        """
        if self._targetDone:
            return
        self._targetDone = True
        if self._finishedFirst is None:
            self._finishedFirst = "target closed"
        client = self.transport
        client.unregisterProducer()
        client.loseWriteConnection()
        if self._clientDone:
            self._closeBoth()

    def targetLost(self, reason: Failure) -> None:
        """
        The target connection is closed.
        """
        if reason.check(HandedOff) or self._proxyStopping():
            return
        self._targetOpen = False
        if not reason.check(ConnectionDone, ConnectionAborted):
            self._because("reset by target")
            if self._clientOpen:
                resetConnection(self.transport)
        elif self._clientOpen:
            flushAndClose(self.transport)
        self._maybeEnded()

    def _handOff(self) -> bool:
        """
        Give both connections to the relay engine, when there is one and
        nothing is buffered: an L{EngineFlow} then stands for this flow,
        and this relay is done.
        """
        relay = self.service.fastRelay
        if (
            relay is None
            or tls.isTLSTransport(self.transport)
            or tls.isTLSTransport(self.targetTransport)
        ):
            # A TLS side's bytes on the socket are not the bytes relayed.
            return False
        engineFlow = relay.adoptFlow(
            self,
            self.transport,
            self.targetTransport,
            self.listener.timeouts.idle,
            self.service.flowEnded,
        )
        if engineFlow is None:
            return False
        self._ended = True
        self.service.flows[self.id] = engineFlow
        return True

    # -- ending -------------------------------------------------------------

    def _closeBoth(self) -> None:
        # Both directions have finished; each socket closes once its buffer
        # has gone out.
        self.transport.loseConnection()
        self.targetTransport.loseConnection()

    def _checkIdle(self) -> None:
        seen = self.bytesIn + self.bytesOut
        if seen != self._seen:
            self._seen = seen
            self._quietChecks = 0
        else:
            self._quietChecks += 1
            if self._quietChecks >= IDLE_CHECKS:
                self._timer = None
                self.close("idle timeout")
                return
        self._timer = self.reactor.callLater(
            self.listener.timeouts.idle / IDLE_CHECKS, self._checkIdle
        )

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _proxyStopping(self) -> bool:
        """
        Whether the process is stopping; if so, end the flow at once.

        The reactor then drops every socket it watches without reporting
        the rest (a paused side, an abort still pending) closing, so the
        first loss reported is the only chance to write the access line.
        """
        if self.reactor.running:
            return False
        self._because("proxy stopped")
        self._dialing = False
        self._hosts = []
        self._connector = None
        self._clientOpen = self._targetOpen = False
        self._maybeEnded()
        return True

    def _because(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _maybeEnded(self) -> None:
        if self._ended or self._clientOpen or self._targetOpen:
            return
        self._ended = True
        self._cancelTimer()
        self.service.flowEnded(self, self.reason or self._finishedFirst or "closed")

    def close(self, reason: str) -> None:
        """
        End the flow now, dropping whatever is still buffered either way.
        """
        self._because(reason)
        self._stopDialing()
        if self._targetOpen:
            self.targetTransport.abortConnection()
        if self._clientOpen:
            self.transport.abortConnection()


# -- TLS (twistedproxy.tls has the certificates and the ClientHello) --------------


@implementer(IHandshakeListener)
class TerminatingRelay(Relay):
    """
    A relay whose client speaks TLS to the proxy (C{tls:}).  The handshake
    comes first: only a client that completed it (with a valid certificate
    under C{client_ca}) makes the proxy dial.  Relayed in Python: the
    bytes on the client's socket are not the bytes relayed, so the relay
    engine never takes it.

    @ivar peer: the subject of the client's certificate, when it sent one
        (the access line and the manhole show it).
    """

    peer: str | None = None
    _handshaken = False
    #: What the client sent before the target answered; set when the
    #: handshake starts.
    _early: list[bytes]

    def _dial(self) -> None:
        # From connectionMade, which paused the client: read its handshake
        # first; handshakeCompleted dials.
        self._early = []
        self.transport.resumeProducing()

    def handshakeCompleted(self) -> None:
        self._handshaken = True
        # Nothing more from the client until the target answers, but what
        # came with the end of the handshake (one read at most) is kept.
        self.transport.pauseProducing()
        self.peer = tls.peerSubject(self.transport)
        Relay._dial(self)

    def dataReceived(self, data: bytes) -> None:
        if self.targetTransport is None:
            self._early.append(data)
            return
        Relay.dataReceived(self, data)

    def targetConnected(self, transport) -> None:
        early, self._early = self._early, []
        Relay.targetConnected(self, transport)
        if self.targetTransport is transport:
            for data in early:
                Relay.dataReceived(self, data)

    def _connectTimedOut(self) -> None:
        if not self._handshaken:
            self._because(f"tls: no handshake in {self.listener.timeouts.connect:g}s")
        Relay._connectTimedOut(self)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        if tls.isTLSFailure(reason):
            self._because(f"tls: {tls.failureText(reason)}")
        reason = tls.endReason(self.transport, reason)
        if reason.check(ConnectionDone) and self._finishedFirst is None:
            # TLS has no half-close the relay sees: the end of the client's
            # stream is the end of its connection.
            self._finishedFirst = "client closed"
        Relay.connectionLost(self, reason)


class RoutingRelay(Relay):
    """
    A relay of TLS passthrough (C{sni_routes:}): before dialing, it reads
    the server name of the client's ClientHello without taking it off the
    socket, and takes the target of the matching route (the listener's
    own target when none matches).  The ClientHello and all that follows
    are then relayed unchanged, by the relay engine when there is one.

    @ivar serverName: the server name the client sent, if any.
    """

    serverName: str | None = None
    _peek: tls.ClientHelloPeek | None = None
    _routed = False

    def _dial(self) -> None:
        # From connectionMade, which paused the client: peek at its
        # ClientHello first; _helloRead dials.
        self._peek = tls.ClientHelloPeek(
            self.reactor, self.transport.getHandle(), self._helloRead
        )
        self._peek.start()

    def _helloRead(self, serverName: str | None, problem: str | None) -> None:
        self._peek = None
        if problem is not None:
            self.close(problem)
            return
        self.serverName = serverName
        # This flow's settings from now on: the access line and the
        # manhole show the route's target.
        self.listener = tls.sniRouter(self.listener).route(serverName)
        self._routed = True
        Relay._dial(self)

    def _connectTimedOut(self) -> None:
        if not self._routed:
            self._because(f"no ClientHello in {self.listener.timeouts.connect:g}s")
        Relay._connectTimedOut(self)

    def _stopDialing(self) -> None:
        peek, self._peek = self._peek, None
        if peek is not None:
            peek.stop()
        Relay._stopDialing(self)


class _TargetHandshake:
    """
    Stands for the connector of a relay whose TLS target has answered and
    is in its handshake: giving up the dial aborts the connection.
    """

    def __init__(self, transport) -> None:
        self.transport = transport

    def stopConnecting(self) -> None:
        self.transport.abortConnection()


@implementer(IHandshakeListener)
class TLSTargetSide(TargetSide):
    """
    The target end of a relay that speaks TLS to its target
    (C{target_tls:}): the relay starts once the handshake has verified
    the target, and a failed handshake is a failed connect, whose reason
    (a certificate for another name, an unknown CA) the access line gives.
    """

    def connectionMade(self) -> None:
        self.relay._connector = _TargetHandshake(self.transport)

    def handshakeCompleted(self) -> None:
        self.relay.targetConnected(self.transport)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        relay = self.relay
        if relay.targetTransport is self.transport:
            reason = tls.endReason(self.transport, reason)
            if reason.check(ConnectionDone) and relay._finishedFirst is None:
                relay._finishedFirst = "target closed"
            relay.targetLost(reason)
            return
        if tls.isTLSFailure(reason):
            reason = Failure(tls.HandshakeFailed(f"tls: {tls.failureText(reason)}"))
        elif reason.check(ConnectionDone):
            reason = Failure(
                tls.HandshakeFailed("tls: the target closed during the handshake")
            )
        self.relay.connectFailed(reason)


@implementer(IWriteDescriptor)
class Dial(EngineFlow):
    """
    A client accepted for the relay engine, from its accept to its access
    line.  First the proxy connects to the target: the client's bare
    descriptor, a non-blocking socket to the target and, unless the
    connect completed at once (as on loopback), the reactor watching it;
    nothing is read from the client meanwhile.  When the target answers,
    both descriptors go to the engine and this object goes on as the
    L{EngineFlow} the manhole and the access log see; when it does not,
    the client is closed and the access line says why.
    """

    __slots__ = ("_clientFd", "_target", "_timer", "addresses", "service")

    def __init__(
        self,
        service: TCPListener,
        clientFd: int,
        client: str,
        addresses: Addresses | None = None,
        engine=None,
    ) -> None:
        EngineFlow.__init__(
            self,
            service.fastRelay if engine is None else engine,
            nextFlowId(),
            service.listener,
            client,
            service.reactor.seconds(),
            service.flowEnded,
        )
        self.service = service
        #: the client's and its destination's, when identity settings need them
        self.addresses = addresses
        self._clientFd = clientFd
        self._target: socket.socket | None = None
        self._timer = None

    def start(self) -> None:
        self.service.flowStarted(self)
        self.connect()

    def connect(self) -> None:
        """
        Connect to the target; within C{connect_timeout}, counted from the
        timer already running if there is one.
        """
        target = self.listener.target
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        try:
            if self.listener.identity.transparent:
                skt = transparentSocket(
                    family, socket.SOCK_STREAM, self.addresses.source
                )
            else:
                skt = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self._target = skt
            status = skt.connect_ex((target.host, target.port))
            if status == errno.EINPROGRESS:
                # On loopback the handshake is done inside connect(): then
                # there is nothing to wait for.  One byte of TCP_INFO is the
                # connection's state: still sending its SYN, failed
                # (closed), or connected (established, or already closed
                # by the target, which the engine then relays).
                state = skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if state == _TCP_CLOSE:
                    status = (
                        skt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        or errno.ECONNREFUSED
                    )
                elif state != _TCP_SYN_SENT:
                    status = 0
        except OSError as e:
            self._fail((e.strerror or str(e)).lower())
            return
        if status == 0:
            self._connected()
        elif status == errno.EINPROGRESS:
            reactor = self.service.reactor
            if self._timer is None:
                self._timer = reactor.callLater(
                    self.listener.timeouts.connect, self._timedOut
                )
            reactor.addWriter(self)
        else:
            self._fail(os.strerror(status).lower())

    def _connected(self) -> None:
        self._cancelTimer()
        header = proxyHeader(self.listener, self.addresses)
        if header:
            problem = sendHeader(self._target, header)
            if problem is not None:
                self._fail(problem)
                return
        target, self._target = self._target, None
        target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.hand(target.detach())

    def hand(self, targetFd: int) -> None:
        """
        Give the connected target, and the client, to the relay engine.
        """
        clientFd, self._clientFd = self._clientFd, -1
        if not self._relay.adoptDescriptors(
            clientFd,
            targetFd,
            self.id,
            self.listener.timeouts.idle,
            self._ended,
            exclusive=True,
        ):
            os.close(clientFd)
            os.close(targetFd)
            self.service.flowEnded(self, "relay engine refused the connection")

    # -- IWriteDescriptor -----------------------------------------------------

    def fileno(self) -> int:
        return self._target.fileno() if self._target is not None else -1

    def logPrefix(self) -> str:
        return "portproxy"

    def doWrite(self) -> None:
        """
        The connect finished, one way or the other.
        """
        self.service.reactor.removeWriter(self)
        status = self._target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            self._fail(os.strerror(status).lower())
        else:
            self._connected()

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the connect: it failed (epoll reports a
        refused connect as a hang-up, not as writable) or the proxy is
        stopping.
        """
        if self._target is None:
            return
        status = self._target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            self._fail(os.strerror(status).lower())
        elif not self.service.running:
            self._end("proxy stopped")
        else:
            self._fail(reason.getErrorMessage())

    # -- ending ---------------------------------------------------------------

    def _timedOut(self) -> None:
        self._timer = None
        self._fail(f"timed out after {self.listener.timeouts.connect:g}s")

    def _fail(self, why: str) -> None:
        clientFd, self._clientFd = self._clientFd, -1
        self._end(f"connect failed: {why}")
        if clientFd >= 0:
            ClosingClient(clientFd, self.service.reactor).start()

    def close(self, reason: str) -> None:
        """
        End the flow now (from the manhole): the dial, or the engine's
        relay once the target answered.
        """
        if self._clientFd >= 0:
            self._end(reason)
        else:
            EngineFlow.close(self, reason)

    def _end(self, reason: str) -> None:
        self._cancelTimer()
        if self._target is not None:
            self.service.reactor.removeWriter(self)
            self._target.close()
            self._target = None
        if self._clientFd >= 0:
            os.close(self._clientFd)
            self._clientFd = -1
        self.service.flowEnded(self, reason)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
