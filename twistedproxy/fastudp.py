"""
The compiled fast path for UDP sessions, seen from Twisted.

L{twistedproxy.udp._engine} is a small C extension (Linux) whose engine runs
one background thread with its own epoll and never takes the GIL.  A
L{twistedproxy.udp.UDPListener} binds its listening socket as always and
hands the descriptor to the engine, which from then on reads every
datagram: datagrams of clients with a session go to the target and back
without Python.  What needs a decision is reported through an eventfd
that L{UDPEngine} watches as an L{IReadDescriptor}: a client without a
session (the listener answers with L{UDPEngine.addSession} or
L{UDPEngine.dropPending}), and a session the engine ended after its
timeout.

The extension is optional (built by C{pip install} where a C compiler
exists): L{engineFor} gives the process's engine when it is here and not
turned off with C{PORTPROXY_FASTPATH=0}, and L{None} otherwise, in which
case the listener forwards datagrams itself.
"""

from __future__ import annotations

import itertools
import socket

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from zope.interface import implementer

from twistedproxy.listener import fastPathWanted

try:
    from twistedproxy.udp._engine import UDPEngine as CompiledUDPEngine
except ImportError:
    CompiledUDPEngine = None

log = Logger(namespace="portproxy")

#: The environment variable L{fastPathWanted} reads.
SWITCH = "PORTPROXY_FASTPATH"


def available() -> bool:
    """
    Whether the compiled engine is built and importable here.
    """
    return CompiledUDPEngine is not None


def wanted() -> bool:
    """
    Whether UDP listeners should use the engine: it is built and
    C{PORTPROXY_FASTPATH} does not say C{0}.
    """
    return available() and fastPathWanted()


