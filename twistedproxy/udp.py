"""
UDP forwarding: one listening socket per UDP listener, and a session per
client with a socket of its own connected to the target.

A client's first datagram opens its L{Session}.  The session's socket is
connected to the target, so the target sees one stable source port per
client, and a reply arriving on that socket belongs to that client without
any lookup.  Replies leave through the listening socket, from the address
and port the client sent to: a listener bound to a wildcard address learns
that address from C{IP_PKTINFO} / C{IPV6_PKTINFO} on every datagram and
gives it back to C{sendmsg}.

Sockets never block and are read by the injected reactor (an
L{IReactorFDSet}).  Each readiness event drains at most L{DRAIN} datagrams
from one socket, so a client that floods the proxy leaves every other
socket its turn.  Sessions end after C{udp_timeout} without a datagram
either way; one sweep per listener, scheduled for the earliest moment a
session could have expired, finds them, so nothing is scheduled per
datagram.

Where the compiled engine of L{twistedproxy.fastudp} is built (and not
turned off with C{PORTPROXY_FASTPATH=0}), a listener hands its bound socket
to it instead of reading it: the engine forwards the datagrams of open
sessions and their expiry in its own thread, and asks the listener about
every new client (L{UDPListener.clientArrived}), which decides exactly as
above and gives the engine the session's connected socket.  The sessions
are then L{EngineSession}s.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IReadDescriptor,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import implementer

from twistedproxy import fastudp, proxyprotocol
from twistedproxy.access import TokenBucket
from twistedproxy.listener import (
    IFlow,
    ListenerService,
    clientAddress,
    listeningSocketOptions,
    nextFlowId,
)
from twistedproxy.model import ANY_IPV4, ANY_IPV6, Listener
from twistedproxy.proxyprotocol import (
    HEADERS_NONE,
    HEADERS_REFUSE,
    HEADERS_TAKE,
    Addresses,
    HeaderError,
    datagramHeader,
)
from twistedproxy.transparency import transparentSocket

log = Logger(namespace="portproxy")

#: Read size of every socket: the largest datagram the kernel can hand over,
#: so nothing is ever truncated (Twisted's C{listenUDP} default is 8192).
MAX_DATAGRAM = 65535

#: Datagrams read from one socket per readiness event.
DRAIN = 64

#: Requested receive and send buffer of a listening socket, which carries
#: every client of the listener (see L{setBuffers}).
LISTENING_BUFFER = 4 * 1024 * 1024

#: Requested receive and send buffer of a session's socket: the same, so
#: that a target answering one datagram with a burst of replies does not
#: overflow the system default (about 208 KiB, a few hundred small
#: datagrams).  A buffer costs memory only while datagrams wait in it; the
#: worst case, a session whose replies come faster than the proxy reads
#: them, is twice this (the kernel counts its overhead against a doubled
#: value), and all UDP sockets together are bounded by C{net.ipv4.udp_mem}.
SESSION_BUFFER = LISTENING_BUFFER

#: Datagrams a session holds while its target's host name is resolved;
#: later ones are dropped, as a full network queue would, and counted in
#: L{UDPListener.dropped} once the session opens.
RESOLVING_QUEUE = 8

#: Two sweeps of a listener are at least the shorter of SWEEP_GAP seconds
#: and SWEEP_FRACTION of the shortest session timeout apart: the most a
#: session outlives its timeout.
SWEEP_GAP = 1.0
SWEEP_FRACTION = 0.1

# Python 3.11 does not export it; the value is Linux's.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO_SIZE = 12
_IN6_PKTINFO_SIZE = 20
_NO_INTERFACE = bytes(4)


@implementer(IReadDescriptor, IHalfCloseableDescriptor)
class DatagramSocket:
    """
    A non-blocking datagram socket read by the reactor.

    @ivar receiver: what the datagrams read are given to.
    """

    def __init__(self, reactor, skt: socket.socket, receiver) -> None:
        self.reactor = reactor
        self.socket = skt
        self.receiver = receiver

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return type(self).__name__

    def startReading(self) -> None:
        self.reactor.addReader(self)

    def stopReading(self) -> None:
        self.reactor.removeReader(self)

    def close(self) -> None:
        self.reactor.removeReader(self)
        self.socket.close()

    def readConnectionLost(self, reason) -> None:
        """
        The reactor saw an error condition and no data, and stopped reading.
        On a UDP socket that is an ICMP error for an earlier datagram (the
        target not listening yet), not an end: reading consumes the error,
        and reading goes on.
        """
        self.doRead()
        self.startReading()

    def writeConnectionLost(self, reason) -> None:
        pass

    def connectionLost(self, reason) -> None:
        # Only a bug in doRead gets here; the socket is useless afterwards.
        log.failure("UDP socket lost", reason)
        self.socket.close()


class ListeningPort(DatagramSocket):
    """
    The listening socket of a listener bound to one address: datagrams are
    given to C{receiver.datagramReceived(data, client, None)}.
    """

    def doRead(self) -> None:
        recvfrom = self.socket.recvfrom
        received = self.receiver.datagramReceived
        for _ in range(DRAIN):
            try:
                data, client = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as e:
                log.warn("UDP receive failed: {error}", error=e)
                return
            try:
                received(data, client, None)
            except Exception:
                log.failure("UDP datagram from {client}", client=client)

    def replyRoute(self, local) -> None:
        """
        What L{write} needs to answer from C{local}: nothing, the socket's
        own address is the one the client sent to.
        """
        return None

    def write(self, data: bytes, client, route) -> None:
        self.socket.sendto(data, client)


class PacketInfoPort(ListeningPort):
    """
    The listening socket of a wildcard listener: every datagram comes with
    the local address it was sent to (C{IP_PKTINFO} / C{IPV6_PKTINFO}),
    given to C{receiver.datagramReceived(data, client, local)} as bytes,
    and a reply goes out from that address.
    """

    def __init__(self, reactor, skt: socket.socket, receiver) -> None:
        DatagramSocket.__init__(self, reactor, skt, receiver)
        if skt.family == socket.AF_INET6:
            self._level, self._type = socket.IPPROTO_IPV6, socket.IPV6_PKTINFO
            self._ancillarySize = socket.CMSG_SPACE(_IN6_PKTINFO_SIZE)
        else:
            self._level, self._type = socket.IPPROTO_IP, IP_PKTINFO
            self._ancillarySize = socket.CMSG_SPACE(_IN_PKTINFO_SIZE)

    def doRead(self) -> None:
        recvmsg = self.socket.recvmsg
        received = self.receiver.datagramReceived
        ancillarySize = self._ancillarySize
        ipv6 = self._level == socket.IPPROTO_IPV6
        for _ in range(DRAIN):
            try:
                data, ancillary, flags, client = recvmsg(MAX_DATAGRAM, ancillarySize)
            except BlockingIOError:
                return
            except OSError as e:
                log.warn("UDP receive failed: {error}", error=e)
                return
            local = None
            for level, kind, info in ancillary:
                if ipv6:
                    # in6_pktinfo: the destination address and the interface,
                    # which a link-local address needs to be usable.
                    local = info
                else:
                    # in_pktinfo: ifindex, spec_dst, addr.  spec_dst is the
                    # local address to answer from (the destination itself,
                    # or the interface's address for a broadcast).
                    local = info[4:8]
            try:
                received(data, client, local)
            except Exception:
                log.failure("UDP datagram from {client}", client=client)

    def replyRoute(self, local: bytes | None):
        """
        The ancillary data that makes C{sendmsg} answer from C{local}.
        """
        if local is None:
            return None
        if self._level == socket.IPPROTO_IP:
            # No interface: let routing pick it, only the source is fixed.
            local = _NO_INTERFACE + local + _NO_INTERFACE
        return [(self._level, self._type, local)]

    def write(self, data: bytes, client, route) -> None:
        if route is None:
            self.socket.sendto(data, client)
        else:
            self.socket.sendmsg([data], route, 0, client)


class SessionPort(DatagramSocket):
    """
    A session's socket, connected to the target: replies are given to
    C{receiver.replyReceived(data)}; L{write} is the socket's C{send}
    (after C{prefix}, a PROXY header, when there is one), and raises what
    it raises.
    """

    def __init__(
        self, reactor, skt: socket.socket, receiver, prefix: bytes = b""
    ) -> None:
        DatagramSocket.__init__(self, reactor, skt, receiver)
        if prefix:
            sendmsg = skt.sendmsg
            # Two buffers, one datagram: the payload is not copied.
            self.write = lambda data: sendmsg([prefix, data])
        else:
            self.write = skt.send

    def doRead(self) -> None:
        recv = self.socket.recv
        received = self.receiver.replyReceived
        for _ in range(DRAIN):
            try:
                data = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                # An ICMP error for an earlier datagram (nothing listening
                # at the target yet, host unreachable): reading consumed it,
                # and the session goes on.
                continue
            try:
                received(data)
            except Exception:
                log.failure("UDP reply")


def listenDatagrams(
    reactor, host: str, port: int, receiver, inherited: socket.socket | None = None
) -> ListeningPort:
    """
    Bind a listening UDP socket on C{host:port}, or use C{inherited}, a
    socket bound there already (socket activation), and start reading it.

    @raise CannotListenError: when the socket cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = host in (ANY_IPV4, ANY_IPV6)
    try:
        skt = (
            socket.socket(family, socket.SOCK_DGRAM) if inherited is None else inherited
        )
    except OSError as e:
        raise CannotListenError(host, port, e)
    try:
        skt.setblocking(False)
        if inherited is None:
            listeningSocketOptions(skt, host)
        setBuffers(skt, LISTENING_BUFFER)
        if wildcard and family == socket.AF_INET6:
            skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        elif wildcard:
            skt.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        if inherited is None:
            skt.bind((host, port))
    except OSError as e:
        skt.close()
        raise CannotListenError(host, port, e)
    kind = PacketInfoPort if wildcard else ListeningPort
    return kind(reactor, skt, receiver)


