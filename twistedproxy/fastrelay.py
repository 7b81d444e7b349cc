"""
The compiled fast path for established TCP relays, seen from Twisted.

Twisted accepts each client and connects to its target; once both sockets
are connected and nothing is buffered for either, L{FastRelay.adopt} takes
them out of the reactor and hands them to the relay engine of
L{twistedproxy.tcp._engine}: one background thread with its own epoll that
moves the bytes with C{splice(2)} and never takes the GIL.  When the flow
ends the engine tells the reactor thread through an eventfd, which
L{FastRelay} watches as an L{IReadDescriptor}, and the flow's C{onEnd}
callback runs there with the byte counts and the reason.

The extension is optional (Linux, built by C{pip install} where a C
compiler exists): L{available} says whether it is here, and without it the
caller keeps its pure-Python relay.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy.compat import transportIdle
from twistedproxy.listener import IFlow

try:
    from twistedproxy.tcp._engine import TCPEngine
    from twistedproxy.tcp._engine import accept as acceptClient
except ImportError:
    TCPEngine = acceptClient = None

log = Logger(namespace="portproxy")

#: What C{onEnd} receives: bytes client to target, bytes target to client,
#: and why the flow ended.
EndCallback = Callable[[int, int, str], None]


@implementer(IFlow)
class EngineFlow:
    """
    A flow the engine relays, as the manhole and the access log see it:
    it stands in for the Python relay that handed its sockets over, which
    can then be dropped, so an established connection costs the reactor
    this small object and nothing else.

    @ivar reason: why the flow was closed from this side (L{close}), which
        the access line prefers to the engine's generic C{"killed"}.
    """

    __slots__ = (
        "_baseIn",
        "_baseOut",
        "_final",
        "_onEnded",
        "_relay",
        "_seen",
        "client",
        "id",
        "listener",
        "reason",
        "started",
    )

    def __init__(
        self,
        relay: FastRelay,
        flowId: int,
        listener,
        client: str,
        started: float,
        onEnded: Callable[[EngineFlow, str], None],
        bytesIn: int = 0,
        bytesOut: int = 0,
    ) -> None:
        self.id = flowId
        self.listener = listener
        self.client = client
        self.started = started
        self.reason: str | None = None
        self._relay = relay
        # bytes the Python relay moved before the hand-off
        self._baseIn = bytesIn
        self._baseOut = bytesOut
        self._seen = (0, 0)
        self._final: tuple[int, int] | None = None
        self._onEnded = onEnded

    def _counters(self) -> tuple[int, int]:
        if self._final is not None:
            return self._final
        counters = self._relay.counters(self.id)
        # None between the engine's end of the flow and its report in the
        # reactor: the last figures seen, so totals never go backwards.
        if counters is not None:
            self._seen = counters
        return self._seen

    @property
    def bytesIn(self) -> int:
        return self._baseIn + self._counters()[0]

    @property
    def bytesOut(self) -> int:
        return self._baseOut + self._counters()[1]

    def close(self, reason: str) -> None:
        """
        End the flow now (both sockets reset); the access line gives
        C{reason}.
        """
        if self.reason is None:
            self.reason = reason
        self._relay.close(self.id)

    def _ended(self, bytesIn: int, bytesOut: int, reason: str) -> None:
        self._final = (bytesIn, bytesOut)
        self._onEnded(self, self.reason or reason)


def available() -> bool:
    """
    Whether the compiled relay engine was built and imports.
    """
    return TCPEngine is not None


class HandedOff(ConnectionDone):
    """
    The connection's socket went to the relay engine: for the protocol this
    transport is gone, but the TCP connection goes on, and the flow's end
    is reported by L{FastRelay} later.
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


