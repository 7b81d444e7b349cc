"""
Where a UDP listener starts: its service (L{UDPListener}), which binds the
listening socket, admits new clients, keeps the session table and ends
quiet sessions.

A client's first datagram opens its session.  The session's socket is
connected to the target, so the target sees one stable source port per
client, and a reply arriving on that socket belongs to that client without
any lookup.  Replies leave through the listening socket, from the address
and port the client sent to: a listener bound to a wildcard address learns
that address from C{IP_PKTINFO} / C{IPV6_PKTINFO} on every datagram and
gives it back to C{sendmsg}.

Sessions end after C{udp_timeout} without a datagram either way; one
sweep per listener, scheduled for the earliest moment a session could
have expired, finds them, so nothing is scheduled per datagram.

How the datagrams are carried is the listener's forwarder's business
(L{twistedproxy.udp.forwarder}): Python's (L{twistedproxy.udp.relay}),
or the compiled engine's (L{twistedproxy.udp.engine}), which forwards
the datagrams of open sessions and their expiry in its own thread and
asks the listener about every new client.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IDelayedCall, IResolutionReceiver
from zope.interface import implementer

from twistedproxy import proxyprotocol
from twistedproxy.listener import ListenerService, clientAddress
from twistedproxy.model import Listener
from twistedproxy.proxyprotocol import (
    HEADERS_NONE,
    HEADERS_REFUSE,
    HEADERS_TAKE,
    Addresses,
    HeaderError,
    datagramHeader,
)
from twistedproxy.udp.forwarder import IUDPForwarder, PythonForwarder, startForwarder
from twistedproxy.udp.relay import (
    ListeningPort,
    Session,
    connectDatagrams,
    connectedDatagramSocket,
    listenDatagrams,
    quietFor,
)

if TYPE_CHECKING:
    from twistedproxy.udp.engine import EngineSession, UDPEngine

#: Two sweeps of a listener are at least the shorter of SWEEP_GAP seconds
#: and SWEEP_FRACTION of the shortest session timeout apart: the most a
#: session outlives its timeout.
SWEEP_GAP = 1.0
SWEEP_FRACTION = 0.1


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
    A UDP listening socket and its sessions, one per client: admission of
    new clients, the session table and its expiry.  Its L{forwarder}
    carries the datagrams.

    @ivar sessions: open sessions by client key: the client's address, and
        for a wildcard listener also the local address it sent to (the
        engine's own key on the compiled path).
    @ivar port: the listening socket, L{None} until L{bind}.
    @ivar engine: the compiled engine the root service offers, or L{None}.
    @ivar forwarder: what carries the datagrams (an L{IUDPForwarder}),
        picked when the listener starts.
    @ivar limited: datagrams over C{datagrams_per_client} dropped in
        Python.
    """

    proto = "udp"

    def __init__(
        self, listener: Listener, reactor, engine: UDPEngine | None = None
    ) -> None:
        ListenerService.__init__(self, listener, reactor)
        self.sessions: dict = {}
        self.port: ListeningPort | None = None
        self.engine = engine
        self.forwarder: IUDPForwarder = PythonForwarder(self)
        self._sweep: IDelayedCall | None = None
        self._dropped = 0
        self.limited = 0
        self.targetAddress: tuple[int, tuple] | None = None
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
        if self.port is None:
            self.bind()
        self.forwarder = startForwarder(self, self.engine)

    def stopService(self) -> None:
        """
        Close the listening socket and every session.
        """
        ListenerService.stopService(self)
        ended = self.forwarder.stop()
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
        session opens (L{twistedproxy.udp.relay.RESOLVING_QUEUE}; the
        engine's own bounds of held clients, datagrams and bytes), and
        every datagram of a client no socket could be opened for.
        Rejected clients are counted in C{counters.rejected} instead.
        """
        return self._dropped + self.forwarder.counters()[0]

    @property
    def refused(self) -> int:
        """
        Clients refused a session, and datagrams dropped over
        C{datagrams_per_client}, by Python or by the engine.
        """
        return self.counters.rejected + self.limited + self.forwarder.counters()[1]

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
            self.targetAddress = (socket.AF_INET, (target.host, target.port))
        elif isIPv6Address(target.host):
            self.targetAddress = (socket.AF_INET6, (target.host, target.port))
        else:
            self.targetAddress = None

    # -- new clients -----------------------------------------------------

    def datagramReceived(self, data: bytes, client, local) -> None:
        """
        A datagram from C{client}, sent to C{local}, as the listening
        socket gives it to the forwarder reading it (see
        L{PythonForwarder.datagramReceived}).
        """
        self.forwarder.datagramReceived(data, client, local)

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

    def admitSession(
        self, client: tuple, headers: int, first: bytes, count=None
    ) -> tuple[bool, Addresses | None]:
        """
        Admission of a new C{client}, both paths: its PROXY header, when
        C{headers} says it may or may not send one (in C{first}, its first
        datagram), then L{admit} with the real client.  A refused client
        is counted and logged; C{count()}, when given, drops what is held
        for it and says how many datagrams it sent meanwhile, each of
        which counts.

        @return: whether it is admitted, and the addresses its PROXY
            header gave.
        """
        why = kind = addresses = None
        if headers:
            try:
                _, addresses = datagramHeader(headers, first)
            except HeaderError as e:
                why, kind = str(e), "header"
        real = client if addresses is None else addresses.source
        if why is None:
            why = self.admit(real[0])
        if why is not None:
            self.rejected(
                clientAddress(real), why, kind, 1 if count is None else count()
            )
            return False, None
        return True, addresses

    def sessionOpened(self, session: Session | EngineSession) -> None:
        """
        Put a new C{session} in the table; it counts from now on.
        """
        self.sessions[session.key] = session
        self.flowStarted(session)

    def resolveTarget(self, session) -> None:
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

    def targetResolved(self, session: Session | EngineSession, address) -> None:
        """
        C{session}'s target host name resolved to C{address} (L{None} when
        it did not resolve): its forwarder connects it.
        """
        if session.closed:
            return
        target = session.listener.target
        if address is None:
            session.close(f"cannot resolve {target.host}")
            return
        where: tuple
        if isIPv6Address(address.host):
            family = socket.AF_INET6
            where = (address.host, target.port, address.flowInfo, address.scopeID)
        else:
            family = socket.AF_INET
            where = (address.host, target.port)
        self.forwarder.targetResolved(session, family, where)

    def sessionEnded(self, session: Session | EngineSession, reason: str) -> None:
        """
        Forget a closed session and write its access line.
        """
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        self.flowEnded(session, reason)

    def sessionFailed(
        self, session: Session | EngineSession, error: OSError, datagrams: int = 1
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

    def sweepBy(self, when: float) -> None:
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
            session.close(quietFor(session.timeout))
        if due is not None:
            self.sweepBy(max(due, now + gap))