#: Linux's options that set a buffer size beyond C{net.core.rmem_max} /
#: C{wmem_max}, for a process with C{CAP_NET_ADMIN}.
_FORCE = {
    socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", 33),
    socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", 32),
}


def setBuffers(skt: socket.socket, size: int) -> None:
    """
    Ask for C{size} bytes of receive and send buffer on C{skt}: beyond the
    system's C{rmem_max} / C{wmem_max} when the process may (root, or
    C{CAP_NET_ADMIN}; their defaults, about 208 KiB, are far below what a
    burst needs), else as much as they allow.
    """
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            skt.setsockopt(socket.SOL_SOCKET, _FORCE[option], size)
        except PermissionError:
            skt.setsockopt(socket.SOL_SOCKET, option, size)


def connectedDatagramSocket(
    family: int, address: tuple, source: tuple | None = None
) -> socket.socket:
    """
    A non-blocking UDP socket connected to C{address}, with
    L{SESSION_BUFFER} buffers; sending from the client's C{source} address
    (C{client_address: transparent}) when given.

    @raise OSError: when no socket can be opened (out of file descriptors,
        the client's address not usable), or the target is unreachable.
    """
    if source is not None:
        skt = transparentSocket(family, socket.SOCK_DGRAM, source)
    else:
        skt = socket.socket(family, socket.SOCK_DGRAM)
    try:
        skt.setblocking(False)
        setBuffers(skt, SESSION_BUFFER)
        skt.connect(address)
    except BaseException:
        skt.close()
        raise
    return skt