@implementer(IReadDescriptor)
class FastRelay:
    """
    The relay engine's end in the reactor: adopts connected pairs of
    transports and calls each flow's C{onEnd} when the engine reports it.

    One engine thread serves every flow; it starts with the first adopt.

    @ivar engine: the L{twistedproxy.tcp._engine.TCPEngine}.
    """

    def __init__(self, reactor, engine=None) -> None:
        if engine is None:
            if TCPEngine is None:
                raise RuntimeError("twistedproxy.tcp._engine is not built")
            engine = TCPEngine()
        self.reactor = reactor
        self.engine = engine
        self._onEnd: dict[int, EndCallback] = {}
        self._watching = False
        self._stopped = False

    # -- adopting -------------------------------------------------------------

    def adopt(
        self,
        clientTransport,
        targetTransport,
        flowId: int,
        idleTimeout: float,
        onEnd: EndCallback,
    ) -> bool:
        """
        Hand a connected client and target to the engine.

        @return: C{True} when the engine has the flow: both transports are
            released (their protocols see L{HandedOff}) and C{onEnd(bytesIn,
            bytesOut, reason)} will be called once, in the reactor thread.
            C{False} when the pair cannot be handed off (see
            L{canHandOff}, or the engine refused it): nothing changed and
            the caller relays in Python as before.
        """
        if self._stopped:
            return False
        if not (canHandOff(clientTransport) and canHandOff(targetTransport)):
            return False
        try:
            clientFd = os.dup(clientTransport.fileno())
        except OSError:
            return False
        try:
            targetFd = os.dup(targetTransport.fileno())
        except OSError:
            os.close(clientFd)
            return False
        if not self.adoptDescriptors(clientFd, targetFd, flowId, idleTimeout, onEnd):
            os.close(clientFd)
            os.close(targetFd)
            return False
        releaseTransport(clientTransport)
        releaseTransport(targetTransport)
        return True

    def adoptDescriptors(
        self,
        clientFd: int,
        targetFd: int,
        flowId: int,
        idleTimeout: float,
        onEnd: EndCallback,
        exclusive: bool = False,
    ) -> bool:
        """
        Hand two connected TCP socket descriptors to the engine, which
        closes them when the flow ends.  C{exclusive}: the caller vouches
        that both are non-blocking and that no other descriptor refers to
        either socket (see C{TCPEngine.adopt}).

        @return: C{True} when the engine took them (C{onEnd} will be
            called once, in the reactor thread); C{False} when it refused
            them (stopped, out of threads or memory; logged), and the
            caller still owns both descriptors.
        """
        if self._stopped:
            return False
        try:
            self.engine.adopt(clientFd, targetFd, flowId, idleTimeout, exclusive)
        except (OSError, RuntimeError, MemoryError) as e:
            log.warn(
                "relay engine refused flow {flowId}: {error}", flowId=flowId, error=e
            )
            return False
        self._onEnd[flowId] = onEnd
        if not self._watching:
            self._watching = True
            self.reactor.addReader(self)
        return True

    def adoptFlow(
        self,
        flow,
        clientTransport,
        targetTransport,
        idleTimeout: float,
        onEnded: Callable[[EngineFlow, str], None],
    ) -> EngineFlow | None:
        """
        L{adopt} for a relay that is an L{IFlow}: the engine takes its two
        transports, and the returned L{EngineFlow} (same id, listener,
        client, start time, bytes so far) stands in for it from now on.
        C{onEnded(engineFlow, reason)} is called once when it ends.

        @return: L{None} when the pair cannot be handed off (nothing
            changed; the caller keeps relaying in Python).
        """
        engineFlow = EngineFlow(
            self,
            flow.id,
            flow.listener,
            flow.client,
            flow.started,
            onEnded,
            flow.bytesIn,
            flow.bytesOut,
        )
        if self.adopt(
            clientTransport, targetTransport, flow.id, idleTimeout, engineFlow._ended
        ):
            return engineFlow
        return None

    # -- asking the engine ------------------------------------------------------

    def counters(self, flowId: int) -> tuple[int, int] | None:
        """
        C{(bytesIn, bytesOut)} of a flow the engine relays so far, or
        L{None} once it ended (its C{onEnd} has the final figures).
        """
        return self.engine.counters(flowId)

    def close(self, flowId: int) -> bool:
        """
        End a flow now, resetting both sockets; its C{onEnd} follows with
        reason C{"killed"}.  C{False} when the engine has no such flow.
        """
        return self.engine.close(flowId)

    def flowCount(self) -> int:
        """
        Flows handed to the engine whose C{onEnd} has not run yet.
        """
        return len(self._onEnd)

    def stop(self) -> None:
        """
        End every flow (reason C{"proxy stopped"}), join the engine thread and
        call the flows' C{onEnd}; later adopts return C{False}.
        """
        if self._stopped:
            return
        self._stopped = True
        self.engine.stop()
        self.doRead()
        if self._watching:
            self._watching = False
            self.reactor.removeReader(self)

    # -- IReadDescriptor ----------------------------------------------------------

    def fileno(self) -> int:
        return self.engine.fileno()

    def doRead(self) -> None:
        """
        The engine has ended flows: call their C{onEnd}.
        """
        onEnd = self._onEnd
        for flowId, bytesIn, bytesOut, reason in self.engine.reports():
            callback = onEnd.pop(flowId, None)
            if callback is None:
                continue
            try:
                callback(bytesIn, bytesOut, reason)
            except Exception:
                log.failure("while reporting the end of flow {flowId}", flowId=flowId)

    def connectionLost(self, reason: Failure) -> None:
        self._watching = False

    def logPrefix(self) -> str:
        return "fastrelay"
