"""
Where TCP bytes are copied in Python: the relay between each accepted
client and its own connection to the target, and how a client the proxy
cannot serve is ended.

Each client Twisted accepts for a L{twistedproxy.tcp.listener.TCPListener}
becomes a L{Relay} (the client-side protocol, and the L{IFlow} the
manhole and the access log see), which dials the target and hands the
target connection to a L{TargetSide} protocol.  The relay keeps one
L{Phase} and an L{End} per side; each side's end of stream and close are
handled once, for an end and the other one.  The two
protocols do nothing on the hot path but count and write; flow control is
Twisted's own: each transport is the other's streaming producer, so a
side that cannot keep up stops the reading of the other, and memory per
connection stays at about two transport write buffers.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import (
    ConnectError,
    ConnectionAborted,
    ConnectionDone,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReadDescriptor,
    IResolutionReceiver,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy import proxyprotocol, tls
from twistedproxy.access import hostOf
from twistedproxy.compat import transportIdle
from twistedproxy.listener import (
    IFlow,
    clientAddress,
    nextFlowId,
    refusalResets,
)
from twistedproxy.model import Listener, formatHostPort
from twistedproxy.proxyprotocol import Addresses
from twistedproxy.transparency import bindTransparent

if TYPE_CHECKING:
    from twistedproxy.tcp.listener import TCPListener

#: The idle check runs this many times per C{idle_timeout}, so a quiet
#: connection is closed between 1 and 1 + 1/IDLE_CHECKS timeouts after
#: its last byte, at the cost of a few timer calls per timeout and no
#: work at all per relayed chunk.
IDLE_CHECKS = 4

#: C{SO_LINGER} on, zero seconds: closing then sends a TCP reset.
_LINGER_RESET = struct.pack("ii", 1, 0)

#: A client whose target cannot be reached gets a FIN at once; what it
#: sends then is read and dropped until it closes too, for at most this
#: many seconds and bytes, because closing a socket with unread data makes
#: Linux send a reset instead of (or right after) the FIN.
FAREWELL_SECONDS = 2.0
FAREWELL_BYTES = 1 << 20
#: At most this many such clients wait at once, and at most a quarter of
#: the process's descriptor limit: past it (a flood of clients over a
#: limit, a dead target under load) a client gets its FIN and its socket
#: is closed at once, so that the flood cannot hold a descriptor per client
#: for L{FAREWELL_SECONDS} and starve the other listeners; one that had
#: sent more than was read then gets a reset.
FAREWELL_CLIENTS = 1024


def farewellRoom() -> int:
    """
    How many clients L{ClosingClient} lets wait at once now: the process's
    descriptor limit is read each time, as it may be changed while it runs
    (C{prlimit}).
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return FAREWELL_CLIENTS
    return min(FAREWELL_CLIENTS, soft // 4)


class HandedOff(ConnectionDone):
    """
    The connection's socket went to the relay engine: for the protocol this
    transport is gone, but the TCP connection goes on, and the flow's end
    is reported by L{twistedproxy.tcp.engine.TCPEngine} later.
    """

    def __str__(self) -> str:
        return "handed to the relay engine"


def canHandOff(transport) -> bool:
    """
    Whether C{transport} is a connected plain TCP transport that can leave
    the reactor without losing a byte: open both ways, nothing buffered to
    write, not closing, not TLS.
    """
    return transportIdle(transport) and not getattr(transport, "TLS", False)


def releaseTransport(transport) -> None:
    """
    Make a Twisted TCP transport forget its socket without ending the
    connection, and tell its protocol, with L{HandedOff}, that it is gone.

    The caller must already hold another descriptor of the socket (an
    C{os.dup} of C{transport.fileno()}): this closes the transport's own
    descriptor with a plain C{close()}, which sends nothing while another
    descriptor keeps the socket open.  Neither C{loseConnection} (which calls
    C{shutdown}, a FIN) nor C{abortConnection} (which sets C{SO_LINGER} to
    zero on the shared socket, a reset when the last descriptor closes)
    would do.
    """
    # A registered producer would be stopped (and so closed) by
    # connectionLost; the relay's two transports are each other's.
    transport.unregisterProducer()
    transport.stopReading()
    transport.stopWriting()
    # Closed here, Twisted's own close in connectionLost finds no socket and
    # its shutdown() fails with EBADF, which it ignores.
    transport.socket.close()
    transport.connectionLost(Failure(HandedOff()))


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


def refuseDescriptor(fd: int, reason: str, reactor) -> None:
    """
    End a client refused for C{reason} (from
    L{twistedproxy.listener.ListenerService.admit}) that is still a bare
    socket descriptor C{fd}: a reset, or a clean close through
    L{ClosingClient}, as L{refusalResets} says.
    """
    if refusalResets(reason):
        resetDescriptor(fd)
    else:
        ClosingClient(fd, reactor).start()


def refuseTransport(transport, reason: str, reactor) -> None:
    """
    End a client refused for C{reason} whose Twisted C{transport} exists
    already, as L{refuseDescriptor} ends a bare descriptor.
    """
    if refusalResets(reason):
        resetConnection(transport)
        return
    # Before its handshake a TLS transport would abort (a reset) rather
    # than close: the client is ended below its TLS layer, as a bare
    # descriptor of the engine is.
    if tls.isTLSTransport(transport):
        transport = transport.transport
    ClosingClient.takeOver(transport, reactor)


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
    has no address) or turned away over a limit, ended the same way on
    every path: a FIN at once
    (C{shutdown(SHUT_WR)}, so the client reads a clean end of stream, as
    from docker-proxy), then whatever the client sent or still sends read
    and dropped until it closes its end, L{FAREWELL_SECONDS} pass or
    L{FAREWELL_BYTES} were dropped, and the socket closed.  At most
    L{farewellRoom} wait at once; past that the socket is closed right
    after its FIN.

    @cvar waiting: how many are waiting now, for all listeners.
    """

    waiting = 0

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
            self._socket.close()
            return
        if self._dropInput() or ClosingClient.waiting >= farewellRoom():
            self._socket.close()
            return
        ClosingClient.waiting += 1
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
            ClosingClient.waiting -= 1

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


def proxyHeader(listener: Listener, addresses: Addresses | None) -> bytes:
    """
    The PROXY header a flow of C{listener} sends the target first, or
    C{b""}: for both paths.
    """
    version = listener.identity.proxyProtocolVersion
    if not version:
        return b""
    assert addresses is not None, "identity settings identify every client"
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
        # No timeout (None, which Twisted takes): the relay has its own.
        tcp.Connector.__init__(self, host, port, factory, None, None, reactor)  # type: ignore[arg-type]
        self.source = source

    def _makeTransport(self) -> tcp.Client:
        return _TransparentClient(self.host, self.port, self.source, self, self.reactor)


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


class Phase(Enum):
    """
    Where a L{Relay} stands as a whole.
    """

    #: Accepted: being identified and admitted.
    NEW = "new"
    #: Admitted: the target is being resolved and dialed.
    DIALING = "dialing"
    #: The dial is over: it connected, or was given up.
    DIALED = "dialed"
    #: The access line is written, or the engine took the flow over.
    ENDED = "ended"


class EndState(Enum):
    """
    Where one end (client or target) of a L{Relay} stands.
    """

    #: Not part of the flow yet: not admitted, or not connected.
    WAITING = "waiting"
    #: Connected both ways.
    OPEN = "open"
    #: It sent its end of stream (the other end was half-closed); still
    #: connected.
    FINISHED = "finished"
    #: Its connection is closed.
    CLOSED = "closed"


class End:
    """
    One end of a L{Relay}, the client's or the target's: its connection
    and where it stands.  The relay's handlers are written once, for an
    end and the other one.

    @ivar transport: its Twisted transport, once it is connected.
    """

    __slots__ = ("finishedReason", "resetReason", "state", "transport")

    def __init__(self, name: str) -> None:
        self.state = EndState.WAITING
        self.transport: Any = None
        #: the access line's reason when this end finished sending first
        self.finishedReason = f"{name} closed"
        self.resetReason = f"reset by {name}"

    @property
    def open(self) -> bool:
        """
        Whether its connection is part of the flow and not closed.
        """
        return self.state in (EndState.OPEN, EndState.FINISHED)


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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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
    transport: Any = None

    def __init__(self, service: TCPListener, address) -> None:
        self.service = service
        self.reactor: Any = service.reactor
        self.listener = service.listener
        self.client = clientAddress(address)
        self.bytesIn = 0
        self.bytesOut = 0
        self.reason: str | None = None
        self._finishedFirst: str | None = None
        #: the target's transport, also on its L{End}: the hot path's
        #: one attribute lookup
        self.targetTransport: Any = None
        self.phase = Phase.NEW
        self.clientEnd = End("client")
        self.targetEnd = End("target")
        self._connector: Any = None
        self._hosts: list[str] = []
        self._timer: IDelayedCall | None = None
        self._seen = 0
        self._quietChecks = 0
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
        assert addresses is not None, "identified without a problem"
        self.addresses = addresses
        self.client = formatHostPort(*addresses.source)
        self._admit()

    def _admit(self) -> None:
        service = self.service
        # Admission, with the real client.
        refusal = service.admit(hostOf(self.client))
        if refusal is not None:
            refuseTransport(self.transport, refusal, self.reactor)
            service.rejected(self.client, refusal)
            return
        self.clientEnd.transport = self.transport
        self.clientEnd.state = EndState.OPEN
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
        self._finished(self.clientEnd, self.targetEnd)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # A rejected client never was a flow: its end never opened.
        self._lost(self.clientEnd, self.targetEnd, reason)

    # -- dialing the target -------------------------------------------------

    def _dial(self) -> None:
        target = self.listener.target
        self.phase = Phase.DIALING
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
        if self.phase is not Phase.DIALING:
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
        factory: Any
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
            assert self.addresses is not None, "identity settings identify it"
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
        if self.phase is not Phase.DIALING:
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
        self.clientEnd.state = EndState.CLOSED
        ClosingClient.takeOver(self.transport, self.reactor)
        self._maybeEnded()

    def _stopDialing(self) -> None:
        if self.phase is Phase.DIALING:
            self.phase = Phase.DIALED
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
        if self.phase is not Phase.DIALING:
            transport.abortConnection()
            return
        self.phase = Phase.DIALED
        self._cancelTimer()
        self.targetTransport = self.targetEnd.transport = transport
        self.targetEnd.state = EndState.OPEN
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
        self._finished(self.targetEnd, self.clientEnd)

    def targetLost(self, reason: Failure) -> None:
        """
        The target connection is closed.
        """
        self._lost(self.targetEnd, self.clientEnd, reason)

    # -- either end ---------------------------------------------------------

    def _finished(self, end: End, other: End) -> None:
        """
        C{end} will send no more (FIN): finish sending to C{other}.
        """
        if end.state is not EndState.OPEN:
            return
        end.state = EndState.FINISHED
        if self._finishedFirst is None:
            self._finishedFirst = end.finishedReason
        # Unregistered, C{end} is not resumed when C{other}'s buffer drains
        # (Twisted would read the end of stream a second time).
        other.transport.unregisterProducer()
        other.transport.loseWriteConnection()
        if other.state is EndState.FINISHED:
            self._closeBoth()

    def _lost(self, end: End, other: End, reason: Failure) -> None:
        """
        C{end}'s connection is closed: close C{other} the same way (a
        reset for a reset, else once its buffer has gone out).
        """
        if not end.open or reason.check(HandedOff):
            # Not part of the flow, or taken over by the relay engine.
            return
        if self._proxyStopping():
            return
        end.state = EndState.CLOSED
        if not reason.check(ConnectionDone, ConnectionAborted):
            self._because(end.resetReason)
            if other.open:
                resetConnection(other.transport)
        elif other.open:
            flushAndClose(other.transport)
        self._stopDialing()
        self._maybeEnded()

    def _handOff(self) -> bool:
        """
        Offer both connections to the listener's forwarder: when it takes
        them (the compiled engine, when nothing is buffered), the flow it
        returns stands for this one from now on, and this relay is done.
        """
        flow = self.service.forwarder.established(self)
        if flow is None:
            return False
        self.phase = Phase.ENDED
        self.service.flows[self.id] = flow
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
        # The reactor drops the connect itself.
        if self.phase is Phase.DIALING:
            self.phase = Phase.DIALED
        self._hosts = []
        self._connector = None
        for end in (self.clientEnd, self.targetEnd):
            if end.open:
                end.state = EndState.CLOSED
        self._maybeEnded()
        return True

    def _because(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _maybeEnded(self) -> None:
        if self.phase is Phase.ENDED or self.clientEnd.open or self.targetEnd.open:
            return
        self.phase = Phase.ENDED
        self._cancelTimer()
        self.service.flowEnded(self, self.reason or self._finishedFirst or "closed")

    def close(self, reason: str) -> None:
        """
        End the flow now, dropping whatever is still buffered either way.
        """
        self._because(reason)
        self._stopDialing()
        for end in (self.targetEnd, self.clientEnd):
            if end.open:
                end.transport.abortConnection()


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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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