def connectDatagrams(
    reactor,
    family: int,
    address: tuple,
    receiver,
    source: tuple | None = None,
    prefix: bytes = b"",
) -> SessionPort:
    """
    Open a UDP socket connected to C{address} (from C{source}, see
    L{connectedDatagramSocket}) and start reading it; C{prefix} goes
    before every datagram sent.

    @raise OSError: when no socket can be opened (out of file descriptors)
        or the target is unreachable.
    """
    port = SessionPort(
        reactor, connectedDatagramSocket(family, address, source), receiver, prefix
    )
    port.startReading()
    return port


@implementer(IFlow)
class Session:
    """
    One client of a UDP listener and its socket connected to the target.

    @ivar listener: the L{Listener} settings it opened under; a reconfigured
        listener leaves them alone.
    @ivar key: its key in L{UDPListener.sessions}.
    @ivar lastActive: reactor seconds of the last datagram either way.
    @ivar port: the socket connected to the target; L{None} while the
        target's host name is being resolved.
    @ivar unheld: datagrams that came while resolving, beyond the
        L{RESOLVING_QUEUE} held.
    """

    __slots__ = (
        "_owner",
        "_reply",
        "_route",
        "_seconds",
        "bucket",
        "bytesIn",
        "bytesOut",
        "client",
        "clientAddress",
        "closed",
        "headers",
        "id",
        "key",
        "lastActive",
        "listener",
        "pending",
        "port",
        "prefix",
        "source",
        "started",
        "timeout",
        "unheld",
    )

    def __init__(
        self,
        owner: UDPListener,
        key,
        client,
        route,
        local=None,
        addresses: Addresses | None = None,
        headers: int = HEADERS_NONE,
    ) -> None:
        self.id = nextFlowId()
        self.listener = owner.listener
        self.client = clientAddress(client if addresses is None else addresses.source)
        self._seconds = owner.reactor.seconds
        self.started = self.lastActive = self._seconds()
        self.bytesIn = 0
        self.bytesOut = 0
        self.key = key
        self.clientAddress = client
        self.timeout = self.listener.timeouts.udp
        self.port = None
        self.pending: list[bytes] = []
        self.unheld = 0
        self.closed = False
        self.source, self.prefix = owner.sessionIdentity(client, local, addresses)
        self.headers = headers
        self._owner = owner
        self._reply = owner.port.write
        self._route = route
        rate = self.listener.access.datagramsPerClient
        self.bucket = None if rate is None else TokenBucket(rate, self.started)

    def send(self, data: bytes) -> None:
        """
        Forward a datagram from the client to the target, unless it is
        over the session's C{datagrams_per_client}.
        """
        self.lastActive = now = self._seconds()
        if self.bucket is not None and not self.bucket.take(now):
            self._owner.limited += 1
            return
        self.bytesIn += len(data)
        port = self.port
        if port is None:
            if len(self.pending) < RESOLVING_QUEUE:
                self.pending.append(data)
            else:
                self.unheld += 1
            return
        try:
            port.write(data)
        except ConnectionRefusedError:
            # A stale ICMP error from an earlier datagram (the target was
            # not listening then) failed this send, which never left: try
            # once more, so that the first datagram after the target starts
            # listening gets through.
            try:
                port.write(data)
            except OSError:
                pass
        except OSError:
            # Send buffer full or the target unreachable: the datagram is
            # lost, as it could be on any network; the session goes on.
            pass

    def replyReceived(self, data: bytes) -> None:
        """
        Forward a datagram from the target to the client, from the address
        the client sent to.
        """
        self.lastActive = self._seconds()
        self.bytesOut += len(data)
        try:
            self._reply(data, self.clientAddress, self._route)
        except OSError:
            pass

    def connected(self, port: SessionPort) -> None:
        """
        The target's host name is resolved and C{port} connected to it:
        forward what the client sent meanwhile.
        """
        self.port = port
        # Counted as dropped only now, as the engine counts those it could
        # not hold when the session opens: a session that never opens
        # accounts for them in its access line alone, on both paths.
        self._owner._dropped += self.unheld
        pending, self.pending = self.pending, []
        for data in pending:
            # Counted when it arrived, and made ready to forward then.
            self.bytesIn -= len(data)
            Session.send(self, data)

    def close(self, reason: str) -> None:
        """
        End the session: close its socket and write its access line.
        """
        if self.closed:
            return
        self.closed = True
        if self.port is not None:
            self.port.close()
        self._owner.sessionEnded(self, reason)


