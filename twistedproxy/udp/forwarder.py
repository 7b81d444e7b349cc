"""
The seam between a UDP listener and what carries its datagrams.

A L{UDPListener} binds, admits new clients, keeps the session table and
ends quiet sessions; an L{IUDPForwarder}, picked once by
L{startForwarder} when the listener starts, carries the datagrams.  Two
implementations:

  - L{PythonForwarder}: the reactor reads the listening socket and each
    session's socket (L{twistedproxy.udp.relay}); every datagram goes
    through a L{twistedproxy.udp.relay.Session}.
  - L{EngineForwarder}: the compiled engine of the root service
    (L{twistedproxy.udp.engine.UDPEngine}) reads the listening socket and
    forwards the datagrams of open sessions in its own thread; it asks
    this forwarder about each new client, and the sessions are
    L{twistedproxy.udp.engine.EngineSession}s.

The listener never asks which one it has.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from twistedproxy.udp.engine import EngineSession, UDPEngine
from twistedproxy.udp.relay import HeaderSession, Session, quietFor

if TYPE_CHECKING:
    from twistedproxy.udp.listener import UDPListener

log = Logger(namespace="portproxy")


class IUDPForwarder(Interface):
    """
    Carries the datagrams of a UDP listener's sessions.
    """

    compiled = Attribute("C{True} when the compiled engine carries the datagrams.")

    def start() -> None:
        """
        Carry the datagrams of the listener's bound listening socket.

        @raise OSError: (or C{RuntimeError}) when it cannot.
        """

    def stop() -> dict[int, tuple[int, int]]:
        """
        Stop carrying them (the listener closes its socket and sessions).

        @return: the final C{(bytesIn, bytesOut)} of the sessions that
            stopping ended, by flow id.
        """

    def datagramReceived(data: bytes, client: tuple, local: bytes | None) -> None:
        """
        A datagram from C{client} to C{local} (L{None}: the listener's own
        address) read in Python: forward it in its session.
        """

    def targetResolved(session, family: int, address: tuple) -> None:
        """
        The target's host name of C{session} resolved to C{address}:
        connect the session and forward what it holds.
        """

    def counters() -> tuple[int, int]:
        """
        Datagrams of new clients dropped, and datagrams refused (over
        C{datagrams_per_client}), that the forwarder counted itself.
        """


@implementer(IUDPForwarder)
class PythonForwarder:
    """
    The reactor reads every socket and a L{Session} forwards each
    datagram.
    """

    compiled = False

    def __init__(self, service: UDPListener) -> None:
        self.service = service

    def start(self) -> None:
        port = self.service.port
        assert port is not None, "the listener binds before it starts"
        # Straight to this forwarder: nothing in between per datagram.
        port.receiver = self
        port.startReading()

    def stop(self) -> dict[int, tuple[int, int]]:
        return {}

    def counters(self) -> tuple[int, int]:
        return (0, 0)

    def datagramReceived(self, data: bytes, client, local) -> None:
        """
        A datagram from C{client}, sent to C{local} (L{None} when the
        listener is bound to one address): forward it in the client's
        session, opening one when there is none.
        """
        key = client if local is None else (client, local)
        session = self.service.sessions.get(key)
        if session is None:
            session = self.openSession(key, client, local, data)
            if session is None:
                return
        session.send(data)

    def openSession(self, key, client, local, first: bytes = b"") -> Session | None:
        """
        Open a session for C{client}, whose C{first} datagram opens it, or
        say why not and return L{None}.
        """
        service = self.service
        headers = service.headerMode(client)
        admitted, addresses = service.admitSession(client, headers, first)
        if not admitted:
            return None
        kind = HeaderSession if headers else Session
        port = service.port
        assert port is not None, "the listener binds before it starts"
        session = kind(
            service,
            key,
            client,
            port.replyRoute(local),
            local,
            addresses,
            headers,
        )
        if service.targetAddress is not None:
            family, address = service.targetAddress
            try:
                session.port = service.openSessionPort(session, family, address)
            except OSError as e:
                service.sessionFailed(session, e)
                return None
        else:
            service.resolveTarget(session)
        service.sessionOpened(session)
        service.sweepBy(session.lastActive + session.timeout)
        return session

    def targetResolved(self, session: Session, family: int, address: tuple) -> None:
        try:
            port = self.service.openSessionPort(session, family, address)
        except OSError as e:
            session.close(
                f"cannot open a socket to {session.listener.target}: {e.strerror}"
            )
            return
        session.connected(port)


@implementer(IUDPForwarder)
class EngineForwarder:
    """
    The compiled engine reads the listening socket and forwards the
    datagrams of open sessions; it reports new clients
    (L{clientArrived}) and sessions it ended (L{sessionExpired}) here.

    @ivar engine: the root service's L{UDPEngine}.
    @ivar listenerId: the listener's id in the engine, while it reads it.
    """

    compiled = True

    def __init__(self, service: UDPListener, engine: UDPEngine) -> None:
        self.service = service
        self.engine = engine
        self.listenerId: int | None = None

    def start(self) -> None:
        port = self.service.port
        assert port is not None, "the listener binds before it starts"
        self.listenerId = self.engine.addListener(port.socket, port.pktinfo, self)

    def stop(self) -> dict[int, tuple[int, int]]:
        listenerId, self.listenerId = self.listenerId, None
        if listenerId is None:
            return {}
        return self.engine.removeListener(listenerId)

    def counters(self) -> tuple[int, int]:
        if self.listenerId is not None:
            counters = self.engine.listenerCounters(self.listenerId)
            if counters is not None:
                return (counters[1], counters[2])
        return (0, 0)

    def datagramReceived(self, data: bytes, client, local) -> None:
        """
        Nothing reads the listening socket in Python on this path.
        """
        raise RuntimeError("the compiled engine reads this listener's socket")

    # -- what the engine reports ----------------------------------------------

    def clientArrived(self, key: bytes, client: tuple) -> None:
        """
        The engine holds a datagram from C{client}, which has no session
        under the engine's C{key}: admit it and open its session, or have
        the engine drop what it holds.
        """
        service = self.service
        engine = self.engine
        headers = service.headerMode(client)
        first = (engine.firstPending(key) or b"") if headers else b""

        def held() -> int:
            # every datagram the client sent meanwhile counts, as each
            # would without the engine
            return max(engine.dropPending(key)[0], 1)

        admitted, addresses = service.admitSession(client, headers, first, held)
        if not admitted:
            return
        session = EngineSession(service, engine, key, client, addresses, headers)
        if service.targetAddress is not None:
            family, address = service.targetAddress
            try:
                skt = service.openSessionSocket(family, address, session.source)
            except OSError as e:
                service.sessionFailed(session, e, held())
                return
            if not self._adopt(session, skt):
                # the listener stopped meanwhile
                engine.dropPending(key)
                return
        else:
            session.resolving = True
            service.resolveTarget(session)
        service.sessionOpened(session)

    def sessionExpired(self, flowId: int, bytesIn: int, bytesOut: int) -> None:
        """
        The engine ended a session quiet for its timeout.
        """
        session = self.service.flows.get(flowId)
        if isinstance(session, EngineSession):
            session.ended(bytesIn, bytesOut, quietFor(session.timeout))

    def targetResolved(
        self, session: EngineSession, family: int, address: tuple
    ) -> None:
        try:
            skt = self.service.openSessionSocket(family, address, session.source)
        except OSError as e:
            session.close(
                f"cannot open a socket to {session.listener.target}: {e.strerror}"
            )
            return
        if not self._adopt(session, skt):
            session.close("listener closed")
            return
        session.resolving = False

    def _adopt(self, session: EngineSession, skt: socket.socket) -> bool:
        """
        Give the engine C{session}'s socket connected to the target; it
        sends what it holds of the client at once.  C{False} when the
        engine no longer reads the listener (the socket is closed).
        """
        try:
            self.engine.adopt(
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
            return False
        return True


def startForwarder(service: UDPListener, engine: UDPEngine | None) -> IUDPForwarder:
    """
    Pick and start the forwarder of C{service}, whose socket is bound: the
    compiled engine's when the root service has one (it is built, and
    C{PORTPROXY_FASTPATH} does not turn it off) and it takes the listener,
    else Python's.
    """
    if engine is not None:
        forwarder = EngineForwarder(service, engine)
        try:
            forwarder.start()
            return forwarder
        except (OSError, RuntimeError) as e:
            # No thread could be started (or the engine is stopped): this
            # listener forwards its datagrams itself.
            log.warn(
                "udp {mapping}: the compiled engine cannot take the "
                "listener ({error}); forwarding in Python",
                mapping=service.listener.mapping,
                error=e,
            )
    python = PythonForwarder(service)
    python.start()
    return python
