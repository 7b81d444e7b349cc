"""
The binding of the compiled TCP engine: where established connections'
bytes are copied without Python, and the one module that calls
L{twistedproxy.tcp._engine}.

The root service owns one L{TCPEngine}, which the listeners'
L{twistedproxy.tcp.forwarder.EngineForwarder}s share.  Once a flow's two
sockets are connected and nothing is buffered for either, the engine
takes them (L{TCPEngine.adopt}, L{TCPEngine.adoptDescriptors}): relay
threads, one per CPU by default (L{engineThreads}), each with its own
epoll and its share of the flows (thread C{flowId mod N}), that move the
bytes with C{splice(2)} and never take the GIL.  L{EngineFlow} is such a flow as
the manhole and the access log see it, from its accept (or its hand-off
by a Python relay) to its access line.  When the flow
ends the engine tells the reactor thread through an eventfd, which
L{TCPEngine} watches as an L{IReadDescriptor}, and the flow's C{onEnd}
callback runs there with the byte counts and the reason.

The extension is optional (Linux, built by C{pip install} where a C
compiler exists): L{available} says whether it is here, and without it the
caller keeps its pure-Python relay.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from twisted.internet.interfaces import (
    IDelayedCall,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy.listener import IFlow, nextFlowId
from twistedproxy.proxyprotocol import Addresses
from twistedproxy.tcp.relay import (
    ClosingClient,
    canHandOff,
    proxyHeader,
    releaseTransport,
    sendHeader,
)
from twistedproxy.transparency import transparentSocket

if TYPE_CHECKING:
    from twistedproxy.model import Listener
    from twistedproxy.tcp.listener import TCPListener

try:
    from twistedproxy.tcp._engine import TCPEngine as CompiledTCPEngine
    from twistedproxy.tcp._engine import accept as acceptClient
    from twistedproxy.tcp._engine import acceptBatch as acceptClients
except ImportError:  # not built here: available() says so
    CompiledTCPEngine = acceptClient = acceptClients = None  # type: ignore[assignment,misc]

log = Logger(namespace="portproxy")

#: What C{onEnd} receives: bytes client to target, bytes target to client,
#: and why the flow ended.
EndCallback = Callable[[int, int, str], None]

#: What the engine keeps of a listener to write its flows' access lines
#: (L{TCPEngine.dialFlows}): the listener's service, which gets the flows
#: when they end, its L{Listener}, and the access line's text before and
#: after the client (L{Listener.accessLineParts}).
AccessTag = tuple["TCPListener", "Listener", str, str]


#: The environment variable that sets the number of relay threads.
ENGINE_THREADS = "PORTPROXY_ENGINE_THREADS"

#: The most relay threads the variable may ask for (as the C engine).
MAX_ENGINE_THREADS = 256


def engineThreads(environ: Mapping[str, str] = os.environ) -> int:
    """
    The number of relay threads C{PORTPROXY_ENGINE_THREADS} asks for.

    @return: 1 to L{MAX_ENGINE_THREADS}, or 0 when it is unset, empty or
        not such a number (logged): the engine's default, one thread per
        CPU this process may use, at most 16.
    """
    text = environ.get(ENGINE_THREADS, "").strip()
    if not text:
        return 0
    if text.isdigit() and 1 <= int(text) <= MAX_ENGINE_THREADS:
        return int(text)
    log.error(
        "{variable}={value!r}: expected a whole number of relay threads from 1"
        " to {most}; using one per CPU",
        variable=ENGINE_THREADS,
        value=text,
        most=MAX_ENGINE_THREADS,
    )
    return 0


def available() -> bool:
    """
    Whether the compiled relay engine was built and imports.
    """
    return CompiledTCPEngine is not None


@implementer(IReadDescriptor)
class EngineBinding:
    """
    What the reactor sees of a compiled engine that runs flows: the
    engine's notify eventfd, watched from the first flow on, whose
    C{doRead} (the subclass's) takes the engine's reports; and its stop.

    @ivar engine: the compiled engine.
    """

    #: The reactor's log prefix for this engine.
    prefix = "engine"

    def __init__(self, reactor, engine) -> None:
        self.reactor = reactor
        self.engine = engine
        self._watching = False
        self._stopped = False

    def _watch(self) -> None:
        """
        Watch the engine's reports (from its first flow on).
        """
        if not self._watching:
            self._watching = True
            self.reactor.addReader(self)

    def stop(self) -> None:
        """
        End every flow (reason C{"proxy stopped"}), join the engine's
        threads and take their last reports; later adopts are refused.
        """
        if self._stopped:
            return
        self._stopped = True
        self.engine.stop()
        self.doRead()
        if self._watching:
            self._watching = False
            self.reactor.removeReader(self)

    def doRead(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        return self.engine.fileno()

    def connectionLost(self, reason: Failure) -> None:
        self._watching = False

    def logPrefix(self) -> str:
        return self.prefix


class TCPEngine(EngineBinding):
    """
    The relay engine's end in the reactor: adopts connected pairs of
    transports and calls each flow's C{onEnd} when the engine reports it.

    The engine's relay threads (L{engineThreads} of them) start with the
    first adopt; each flow stays on thread flowId mod N.

    @ivar engine: the L{twistedproxy.tcp._engine.TCPEngine}.
    """

    prefix = "fastrelay"

    def __init__(self, reactor, engine=None) -> None:
        if engine is None:
            if CompiledTCPEngine is None:
                raise RuntimeError("twistedproxy.tcp._engine is not built")
            engine = CompiledTCPEngine(threads=engineThreads())
        EngineBinding.__init__(self, reactor, engine)
        # What to tell when a flow ends: its callback, or the dialed
        # EngineFlow itself, whose listener takes its end with the others
        # of the same report (ListenerService.flowsEnded).
        self._onEnd: dict[int, EndCallback | EngineFlow] = {}
        # The manhole's reasons for the dialed flows it closed, which their
        # access lines give instead of the engine's "killed".
        self._reasons: dict[int, str] = {}

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
        onEnd: EndCallback | EngineFlow,
        exclusive: bool = False,
    ) -> bool:
        """
        Hand two connected TCP socket descriptors to the engine, which
        closes them when the flow ends.  C{exclusive}: the caller vouches
        that both are non-blocking and that no other descriptor refers to
        either socket (see C{twistedproxy.tcp._engine.TCPEngine.adopt}).

        @param onEnd: C{onEnd(bytesIn, bytesOut, reason)}, or a dialed
            L{EngineFlow} (whose listener is told, with the other flows
            the same report ends).

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
        self._watch()
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

    def dialFlows(
        self,
        flows: list[EngineFlow],
        clientFds: list[int],
        headers: list[bytes] | None,
        access: AccessTag | None = None,
    ) -> None:
        """
        Dial the target for a batch of admitted and started flows
        (L{EngineFlow.accepted}) of one listener whose target is an
        address, in one call of the engine: each flow whose connect
        completes at once (as on loopback) goes to the engine with its
        client (C{clientFds}, one per flow), after its PROXY header
        (C{headers}, one per flow, when the listener sends one); the
        others go on as L{EngineFlow.dial} would from their connect: the
        reactor waits for the connect under way, or the flow ends with
        its failure.

        @param access: the flows' listener's L{AccessTag}: the engine keeps
            it, with each flow's client and start time, and writes the
            access line of each flow when it ends (L{doRead}), which then
            goes to the listener with the others of its report
            (L{twistedproxy.listener.ListenerService.flowsEndedTogether}).
        """
        if self._stopped:
            results: list[int | str | None] = [None] * len(flows)
        else:
            listener = flows[0].listener
            target = listener.target
            results = self.engine.dial(
                clientFds,
                [flow.id for flow in flows],
                target.host,
                target.port,
                listener.timeouts.idle,
                headers,
                access,
                None if access is None else [flow.client for flow in flows],
                flows[0].started,
            )
        onEnd = self._onEnd
        for flow, result in zip(flows, results, strict=True):
            if result == 0:
                flow._clientFd = -1
                onEnd[flow.id] = flow
            else:
                flow._dialed(result)
        self._watch()

    # -- asking the engine ------------------------------------------------------

    def counters(self, flowId: int) -> tuple[int, int] | None:
        """
        C{(bytesIn, bytesOut)} of a flow the engine relays so far, or
        L{None} once it ended (its C{onEnd} has the final figures).
        """
        return self.engine.counters(flowId)

    def close(self, flowId: int, reason: str | None = None) -> bool:
        """
        End a flow now, resetting both sockets; its C{onEnd} follows with
        reason C{"killed"}, and the access line the engine writes for a
        flow dialed with an L{AccessTag} gives C{reason} when given.
        C{False} when the engine has no such flow.
        """
        closed = self.engine.close(flowId)
        if closed and reason is not None:
            self._reasons[flowId] = reason
        return closed

    def flowCount(self) -> int:
        """
        Flows handed to the engine whose C{onEnd} has not run yet.
        """
        return len(self._onEnd)

    # -- IReadDescriptor ----------------------------------------------------------

    def doRead(self) -> None:
        """
        The engine has ended flows: call their C{onEnd}; those dialed with
        an L{AccessTag} go to their listener a batch at a time, with the
        access lines the engine wrote.
        """
        onEnd = self._onEnd
        reports, groups = self.engine.finished(self.reactor.seconds())
        for service, ids, lines, rows, durations, bytesIn, bytesOut in groups:
            for row in rows:
                flow = onEnd.pop(row[0], None)
                if flow is not None:
                    # The final figures, for whoever still holds the flow.
                    flow._final = row[4:6]  # type: ignore[union-attr]
            if self._reasons:
                lines, rows = self._giveReasons(ids, lines, rows)
            try:
                service.flowsEndedTogether(
                    ids, lines, rows, durations, bytesIn, bytesOut
                )
            except Exception:
                log.failure("while reporting the end of {count} flows", count=len(ids))
        if reports:
            self._reported(reports)

    def _giveReasons(
        self, ids: list[int], lines: str, rows: list[tuple]
    ) -> tuple[str, list[tuple]]:
        """
        The access C{lines} and C{rows} of the flows C{ids}, with the
        reason given to L{close} of each that has one instead of the
        engine's.
        """
        reasons = self._reasons
        texts = lines.split("\n")
        for k, flowId in enumerate(ids):
            reason = reasons.pop(flowId, None)
            if reason is not None:
                row = rows[k]
                texts[k] = texts[k][: -len(row[-1])] + reason
                rows[k] = (*row[:-1], reason)
        return "\n".join(texts), rows

    def _reported(self, reports: list[tuple[int, int, int, str]]) -> None:
        """
        Call the C{onEnd} of each of C{reports} (C{(flowId, bytesIn,
        bytesOut, reason)}) of a flow without an L{AccessTag}.
        """
        onEnd = self._onEnd
        # The dialed flows that ended, by listener: each listener writes
        # the access lines of its flows at once.
        ended: dict[TCPListener, list[tuple[EngineFlow, str, int, int]]] = {}
        reasons = self._reasons
        for flowId, bytesIn, bytesOut, reason in reports:
            if reasons:
                # The flow's own reason, if any, is its EngineFlow's.
                reasons.pop(flowId, None)
            callback = onEnd.pop(flowId, None)
            if callback is None:
                continue
            if isinstance(callback, EngineFlow):
                callback._final = (bytesIn, bytesOut)
                service = callback._service
                assert service is not None
                batch = ended.get(service)
                if batch is None:
                    batch = ended[service] = []
                batch.append(
                    (
                        callback,
                        callback.reason or reason,
                        callback._baseIn + bytesIn,
                        callback._baseOut + bytesOut,
                    )
                )
                continue
            try:
                callback(bytesIn, bytesOut, reason)
            except Exception:
                log.failure("while reporting the end of flow {flowId}", flowId=flowId)
        for service, flows in ended.items():
            try:
                service.flowsEnded(flows)
            except Exception:
                log.failure(
                    "while reporting the end of {count} flows", count=len(flows)
                )


#: TCP states (C{tcpi_state}, the first byte of C{TCP_INFO}; Linux).
_TCP_SYN_SENT = 2
_TCP_CLOSE = 7


@implementer(IFlow, IWriteDescriptor)
class EngineFlow:
    """
    A flow the engine relays, as the manhole and the access log see it,
    from the client's accept to its access line.

    It comes to be in one of two ways.  L{dial}: a client the engine's
    forwarder accepted itself (a bare descriptor); the proxy connects to
    the target with a non-blocking socket and, unless the connect
    completed at once (as on loopback), the reactor watching it, reading
    nothing from the client meanwhile; when the target answers both
    descriptors go to the engine, and when it does not the client is
    closed and the access line says why.  L{TCPEngine.adoptFlow}: a
    Python relay whose target answered handed its two connections over;
    this object stands in for it, which can then be dropped, so an
    established connection costs the reactor this small object and
    nothing else.

    @ivar reason: why the flow was closed from this side (L{close}), which
        the access line prefers to the engine's generic C{"killed"}.
    @ivar addresses: the client's and its destination's, when identity
        settings need them (a dialed flow).
    """

    __slots__ = (
        "_baseIn",
        "_baseOut",
        "_clientFd",
        "_engine",
        "_final",
        "_onEnded",
        "_reactor",
        "_seen",
        "_service",
        "_target",
        "_timer",
        "addresses",
        "client",
        "id",
        "listener",
        "reason",
        "started",
    )

    def __init__(
        self,
        engine: TCPEngine,
        flowId: int,
        listener: Listener,
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
        self.addresses: Addresses | None = None
        self._engine = engine
        # bytes the Python relay moved before the hand-off
        self._baseIn = bytesIn
        self._baseOut = bytesOut
        self._seen = (0, 0)
        self._final: tuple[int, int] | None = None
        self._onEnded = onEnded
        # While dialing: the client's descriptor, the socket to the target,
        # the connect timeout and the listener.
        self._clientFd = -1
        self._target: socket.socket | None = None
        self._timer: IDelayedCall | None = None
        self._service: TCPListener | None = None
        self._reactor = engine.reactor

    @classmethod
    def dial(
        cls,
        service: TCPListener,
        engine: TCPEngine,
        clientFd: int,
        client: str,
        addresses: Addresses | None = None,
    ) -> EngineFlow:
        """
        Serve the admitted client on the bare descriptor C{clientFd}
        (C{client} is its C{host:port}): connect to the target, an
        address, and hand both sockets to C{engine} when it answers.
        """
        flow = cls.accepted(
            service, engine, clientFd, client, service.reactor.seconds()
        )
        flow.addresses = addresses
        flow._start(service)
        return flow

    @classmethod
    def accepted(
        cls,
        service: TCPListener,
        engine: TCPEngine,
        clientFd: int,
        client: str,
        started: float,
    ) -> EngineFlow:
        """
        A new flow of the admitted client on the bare descriptor
        C{clientFd} (C{client} is its C{host:port}), accepted at
        C{started}, not yet started nor dialed (L{dial} does both;
        L{TCPEngine.dialFlows} dials a batch).
        """
        flow = cls(
            engine, nextFlowId(), service.listener, client, started, service.flowEnded
        )
        flow._service = service
        flow._reactor = service.reactor
        flow._clientFd = clientFd
        return flow

    # -- the engine's figures ---------------------------------------------------

    def _counters(self) -> tuple[int, int]:
        if self._final is not None:
            return self._final
        counters = self._engine.counters(self.id)
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

    def _ended(self, bytesIn: int, bytesOut: int, reason: str) -> None:
        self._final = (bytesIn, bytesOut)
        self._onEnded(self, self.reason or reason)

    # -- dialing ----------------------------------------------------------------

    def _start(self, service: TCPListener) -> None:
        service.flowStarted(self)
        self._connect()

    def _connect(self) -> None:
        """
        Connect to the target; within C{connect_timeout}, counted from the
        timer already running if there is one.
        """
        target = self.listener.target
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        try:
            if self.listener.identity.transparent and self.addresses is not None:
                skt = transparentSocket(
                    family, socket.SOCK_STREAM, self.addresses.source
                )
            else:
                skt = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self._target = skt
            status = skt.connect_ex((target.host, target.port))
            if status == errno.EINPROGRESS:
                # On loopback the handshake is done inside connect(): then
                # there is nothing to wait for.  One byte of TCP_INFO is the
                # connection's state: still sending its SYN, failed
                # (closed), or connected (established, or already closed
                # by the target, which the engine then relays).
                state = skt.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if state == _TCP_CLOSE:
                    status = (
                        skt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        or errno.ECONNREFUSED
                    )
                elif state != _TCP_SYN_SENT:
                    status = 0
        except OSError as e:
            self._fail((e.strerror or str(e)).lower())
            return
        if status == 0:
            self._connected(skt)
        elif status == errno.EINPROGRESS:
            self._awaitConnect()
        else:
            self._fail(os.strerror(status).lower())

    def _awaitConnect(self) -> None:
        """
        The connect of C{_target} is under way: wait for it to complete,
        within C{connect_timeout}.
        """
        if self._timer is None:
            self._timer = self._reactor.callLater(
                self.listener.timeouts.connect, self._timedOut
            )
        self._reactor.addWriter(self)

    def _dialed(self, result: int | str | None) -> None:
        """
        What the engine's C{dial} did for this flow, other than adopt it:
        the descriptor of the target socket whose connect is under way
        (an C{int}), why the connect failed (a C{str}), or L{None}: the
        engine refused the flow.
        """
        if result is None:
            self._refused()
        elif isinstance(result, str):
            self._fail(result)
        else:
            self._target = socket.socket(fileno=result)
            # Non-blocking already; this tells the socket object so.
            self._target.setblocking(False)
            self._awaitConnect()

    def _connected(self, target: socket.socket) -> None:
        self._cancelTimer()
        header = proxyHeader(self.listener, self.addresses)
        if header:
            problem = sendHeader(target, header)
            if problem is not None:
                self._fail(problem)
                return
        self._target = None
        target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._hand(target.detach())

    def _hand(self, targetFd: int) -> None:
        """
        Give the connected target, and the client, to the engine.
        """
        if not self._engine.adoptDescriptors(
            self._clientFd,
            targetFd,
            self.id,
            self.listener.timeouts.idle,
            self if self._service is not None else self._ended,
            exclusive=True,
        ):
            os.close(targetFd)
            self._refused()
            return
        self._clientFd = -1

    def _refused(self) -> None:
        """
        The engine did not take the flow: close the client and end it.
        """
        clientFd, self._clientFd = self._clientFd, -1
        if clientFd >= 0:
            os.close(clientFd)
        self._onEnded(self, "relay engine refused the connection")

    # -- IWriteDescriptor: the connect of a dialed flow ---------------------------

    def fileno(self) -> int:
        return self._target.fileno() if self._target is not None else -1

    def logPrefix(self) -> str:
        return "portproxy"

    def doWrite(self) -> None:
        """
        The connect finished, one way or the other.
        """
        self._reactor.removeWriter(self)
        target = self._target
        if target is None:
            return
        status = target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            self._fail(os.strerror(status).lower())
        else:
            self._connected(target)

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the connect: it failed (epoll reports a
        refused connect as a hang-up, not as writable) or the proxy is
        stopping.
        """
        if self._target is None:
            return
        status = self._target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            self._fail(os.strerror(status).lower())
        elif self._service is not None and not self._service.running:
            self._end("proxy stopped")
        else:
            self._fail(reason.getErrorMessage())

    # -- ending -------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """
        End the flow now (from the manhole): the dial, or the engine's
        relay (both sockets reset) once the target answered; the access
        line gives C{reason}.
        """
        if self._clientFd >= 0:
            self._end(reason)
            return
        if self.reason is None:
            self.reason = reason
        self._engine.close(self.id, self.reason)

    def _timedOut(self) -> None:
        self._timer = None
        self._fail(f"timed out after {self.listener.timeouts.connect:g}s")

    def _fail(self, why: str) -> None:
        clientFd, self._clientFd = self._clientFd, -1
        self._end(f"connect failed: {why}")
        if clientFd >= 0:
            ClosingClient(clientFd, self._reactor).start()

    def _end(self, reason: str) -> None:
        self._cancelTimer()
        if self._target is not None:
            self._reactor.removeWriter(self)
            self._target.close()
            self._target = None
        if self._clientFd >= 0:
            os.close(self._clientFd)
            self._clientFd = -1
        self._onEnded(self, reason)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