class HeaderSession(Session):
    """
    A session of a listener with C{accept_proxy_protocol}: each of the
    client's datagrams loses its PROXY v2 header (from a listed source) or
    is dropped for having one (from any other), before it is forwarded.
    Other sessions pay nothing for this.
    """

    __slots__ = ()

    def send(self, data: bytes) -> None:
        try:
            length, _ = datagramHeader(self.headers, data)
        except HeaderError:
            # lost, as a datagram can be; counted with those
            self._owner._dropped += 1
            return
        Session.send(self, memoryview(data)[length:] if length else data)


@implementer(IFlow)
class EngineSession:
    """
    A session whose datagrams the compiled engine forwards: what the
    manhole and the access log see of it.  Its byte counters are read from
    the engine.

    @ivar resolving: the target's host name is being resolved, and the
        engine holds the client's datagrams meanwhile.
    """

    __slots__ = (
        "_final",
        "_owner",
        "client",
        "closed",
        "headers",
        "id",
        "key",
        "listener",
        "prefix",
        "resolving",
        "source",
        "started",
        "timeout",
    )

    def __init__(
        self,
        owner: UDPListener,
        key: bytes,
        client,
        addresses: Addresses | None = None,
        headers: int = HEADERS_NONE,
    ) -> None:
        self.id = nextFlowId()
        self.listener = owner.listener
        self.client = clientAddress(client if addresses is None else addresses.source)
        self.started = owner.reactor.seconds()
        self.key = key
        self.timeout = self.listener.timeouts.udp
        self.resolving = False
        self.closed = False
        self.source, self.prefix = owner.sessionIdentity(
            client, fastudp.localAddress(key, client), addresses
        )
        self.headers = headers
        self._owner = owner
        self._final = (0, 0)

    def _counters(self) -> tuple[int, int]:
        if not self.closed and not self.resolving:
            counters = self._owner.engine.counters(self.id)
            if counters is not None:
                return counters
        return self._final

    @property
    def bytesIn(self) -> int:
        return self._counters()[0]

    @property
    def bytesOut(self) -> int:
        return self._counters()[1]

    def ended(self, bytesIn: int, bytesOut: int, reason: str) -> None:
        """
        The engine no longer has the session: keep its last counters and
        write its access line.
        """
        if self.closed:
            return
        self._final = (bytesIn, bytesOut)
        self.closed = True
        self._owner.sessionEnded(self, reason)

    def close(self, reason: str) -> None:
        """
        End the session now: the engine closes its socket.
        """
        if self.closed:
            return
        engine = self._owner.engine
        if self.resolving:
            counters = (engine.dropPending(self.key)[1], 0)
        else:
            counters = engine.closeSession(self.id)
            if counters is None:
                # The engine ended it a moment ago; its report, waiting on
                # the engine's eventfd, writes the access line.
                return
        self.ended(counters[0], counters[1], reason)


