"""
Where UDP datagrams are copied in Python: the listening socket's reader
(L{ListeningPort}, L{PacketInfoPort}), each session's socket connected to
the target (L{SessionPort}), and the session (L{Session}) that forwards a
client's datagrams one way and the target's replies the other.

Sockets never block and are read by the injected reactor (an
L{IReactorFDSet}).  Each readiness event drains at most L{DRAIN} datagrams
from one socket, so a client that floods the proxy leaves every other
socket its turn.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, cast

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IReadDescriptor,
)
from twisted.logger import Logger
from zope.interface import implementer

from twistedproxy.access import TokenBucket
from twistedproxy.listener import (
    IFlow,
    clientAddress,
    listeningSocketOptions,
    nextFlowId,
)
from twistedproxy.model import ANY_IPV4, ANY_IPV6
from twistedproxy.proxyprotocol import (
    HEADERS_NONE,
    Addresses,
    HeaderError,
    datagramHeader,
)
from twistedproxy.transparency import transparentSocket

if TYPE_CHECKING:
    from twistedproxy.udp.listener import UDPListener

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

    def doRead(self) -> None:
        """
        Read what is waiting; each kind of socket knows how.
        """
        raise NotImplementedError(type(self).__name__)

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

    #: Whether every datagram comes with the local address it was sent to.
    pktinfo = False

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

    def replyRoute(self, local) -> list | None:
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

    pktinfo = True

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
                data, ancillary, _flags, client = recvmsg(MAX_DATAGRAM, ancillarySize)
            except BlockingIOError:
                return
            except OSError as e:
                log.warn("UDP receive failed: {error}", error=e)
                return
            local = None
            for _level, _kind, info in ancillary:
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
        raise CannotListenError(host, port, e) from e
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
        raise CannotListenError(host, port, e) from e
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
        self.port: SessionPort | None = None
        self.pending: list[bytes | memoryview] = []
        self.unheld = 0
        self.closed = False
        self.source, self.prefix = owner.sessionIdentity(client, local, addresses)
        self.headers = headers
        self._owner = owner
        listening = owner.port
        assert listening is not None, "a session of an unbound listener"
        self._reply = listening.write
        self._route = route
        rate = self.listener.access.datagramsPerClient
        self.bucket = None if rate is None else TokenBucket(rate, self.started)

    def send(self, data: bytes | memoryview) -> None:
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

    def send(self, data: bytes | memoryview) -> None:
        try:
            # Only a datagram as read, bytes, comes here.
            length, _ = datagramHeader(self.headers, cast(bytes, data))
        except HeaderError:
            # lost, as a datagram can be; counted with those
            self._owner._dropped += 1
            return
        Session.send(self, memoryview(data)[length:] if length else data)


def quietFor(timeout: float) -> str:
    """
    Why a session quiet for its C{timeout} ended, as its access line says.
    """
    return f"no datagram for {timeout:g}s"
