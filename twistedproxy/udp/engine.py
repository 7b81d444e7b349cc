"""
The binding of the compiled UDP engine: where datagrams of open sessions
are copied without Python.

L{twistedproxy.udp._engine} is a small C extension (Linux) whose engine runs
one background thread with its own epoll and never takes the GIL.  The
root service owns one L{UDPEngine}, shared by its UDP listeners.  A
listener's L{twistedproxy.udp.forwarder.EngineForwarder} hands the bound
listening socket to it, which from then on reads every datagram:
datagrams of clients with a session go to the target and back without
Python.  What needs a decision is reported through an eventfd that
L{UDPEngine} watches as an L{IReadDescriptor}: a client without a
session (the forwarder answers with L{UDPEngine.adopt} or
L{UDPEngine.dropPending}), and a session the engine ended after its
timeout.  Its sessions are L{EngineSession}s.

The extension is optional (built by C{pip install} where a C compiler
exists): L{available} says whether it is here; without it, or with
C{PORTPROXY_FASTPATH=0} (see L{twistedproxy.service.compiledEngines}),
listeners forward datagrams in Python.
"""

from __future__ import annotations

import itertools
import socket
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from twistedproxy.listener import IFlow, clientAddress, nextFlowId
from twistedproxy.proxyprotocol import HEADERS_NONE, Addresses

if TYPE_CHECKING:
    from twistedproxy.udp.forwarder import EngineForwarder
    from twistedproxy.udp.listener import UDPListener

try:
    from twistedproxy.udp._engine import UDPEngine as CompiledUDPEngine
except ImportError:  # not built here: available() says so
    CompiledUDPEngine = None  # type: ignore[assignment,misc]

log = Logger(namespace="portproxy")


def available() -> bool:
    """
    Whether the compiled engine is built and importable here.
    """
    return CompiledUDPEngine is not None


@implementer(IReadDescriptor)
class UDPEngine:
    """
    The compiled engine of one reactor, shared by all its UDP listeners.

    @ivar engine: the L{twistedproxy.udp._engine.UDPEngine}.
    """

    def __init__(self, reactor, engine=None) -> None:
        self.reactor = reactor
        self.engine = CompiledUDPEngine() if engine is None else engine
        self._listeners: dict[int, EngineForwarder] = {}
        self._flows: dict[int, EngineForwarder] = {}
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
        listener's L{twistedproxy.udp.forwarder.EngineForwarder}); its new clients come to
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
            log.info(
                "udp datagrams of open sessions are forwarded by the compiled "
                "engine (PORTPROXY_FASTPATH=0 turns it off)"
            )
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

    def adopt(
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

    def close(self, flowId: int) -> tuple[int, int] | None:
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
        "_engine",
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
        engine: UDPEngine,
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
            client, localAddress(key, client), addresses
        )
        self.headers = headers
        self._owner = owner
        self._engine = engine
        self._final = (0, 0)

    def _counters(self) -> tuple[int, int]:
        if not self.closed and not self.resolving:
            counters = self._engine.counters(self.id)
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
        engine = self._engine
        counters: tuple[int, int] | None
        if self.resolving:
            counters = (engine.dropPending(self.key)[1], 0)
        else:
            counters = engine.close(self.id)
            if counters is None:
                # The engine ended it a moment ago; its report, waiting on
                # the engine's eventfd, writes the access line.
                return
        self.ended(counters[0], counters[1], reason)