@implementer(IResolutionReceiver)
class _TargetResolution:
    """
    Connects a session once its target's host name resolves.
    """

    def __init__(self, owner: UDPListener, session: Session) -> None:
        self.owner = owner
        self.session = session
        self.address = None

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        if self.address is None:
            self.address = address

    def resolutionComplete(self) -> None:
        self.owner.targetResolved(self.session, self.address)


class UDPListener(ListenerService):
    """
    A UDP listening socket and its sessions, one per client.

    @ivar sessions: open sessions by client key: the client's address, and
        for a wildcard listener also the local address it sent to.
    @ivar port: the listening socket, L{None} until L{bind}.
    @ivar engine: the L{fastudp.UDPEngine} that forwards the datagrams, or
        L{None} when this listener forwards them itself.
    """

    proto = "udp"

    def __init__(self, listener: Listener, reactor) -> None:
        ListenerService.__init__(self, listener, reactor)
        self.sessions: dict = {}
        self.port = None
        self._sweep = None
        self._dropped = 0
        #: Datagrams over C{datagrams_per_client} dropped in Python.
        self.limited = 0
        self.engine = fastudp.engineFor(reactor)
        self._engineId = None
        self._readTarget()

    # -- sockets: the places that touch the network ----------------------

    def openListeningPort(self):
        """
        Bind the listening socket; its datagrams come to
        L{datagramReceived}.
        """
        return listenDatagrams(
            self.reactor,
            self.listener.host,
            self.listener.port,
            self,
            self.inheritedSocket,
        )

    def openSessionPort(self, session: Session, family: int, address: tuple):
        """
        Open C{session}'s socket connected to the target at C{address}; its
        datagrams come to L{Session.replyReceived}.

        @raise OSError: when that fails.
        """
        return connectDatagrams(
            self.reactor, family, address, session, session.source, session.prefix
        )

    def openSessionSocket(
        self, family: int, address: tuple, source: tuple | None = None
    ) -> socket.socket:
        """
        Open a non-blocking socket connected to the target at C{address}
        (from the client's C{source} address when given), for the engine
        to read and write.

        @raise OSError: when that fails.
        """
        return connectedDatagramSocket(family, address, source)

    def sessionIdentity(
        self, client: tuple, local: bytes | None, addresses: Addresses | None = None
    ) -> tuple[tuple | None, bytes]:
        """
        What a new session of C{client} (which sent to the local address
        C{local}, packed, or to the listener's own address when L{None};
        or the client and destination of its PROXY header, C{addresses})
        sends the target as the client: the address to send from
        (C{client_address: transparent}) or L{None}, and the PROXY header
        before each datagram (C{proxy_protocol_v2}) or C{b""}.
        """
        identity = self.listener.identity
        if not identity.clientAddress:
            return None, b""
        if addresses is not None:
            if identity.transparent:
                return addresses.source, b""
            return None, proxyprotocol.encode(2, addresses, datagram=True)
        source = (client[0], client[1])
        if identity.transparent:
            return source, b""
        if local is None:
            destination = (self.listener.host, self.listener.port)
        else:
            # in6_pktinfo starts with the address; in_pktinfo's is 4 bytes
            family = socket.AF_INET6 if len(local) > 4 else socket.AF_INET
            packed = local[:16] if family == socket.AF_INET6 else local
            destination = (socket.inet_ntop(family, packed), self.listener.port)
        return None, proxyprotocol.encode(
            2, Addresses(source, destination), datagram=True
        )

    # -- lifecycle -----------------------------------------------------

    @property
    def bound(self) -> bool:
        return self.port is not None

    def bind(self) -> None:
        self.port = self.openListeningPort()

    def startService(self) -> None:
        ListenerService.startService(self)
        if not self.bound:
            self.bind()
        if self.engine is not None and self._engineId is None:
            try:
                self._engineId = self.engine.addListener(
                    self.port.socket, isinstance(self.port, PacketInfoPort), self
                )
            except (OSError, RuntimeError) as e:
                # No thread could be started (or the engine is stopped):
                # this listener forwards its datagrams itself.
                log.warn(
                    "udp {mapping}: the compiled engine cannot take the "
                    "listener ({error}); forwarding in Python",
                    mapping=self.listener.mapping,
                    error=e,
                )
                self.engine = None
        if self.engine is None:
            self.port.startReading()

    def stopService(self) -> None:
        """
        Close the listening socket and every session.
        """
        ListenerService.stopService(self)
        ended = {}
        if self._engineId is not None:
            ended = self.engine.removeListener(self._engineId)
            self._engineId = None
        if self.port is not None:
            self.port.close()
            self.port = None
        for session in list(self.sessions.values()):
            if session.id in ended:
                session.ended(*ended[session.id], "listener closed")
            else:
                session.close("listener closed")
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None

    def reconfigure(self, listener: Listener) -> None:
        ListenerService.reconfigure(self, listener)
        self._readTarget()

    @property
    def dropped(self) -> int:
        """
        Datagrams of clients whose session was not open yet that were lost
        for want of room or of a socket: those beyond what is held while a
        session opens (L{RESOLVING_QUEUE}; the engine's own bounds of held
        clients, datagrams and bytes), and every datagram of a client no
        socket could be opened for.  Rejected clients are counted in
        C{counters.rejected} instead.
        """
        dropped = self._dropped
        if self._engineId is not None:
            counters = self.engine.listenerCounters(self._engineId)
            if counters is not None:
                dropped += counters[1]
        return dropped

    @property
    def refused(self) -> int:
        """
        Clients refused a session, and datagrams dropped over
        C{datagrams_per_client}, by Python or by the engine.
        """
        refused = self.counters.rejected + self.limited
        if self._engineId is not None:
            counters = self.engine.listenerCounters(self._engineId)
            if counters is not None:
                refused += counters[2]
        return refused

    def disable(self) -> None:
        """
        Drop datagrams from new clients; open sessions go on.
        """
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _readTarget(self) -> None:
        target = self.listener.target
        if isIPAddress(target.host):
            self._targetAddress = (socket.AF_INET, (target.host, target.port))
        elif isIPv6Address(target.host):
            self._targetAddress = (socket.AF_INET6, (target.host, target.port))
        else:
            self._targetAddress = None

    # -- datagrams -----------------------------------------------------

    def datagramReceived(self, data: bytes, client, local) -> None:
        """
        A datagram from C{client}, sent to C{local} (L{None} when the
        listener is bound to one address): forward it in the client's
        session, opening one when there is none.
        """
        key = client if local is None else (client, local)
        session = self.sessions.get(key)
        if session is None:
            session = self.openSession(key, client, local, data)
            if session is None:
                return
        session.send(data)

    def headerMode(self, client: tuple) -> int:
        """
        What C{client}'s session does with PROXY headers
        (L{proxyprotocol.HEADERS_NONE} on a listener without
        C{accept_proxy_protocol}).
        """
        identity = self.listener.identity
        if not identity.acceptProxyProtocol:
            return HEADERS_NONE
        return HEADERS_TAKE if identity.trusts(client[0]) else HEADERS_REFUSE

    def openSession(self, key, client, local, first: bytes = b"") -> Session | None:
        """
        Open a session for C{client}, whose C{first} datagram opens it, or
        say why not and return L{None}.
        """
        headers = self.headerMode(client)
        try:
            _, addresses = datagramHeader(headers, first)
        except HeaderError as e:
            self.rejected(clientAddress(client), str(e), "header")
            return None
        # The real client is known here: admission.
        real = client if addresses is None else addresses.source
        refusal = self.admit(real[0])
        if refusal is not None:
            self.rejected(clientAddress(real), refusal)
            return None
        kind = HeaderSession if headers else Session
        session = kind(
            self, key, client, self.port.replyRoute(local), local, addresses, headers
        )
        if self._targetAddress is not None:
            family, address = self._targetAddress
            try:
                session.port = self.openSessionPort(session, family, address)
            except OSError as e:
                self._sessionFailed(session, e)
                return None
        else:
            self._resolveTarget(session)
        self.sessions[key] = session
        self.flowStarted(session)
        self._sweepBy(session.lastActive + session.timeout)
        return session

    def _resolveTarget(self, session) -> None:
        """
        Look the target's host name up for C{session}, without blocking;
        L{targetResolved} follows.
        """
        self.reactor.nameResolver.resolveHostName(
            _TargetResolution(self, session),
            session.listener.target.host,
            session.listener.target.port,
            transportSemantics="UDP",
        )

    def clientArrived(self, key: bytes, client: tuple) -> None:
        """
        The engine holds a datagram from C{client}, which has no session
        under the engine's C{key}: open one as L{openSession} would, or
        have the engine drop what it holds.
        """
        engine = self.engine
        why = kind = addresses = None
        headers = self.headerMode(client)
        if headers:
            try:
                _, addresses = datagramHeader(headers, engine.firstPending(key) or b"")
            except HeaderError as e:
                why, kind = str(e), "header"
        real = client if addresses is None else addresses.source
        # The real client is known here: admission.
        if why is None:
            why = self.admit(real[0])
        if why is not None:
            datagrams, _ = engine.dropPending(key)
            # every datagram the client sent meanwhile counts, as each
            # would without the engine
            self.rejected(clientAddress(real), why, kind, max(datagrams, 1))
            return
        session = EngineSession(self, key, client, addresses, headers)
        if self._targetAddress is not None:
            family, address = self._targetAddress
            try:
                skt = self.openSessionSocket(family, address, session.source)
            except OSError as e:
                datagrams, _ = engine.dropPending(key)
                self._sessionFailed(session, e, max(datagrams, 1))
                return
            try:
                engine.addSession(
                    self,
                    key,
                    skt,
                    session.id,
                    session.timeout,
                    session.prefix,
                    session.headers,
                    session.listener.access.datagramsPerClient,
                )
            except ValueError:
                # the listener stopped meanwhile
                skt.close()
                engine.dropPending(key)
                return
        else:
            session.resolving = True
            self._resolveTarget(session)
        self.sessions[key] = session
        self.flowStarted(session)

    def sessionExpired(self, flowId: int, bytesIn: int, bytesOut: int) -> None:
        """
        The engine ended a session quiet for its timeout.
        """
        session = self.flows.get(flowId)
        if isinstance(session, EngineSession):
            session.ended(
                bytesIn, bytesOut, f"no datagram for {_seconds(session.timeout)}"
            )

    def targetResolved(self, session: Session, address) -> None:
        """
        C{session}'s target host name resolved to C{address} (L{None} when
        it did not resolve).
        """
        if session.closed:
            return
        target = session.listener.target
        if address is None:
            session.close(f"cannot resolve {target.host}")
            return
        if isIPv6Address(address.host):
            family = socket.AF_INET6
            where = (address.host, target.port, address.flowInfo, address.scopeID)
        else:
            family = socket.AF_INET
            where = (address.host, target.port)
        if isinstance(session, EngineSession):
            self._engineTargetResolved(session, family, where)
            return
        try:
            port = self.openSessionPort(session, family, where)
        except OSError as e:
            session.close(f"cannot open a socket to {target}: {e.strerror}")
            return
        session.connected(port)

    def _engineTargetResolved(
        self, session: EngineSession, family: int, where: tuple
    ) -> None:
        try:
            skt = self.openSessionSocket(family, where, session.source)
        except OSError as e:
            session.close(
                f"cannot open a socket to {session.listener.target}: {e.strerror}"
            )
            return
        try:
            self.engine.addSession(
                self,
                session.key,
                skt,
                session.id,
                session.timeout,
                session.prefix,
                session.headers,
                session.listener.access.datagramsPerClient,
            )
        except ValueError:
            skt.close()
            session.close("listener closed")
            return
        session.resolving = False

    def sessionEnded(self, session: Session, reason: str) -> None:
        """
        Forget a closed session and write its access line.
        """
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        self.flowEnded(session, reason)

    def _sessionFailed(
        self, session: Session, error: OSError, datagrams: int = 1
    ) -> None:
        """
        No socket could be opened for C{session}, which never opened: its
        C{datagrams} are dropped, counted, and logged (once a second at
        most).
        """
        self._dropped += datagrams
        if error.errno in (errno.EMFILE, errno.ENFILE):
            why = "out of file descriptors"
        else:
            why = error.strerror or str(error)
        self.notice(
            "session",
            "udp {mapping} dropped a datagram from {client}: cannot open a "
            "socket to {target}: {why}",
            mapping=self.listener.mapping,
            client=session.client,
            target=self.listener.target,
            why=why,
        )

    # -- expiry --------------------------------------------------------

    def _sweepBy(self, when: float) -> None:
        """
        Make sure a sweep runs at C{when} or earlier.
        """
        sweep = self._sweep
        if sweep is not None and sweep.active():
            if sweep.getTime() <= when:
                return
            sweep.cancel()
        self._sweep = self.reactor.callLater(
            max(0.0, when - self.reactor.seconds()), self._expire
        )

    def _expire(self) -> None:
        """
        End the sessions that were quiet for their timeout, and schedule
        the next sweep for when the next one could expire.
        """
        self._sweep = None
        now = self.reactor.seconds()
        quiet = []
        due = None
        gap = SWEEP_GAP
        for session in self.sessions.values():
            expires = session.lastActive + session.timeout
            if expires <= now:
                quiet.append(session)
            else:
                if due is None or expires < due:
                    due = expires
                gap = min(gap, session.timeout * SWEEP_FRACTION)
        for session in quiet:
            session.close(f"no datagram for {_seconds(session.timeout)}")
        if due is not None:
            self._sweepBy(max(due, now + gap))


def _seconds(duration: float) -> str:
    return f"{duration:g}s"
