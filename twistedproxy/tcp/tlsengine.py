"""
The compiled fast path of TLS termination (C{tls:}), seen from Twisted.

A C{tls:} listener whose clients go to the relay engine's accept path
hands each admitted client's bare descriptor to L{TLSEngine}, the end in
the reactor of L{twistedproxy.tcp._tlsengine}: threads with their own epoll
(one per CPU by default, as the TCP engine's, each with its share of the
flows) that run the handshake with the system's OpenSSL on the socket
itself, then dial the target themselves and relay between the two (TLS
records on the client's side, plain bytes on the target's).  A L{TLSDial}
stands for each such flow, from its accept to its access line, as
L{twistedproxy.tcp.engine.EngineFlow} does for plain TCP.

Where the engine does not apply (it is not built, C{PORTPROXY_FASTPATH=0},
a listener with C{target_tls:} or C{sni_routes:}, a target given by name),
L{twistedproxy.tls} and Twisted's TLS do the same in Python.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from twistedproxy.listener import fastPathWanted
from twistedproxy.model import Listener, ServerTLS
from twistedproxy.proxyprotocol import Addresses
from twistedproxy.tcp.engine import EngineBinding, EngineFlow, engineThreads
from twistedproxy.tls import NameTable

try:
    from twistedproxy.tcp._tlsengine import Context
    from twistedproxy.tcp._tlsengine import TLSEngine as CompiledTLSEngine
except ImportError:  # not built here: available() says so
    Context = CompiledTLSEngine = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from twistedproxy.tcp.listener import TCPListener

log = Logger(namespace="portproxy")


def available() -> bool:
    """
    Whether the compiled TLS engine was built and imports.
    """
    return CompiledTLSEngine is not None


def applies(listener: Listener) -> bool:
    """
    Whether the TLS engine serves C{listener}'s clients: it terminates
    TLS, and neither originates it to the target nor routes by SNI (those
    stay in Python).
    """
    settings = listener.tls
    return (
        settings is not None
        and settings.terminate is not None
        and settings.originate is None
        and not settings.sniRoutes
    )


@lru_cache(maxsize=64)
def serverContext(settings: ServerTLS):
    """
    The engine's OpenSSL contexts for one C{tls:} setting, built once per
    distinct value: a reload with new files makes a new value and so new
    contexts for new clients, while open connections keep theirs (the
    engine counts their references).
    """
    pairs = [settings.default]
    for _, pair in settings.byName:
        if pair not in pairs:
            pairs.append(pair)
    table = NameTable((name, pairs.index(pair)) for name, pair in settings.byName)
    return Context(
        [(pair.certPem, pair.keyPem) for pair in pairs],
        table.entries(),
        settings.clientCAPem,
        settings.minVersion,
    )


class TLSDial(EngineFlow):
    """
    A client of a C{tls:} listener on the TLS engine, from its accept to
    its access line: the engine runs its handshake, then dials the target
    itself, both within C{connect_timeout} of the accept as on the Python
    path (the engine keeps that time: the reactor runs no timer for the
    flow), then relays.  The reactor sees the handshake's report and the
    end's.

    @ivar peer: the subject of the client's certificate (C{client_ca}),
        for the access line and the manhole.
    @ivar serverName: the server name the client asked for, if any.
    """

    __slots__ = ("peer", "serverName")

    _engine: TLSEngine  # type: ignore[assignment]

    def __init__(self, engine: TLSEngine, *args: Any, **kwargs: Any) -> None:
        EngineFlow.__init__(self, engine, *args, **kwargs)  # type: ignore[arg-type]
        self.peer: str | None = None
        self.serverName: str | None = None

    def _start(self, service: TCPListener) -> None:
        service.flowStarted(self)
        clientFd, self._clientFd = self._clientFd, -1
        settings = self.listener.tls
        assert settings is not None and settings.terminate is not None
        if not self._engine.adopt(clientFd, self, settings.terminate):
            os.close(clientFd)
            self._end("tls engine refused the connection")

    def handshaken(self, serverName: str | None, subject: str | None) -> None:
        """
        The engine finished the client's handshake (and dials the target).
        """
        self.serverName = serverName
        self.peer = subject

    def _giveUp(self, reason: str, reset: bool = False) -> None:
        if self.reason is None:
            self.reason = reason
        self._engine.close(self.id, reset)

    def _end(self, reason: str) -> None:
        if self.id in self._engine.flows:
            # The engine has the client: its end report ends the flow.
            self._giveUp(reason)
            return
        EngineFlow._end(self, reason)

    def close(self, reason: str) -> None:
        """
        End the flow now (from the manhole): both sockets reset.
        """
        self._giveUp(reason, reset=True)


class TLSEngine(EngineBinding):
    """
    The TLS engine's end in the reactor: adopts clients for their
    handshake and the dial of their target, and passes the engine's reports
    to their L{TLSDial}.

    @ivar flows: the engine's flows by id, until their end is reported.
    """

    prefix = "tlsengine"

    def __init__(self, reactor, engine=None) -> None:
        if engine is None:
            if CompiledTLSEngine is None:
                raise RuntimeError("twistedproxy.tcp._tlsengine is not built")
            engine = CompiledTLSEngine(threads=engineThreads())
        EngineBinding.__init__(self, reactor, engine)
        self.flows: dict[int, TLSDial] = {}

    applies = staticmethod(applies)

    def dial(
        self,
        service: TCPListener,
        clientFd: int,
        client: str,
        addresses: Addresses | None,
    ) -> None:
        """
        Serve an admitted client of a C{tls:} listener (its bare
        non-blocking descriptor and its C{host:port}).
        """
        TLSDial.dial(service, self, clientFd, client, addresses)  # type: ignore[arg-type]

    def adopt(self, clientFd: int, flow: TLSDial, settings: ServerTLS) -> bool:
        """
        Hand C{clientFd} to the engine for its handshake with C{settings}'
        certificates, then the dial of C{flow}'s target (an address) and the
        relay; C{False} (the descriptor still the caller's) when it refused.
        """
        if self._stopped:
            return False
        listener = flow.listener
        try:
            self.engine.adopt(
                clientFd,
                flow.id,
                serverContext(settings),
                (listener.target.host, listener.target.port),
                listener.timeouts.connect,
                listener.timeouts.idle,
            )
        except (OSError, RuntimeError, MemoryError, ValueError) as e:
            log.warn(
                "tls engine refused flow {flowId}: {error}", flowId=flow.id, error=e
            )
            return False
        self.flows[flow.id] = flow
        self._watch()
        return True

    def close(self, flowId: int, reset: bool = True) -> bool:
        """
        End a flow: both sockets reset, or without C{reset} a close_notify
        and a FIN to the client.
        """
        return self.engine.close(flowId, reset)

    def counters(self, flowId: int) -> tuple[int, int] | None:
        """
        C{(bytesIn, bytesOut)} of a flow so far (plaintext), or L{None}
        once it ended.
        """
        return self.engine.counters(flowId)

    def flowCount(self) -> int:
        """
        Flows whose end has not been reported yet.
        """
        return len(self.flows)

    # -- IReadDescriptor ----------------------------------------------------------

    def doRead(self) -> None:
        """
        The engine has news: handshakes done, flows ended.
        """
        flows = self.flows
        for report in self.engine.reports():
            if report[0] == "handshake":
                flow = flows.get(report[1])
                if flow is not None:
                    self._call(flow.handshaken, report[1], report[2], report[3])
            else:
                flow = flows.pop(report[1], None)
                if flow is not None:
                    self._call(flow._ended, report[1], *report[2:])

    @staticmethod
    def _call(method, flowId: int, *args) -> None:
        try:
            method(*args)
        except Exception:
            log.failure("while handling flow {flowId} of the tls engine", flowId=flowId)


def tlsEngine(reactor) -> TLSEngine | None:
    """
    The TLS engine, or L{None} when it is not built or not wanted.
    """
    if not (available() and fastPathWanted()):
        return None
    return TLSEngine(reactor)
