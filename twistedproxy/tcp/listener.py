"""
Where a TCP listener starts: its service (L{TCPListener}), its listening
socket (L{ListeningPort}) and the factory of its relays.

The listener binds, pauses and resumes its socket, admits each client
(L{ListenerService.admit}) and learns who it is (its PROXY header, or its
socket); how the client's bytes are carried is its forwarder's business
(L{twistedproxy.tcp.forwarder}).
"""

from __future__ import annotations

import functools
import socket
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from twistedproxy import proxyprotocol, tls
from twistedproxy.compat import closeWithoutShutdown, reserveDescriptor
from twistedproxy.listener import (
    ListenerService,
    clientAddress,
    listeningSocketOptions,
)
from twistedproxy.model import ANY_IPV4, ANY_IPV6, TCP, Listener
from twistedproxy.proxyprotocol import Addresses, HeaderError, HeaderReader
from twistedproxy.tcp.engine import TCPEngine
from twistedproxy.tcp.forwarder import ITCPForwarder, PythonForwarder, tcpForwarder
from twistedproxy.tcp.relay import (
    Relay,
    RoutingRelay,
    TerminatingRelay,
)

if TYPE_CHECKING:
    from twistedproxy.tcp.tlsengine import TLSEngine

#: Used when C{/proc/sys/net/core/somaxconn} cannot be read.
DEFAULT_BACKLOG = 4096


#: Seconds a client of a listener with C{accept_proxy_protocol} has to
#: send its PROXY header (or, from an unlisted source, its first bytes).
HEADER_TIMEOUT = 3.0


@functools.cache
def listenBacklog(path: str = "/proc/sys/net/core/somaxconn") -> int:
    """
    The accept queue length to ask for: the kernel's ceiling, so that a
    burst of connects is queued rather than dropped.

    Read once and kept, not once per listener (100,000 reads for a
    100,000-port map, one per port published); the root service forgets
    it (C{listenBacklog.cache_clear()}) at each reload, so that the
    listeners a reload adds after C{sysctl net.core.somaxconn} was raised
    get the new ceiling (C{listen()} clamps to the value of its time).
    """
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


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

    #: The listener's relay factory (wrapped in TLS when it terminates it);
    #: its C{service} is the listener.
    factory: Any

    #: A bound socket to listen on instead of binding one (socket
    #: activation).
    inherited: socket.socket | None = None

    _logPrefix: str | None = None

    def logPrefix(self) -> str:
        """
        Twisted's prefix for the port's log lines (its factory's class),
        made once: the reactor asks for it at every readable event.
        """
        if self._logPrefix is None:
            self._logPrefix = tcp.Port.logPrefix(self)
        return self._logPrefix

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
        self._logger = Logger(
            namespace="portproxy", observer=cast(ILogObserver, self._acceptLogged)
        )
        self.factory.doStart()
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
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
            self.shed(clientAddress(event["address"]))
        elif "acceptError" in event:
            service.notice(
                "accept",
                "{proto} {mapping} {listen}: could not accept a client ({error})",
                proto=listener.proto,
                mapping=listener.mapping,
                listen=listener.listen,
                error=event["acceptError"],
            )

    def shed(self, client: str) -> None:
        """
        Log, at a bounded rate, that C{client} (C{host:port}) was closed at
        once for want of file descriptors.
        """
        listener = self.factory.service.listener
        self.factory.service.notice(
            "emfile",
            "{proto} {mapping} {listen}: out of file descriptors; closed "
            "client {client} at once",
            proto=listener.proto,
            mapping=listener.mapping,
            listen=listener.listen,
            client=client,
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
        Clients are waiting: the listener's forwarder accepts them.
        """
        self.factory.service.forwarder.acceptClients(self)

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

    def __init__(
        self,
        listener: Listener,
        reactor,
        backlog: int | None = None,
        engine: TCPEngine | None = None,
    ) -> None:
        ListenerService.__init__(self, listener, reactor)
        self.backlog = listenBacklog() if backlog is None else backlog
        self._port: ListeningPort | None = None
        self.targetIsAddress = _isAddress(listener.target.host)
        self.engine = engine
        #: The TLS engine (L{twistedproxy.tcp.tlsengine.TLSEngine}) that
        #: terminates the TLS of C{tls:} listeners, or L{None}; the root
        #: service sets it, with the TCP engine.
        self.tlsEngine: TLSEngine | None = None
        #: What carries the clients' bytes: picked by L{bind}.
        self.forwarder: ITCPForwarder = PythonForwarder()

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
        factory: Any = RelayFactory(self)
        if _terminates(self.listener):
            factory = tls.serverFactory(self, factory)
            # The port finds its listener through its factory.
            factory.service = self
        return factory

    def tlsEngineApplies(self) -> bool:
        """
        Whether this listener's TLS goes to the TLS engine (see
        L{twistedproxy.tcp.tlsengine.applies}).
        """
        return self.tlsEngine is not None and self.tlsEngine.applies(self.listener)

    def bind(self) -> None:
        self.forwarder = tcpForwarder(self, self.engine)
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


def _terminates(listener: Listener) -> bool:
    return listener.tls is not None and listener.tls.terminate is not None
