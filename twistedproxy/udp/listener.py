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
from twisted.internet.interfaces import (
    IResolutionReceiver,
)
from zope.interface import implementer

from twistedproxy import proxyprotocol
from twistedproxy.listener import (
    ListenerService,
    clientAddress,
)
from twistedproxy.model import Listener
from twistedproxy.proxyprotocol import (
    HEADERS_NONE,
    HEADERS_REFUSE,
    HEADERS_TAKE,
    Addresses,
    HeaderError,
    datagramHeader,
)
from twistedproxy.udp import engine as fastudp
from twistedproxy.udp.engine import EngineSession
from twistedproxy.udp.relay import (
    HeaderSession,
    PacketInfoPort,
    Session,
    connectDatagrams,
    connectedDatagramSocket,
    listenDatagrams,
    log,
)

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