@implementer(IReadDescriptor)
class UDPEngine:
    """
    The compiled engine of one reactor, shared by all its UDP listeners.

    @ivar engine: the L{twistedproxy.udp._engine.UDPEngine}.
    """

    def __init__(self, reactor, engine=None) -> None:
        self.reactor = reactor
        self.engine = CompiledUDPEngine() if engine is None else engine
        self._listeners: dict[int, object] = {}
        self._flows: dict[int, object] = {}
        self._ids = itertools.count(1)
        self._reading = False

    # -- IReadDescriptor -------------------------------------------------

    def fileno(self) -> int:
        return self.engine.fileno()

    def logPrefix(self) -> str:
        return "UDPEngine"

    def doRead(self) -> None:
        """
        Hand what the engine reported to the listeners it concerns.
        """
        for event in self.engine.reports():
            self._handle(event)

    def _handle(self, event) -> None:
        """
        Act on one event of the engine: a new client, or a session it ended.
        """
        try:
            if event[0] == "new":
                _, listenerId, key, client = event
                owner = self._listeners.get(listenerId)
                if owner is None:
                    # the listener was removed after the datagram came
                    self.engine.dropPending(key)
                else:
                    owner.clientArrived(key, client)
            else:
                _, flowId, bytesIn, bytesOut = event
                owner = self._flows.pop(flowId, None)
                if owner is not None:
                    owner.sessionExpired(flowId, bytesIn, bytesOut)
        except Exception:
            log.failure("UDP engine event {event!r}", event=event[:2])
            if event[0] == "new":
                # the client must not stay held for ever
                self.engine.dropPending(event[2])

    def connectionLost(self, reason) -> None:
        # Only a closed eventfd gets here, which only stop() does.
        pass

    # -- what the listeners use ------------------------------------------

    def addListener(self, skt: socket.socket, pktinfo: bool, owner) -> int:
        """
        Have the engine read the bound socket C{skt} of C{owner} (a
        L{twistedproxy.udp.UDPListener}); its new clients come to
        C{owner.clientArrived(key, client)}, its expired sessions to
        C{owner.sessionExpired(flowId, bytesIn, bytesOut)}.

        @return: the listener's id in the engine.
        """
        listenerId = next(self._ids)
        self.engine.addListener(skt.fileno(), listenerId, pktinfo)
        self._listeners[listenerId] = owner
        if not self._reading:
            self._reading = True
            self.reactor.addReader(self)
        return listenerId

    def removeListener(self, listenerId: int) -> dict[int, tuple[int, int]]:
        """
        Stop reading a listener's socket (its owner closes it) and end its
        sessions.  Ended sessions the engine had not reported yet are
        reported first.

        @return: the counters of the sessions ended, by flow id.
        """
        # Forgotten first, so that its new clients reported meanwhile are
        # dropped rather than given sessions.
        self._listeners.pop(listenerId, None)
        self.doRead()
        ended = {}
        for flowId, bytesIn, bytesOut in self.engine.removeListener(listenerId):
            self._flows.pop(flowId, None)
            ended[flowId] = (bytesIn, bytesOut)
        return ended

    def addSession(
        self,
        owner,
        key: bytes,
        skt: socket.socket,
        flowId: int,
        timeout: float,
        prefix: bytes = b"",
        headers: int = 0,
        rate=None,
    ) -> None:
        """
        Give the connected socket C{skt} of a new session to the engine,
        which sends the client's held datagrams on it at once and closes it
        when the session ends.  C{prefix} (a PROXY v2 header) goes before
        every datagram to the target, as a buffer of its own: nothing is
        copied.  C{headers}: what the engine does with PROXY v2 headers at
        the start of the client's datagrams (L{proxyprotocol.HEADERS_NONE},
        C{HEADERS_TAKE}, C{HEADERS_REFUSE}).  C{rate}, a
        L{twistedproxy.model.Rate}, bounds the client's datagrams of the
        session (L{None}: no bound).

        @raise ValueError: the engine has no such listener any more (the
            socket is then still the caller's).
        """
        perSecond, burst = (0.0, 0) if rate is None else (rate.perSecond, rate.burst)
        self.engine.adopt(
            key, skt.fileno(), flowId, timeout, prefix, headers, perSecond, burst
        )
        skt.detach()
        self._flows[flowId] = owner

    def firstPending(self, key: bytes) -> bytes | None:
        """
        The first datagram the engine holds for a client without a
        session, or L{None}.
        """
        return self.engine.firstPending(key)

    def dropPending(self, key: bytes) -> tuple[int, int]:
        """
        Drop what the engine holds for a client; how many datagrams and
        bytes it sent meanwhile.
        """
        return self.engine.dropPending(key)

    def closeSession(self, flowId: int) -> tuple[int, int] | None:
        """
        End a session now; its counters, or L{None} when the engine ended
        it already (its expiry is reported by L{doRead}).
        """
        counters = self.engine.close(flowId)
        if counters is not None:
            self._flows.pop(flowId, None)
        return counters

    def counters(self, flowId: int) -> tuple[int, int] | None:
        """
        Bytes from and to the client of an open session.
        """
        return self.engine.counters(flowId)

    def listenerCounters(self, listenerId: int) -> tuple[int, int, int] | None:
        """
        A listener's open sessions in the engine; the datagrams of new
        clients it dropped: those of clients over the bound of held
        clients, and, when a client's session opened, those it had not
        held (over its bound of datagrams per client or bytes in all); and
        the datagrams of sessions dropped over C{datagrams_per_client}.
        """
        return self.engine.listenerCounters(listenerId)

    def stop(self) -> None:
        """
        Join the engine's thread and close what it still holds.
        """
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)
        self.engine.stop()


#: Where the local address a client sent to starts in an engine's client
#: key (C{Key.local} of C{udp/_engine.c}: id, family, port, scope, padding,
#: the client's address, then it); zero when the listener is bound to one
#: address.
_KEY_LOCAL = 32


def localAddress(key: bytes, client: tuple) -> bytes | None:
    """
    The local address, packed, that the client of an engine's C{key} sent
    to, or L{None} when the listener is bound to one address.
    """
    size = 16 if ":" in client[0] else 4
    local = key[_KEY_LOCAL : _KEY_LOCAL + size]
    return None if local == bytes(size) else local


_engines: dict[int, UDPEngine] = {}


def engineFor(reactor) -> UDPEngine | None:
    """
    The engine of C{reactor}, started on first use and stopped when the
    reactor shuts down; L{None} when UDP listeners should forward datagrams
    themselves: the extension is not built, C{PORTPROXY_FASTPATH=0}, or
    C{reactor} does not watch real file descriptors (a test's fake).
    """
    if not wanted() or not isinstance(reactor, PosixReactorBase):
        return None
    engine = _engines.get(id(reactor))
    if engine is None:
        engine = _engines[id(reactor)] = UDPEngine(reactor)
        log.info(
            "udp datagrams of open sessions are forwarded by the compiled "
            "engine ({switch}=0 turns it off)",
            switch=SWITCH,
        )

        def stop() -> None:
            if _engines.get(id(reactor)) is engine:
                del _engines[id(reactor)]
            engine.stop()

        reactor.addSystemEventTrigger("after", "shutdown", stop)
    return engine
