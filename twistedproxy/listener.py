"""
What every listener service has, whatever its protocol: the counters the
manhole reads, the table of open flows (TCP connections or UDP sessions),
the access log line written when a flow ends, and the socket options a
listening socket needs.

L{twistedproxy.tcp.listener.TCPListener} and L{twistedproxy.udp.listener.UDPListener} are the
two kinds; L{twistedproxy.service.ProxyService} holds one per listener of
the map, keyed by L{twistedproxy.model.ListenerKey}.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from twistedproxy import access as _access
from twistedproxy.access import clientKey, hostOf
from twistedproxy.metrics import Durations
from twistedproxy.model import Listener, formatHostPort

log = Logger(namespace="portproxy")

#: Flow ids are unique across the whole process, so C{kill(id)} in the
#: manhole needs no listener name.
_flowIds = itertools.count(1)


def nextFlowId() -> int:
    return next(_flowIds)


#: Messages that a flood could repeat (rejections, failed sessions, bad
#: PROXY headers) are logged at most once per this many seconds per
#: listener.
NOTICE_INTERVAL = 1.0


class AccessLog:
    """
    Where access lines go.  A line is written as its own log event when
    the log has been quiet for a C{window}; lines that come sooner are held
    (at most C{window} seconds) and written together as one event, one line
    per flow.  A text log then shows one timestamp and the other lines as
    continuation lines.  What that saves is the observer's timestamp,
    formatting and write per line: under thousands of short connections a
    second, about a twentieth of the proxy's time, for lines at most
    C{window} late.  Held lines are written when the reactor shuts down.

    Every event also carries its flows as C{accessRows}, one L{ACCESS_ROW}
    tuple per line, so that a structured observer (C{log_format: json})
    writes one record per flow, batched or not.

    @ivar window: seconds; 0 writes every line at once.
    """

    def __init__(self, reactor=None, window: float = 0.02) -> None:
        self._reactor = reactor
        self.window = window
        self._pending: list[str] = []
        self._pendingRows: list[tuple] = []
        self._lastWrite = float("-inf")
        self._flushCall = None
        self._atShutdown = False

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def write(self, line: str, row: tuple) -> None:
        """
        Write the access line C{line} of the flow described by C{row} (an
        L{ACCESS_ROW} tuple).
        """
        self.writeBlock(line, (row,))

    def writeMany(self, lines: list[str], rows: list[tuple]) -> None:
        """
        L{write} each of C{lines} (with its row of C{rows}), in order: the
        lines of a batch of flows that ended together.  What L{write}
        would hold joins the held lines in one step.
        """
        for k, line in enumerate(lines):
            if self._pending:
                self._pending.extend(lines[k:])
                self._pendingRows.extend(rows[k:])
                return
            self.write(line, rows[k])

    def writeBlock(self, lines: str, rows: Sequence[tuple]) -> None:
        """
        Write C{lines}, the access lines of one or more flows joined by
        newlines (one per row of C{rows}, which are L{ACCESS_ROW} tuples),
        at once on a quiet log, as one event; else hold them with the
        others.
        """
        if self._pending:
            self._pending.append(lines)
            self._pendingRows.extend(rows)
            return
        now = self.reactor.seconds()
        if now - self._lastWrite >= self.window:
            self._lastWrite = now
            if len(rows) == 1:
                row = rows[0]
                log.info(
                    "{access}",
                    access=lines,
                    flow=row[0],
                    reason=row[-1],
                    accessRows=rows,
                )
            else:
                log.info("{access}", access=lines, flows=len(rows), accessRows=rows)
            return
        self._pending.append(lines)
        self._pendingRows.extend(rows)
        self._flushCall = self.reactor.callLater(
            self._lastWrite + self.window - now, self.flush
        )
        if not self._atShutdown:
            self._atShutdown = True
            self.reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def flush(self) -> None:
        """
        Write the held lines now, as one event.
        """
        call, self._flushCall = self._flushCall, None
        if call is not None and call.active():
            call.cancel()
        lines, self._pending = self._pending, []
        rows, self._pendingRows = self._pendingRows, []
        if lines:
            self._lastWrite = self.reactor.seconds()
            log.info(
                "{access}", access="\n".join(lines), flows=len(lines), accessRows=rows
            )


#: What an access row holds, in order: the flow's id, its L{Listener}
#: (mapping, protocol, target), the client's C{host:port}, the duration in
#: seconds, bytes from and to the client, the subject of a TLS client's
#: certificate (or L{None}), and why it ended.
ACCESS_ROW = (
    "flow",
    "listener",
    "client",
    "duration",
    "bytes_in",
    "bytes_out",
    "peer",
    "reason",
)


#: The process's access log.
accessLog = AccessLog()


class IFlow(Interface):
    """
    One TCP connection or UDP session, as the manhole and the access log
    see it.  A flow whose client sent a TLS certificate has a C{peer}
    attribute too: the certificate's subject (not part of the interface:
    most flows have none).
    """

    id = Attribute("int, unique in the process")
    listener = Attribute("the L{Listener} it was opened under (its target)")
    client = Attribute("str, the client's address as host:port")
    started = Attribute("float, reactor seconds when it opened")
    bytesIn = Attribute("int, bytes from the client so far")
    bytesOut = Attribute("int, bytes to the client so far")

    def close(reason: str) -> None:
        """
        End the flow now; its access line gives C{reason}.
        """


class Counters:
    """
    Totals of one listener.  C{bytesIn} and C{bytesOut} here count flows
    that have ended; L{ListenerService.bytesIn} adds the open ones, so the
    relay hot path adds to one integer per chunk and no more.
    """

    __slots__ = (
        "bytesIn",
        "bytesOut",
        "connectFailed",
        "rejected",
        "rejectedBy",
        "total",
    )

    def __init__(self) -> None:
        self.total = 0
        self.rejected = 0
        self.bytesIn = 0
        self.bytesOut = 0
        #: C{rejected} by kind (C{"limit"}, C{"disabled"}, ...).
        self.rejectedBy: dict[str, int] = {}
        #: Flows whose target connect failed, by the failure's kind.
        self.connectFailed: dict[str, int] = {}


#: Messages that a flood could repeat (rejections, failed sessions, a
#: full descriptor table) are logged at most once per this many seconds
#: per listener.
NOTICE_INTERVAL = 1.0


class Notices:
    """
    Rate-limited log lines, for messages that a flood could repeat: one
    per C{kind} per L{NOTICE_INTERVAL}.  The class using it has a
    C{reactor}.
    """

    #: The injected reactor (any of Twisted's reactor interfaces).
    reactor: Any

    def __init__(self) -> None:
        self._noticed: dict[str, float] = {}
        self._unnoticed: dict[str, int] = {}

    def notice(self, kind: str, format: str, **kw) -> None:
        """
        Log C{format} unless a message of the same C{kind} was logged less
        than L{NOTICE_INTERVAL} ago; the next one logged says how many were
        left out meanwhile.
        """
        now = self.reactor.seconds()
        if now < self._noticed.get(kind, float("-inf")) + NOTICE_INTERVAL:
            self._unnoticed[kind] = self._unnoticed.get(kind, 0) + 1
            return
        self._noticed[kind] = now
        unnoticed = self._unnoticed.pop(kind, 0)
        if unnoticed:
            format += " (and {unnoticed} more not logged)"
        log.info(format, unnoticed=unnoticed, **kw)


class ListenerService(Service, Notices):
    """
    One listening socket of the map, as a named child service of the root.

    Subclasses bind in L{bind} (called from L{privilegedStartService} so
    that C{twistd --uid} can drop root after binding low ports), and
    implement L{disable}, L{enable} and L{stopService}.

    @ivar listener: the current settings; L{reconfigure} replaces them, and
        only flows opened afterwards use the new ones.
    @ivar flows: open flows by id.
    @ivar clients: the per-client state (L{twistedproxy.access.ClientTable})
        that new flows are counted in.
    """

    proto: str

    #: A listening socket another process bound for this listener, which
    #: L{bind} uses instead of binding one and closes without shutting it
    #: down (its owner keeps it listening): systemd's (socket activation),
    #: or dockerd's passed on by the shim.  The root service sets it.
    inheritedSocket: socket.socket | None = None

    def __init__(self, listener: Listener, reactor) -> None:
        Notices.__init__(self)
        self.listener = listener
        self.name = str(listener.key)
        self.reactor = reactor
        self.counters = Counters()
        self.durations = Durations()
        self.flows: dict[int, IFlow] = {}
        self.enabled = True
        #: The open flows counted per client: their table and client key.
        self._counted: dict[int, tuple] = {}
        self._readAccess()
        self._drained: list[Deferred] = []

    # -- lifecycle -----------------------------------------------------

    @property
    def bound(self) -> bool:
        raise NotImplementedError()

    def bind(self) -> None:
        """
        Open and bind the listening socket; raise
        L{twisted.internet.error.CannotListenError} when that fails.
        """
        raise NotImplementedError()

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if not self.bound:
            self.bind()

    def reconfigure(self, listener: Listener) -> None:
        """
        Use C{listener}'s target, timeouts and limit for new flows.
        """
        assert listener.key == self.listener.key, (listener, self.listener)
        self.listener = listener
        self._readAccess()

    def _readAccess(self) -> None:
        """
        Take the listener's access settings in the form L{admit} reads
        fastest.
        """
        access = self.listener.access
        self.clients = _access.clientTables.get(access.scope)
        self._denied = access.denied
        self._allowed = access.allowed
        self._perClient = access.perClient
        self._checked = (
            self._denied is not None or self._allowed is not None or self._perClient
        )

    def disable(self) -> None:
        """
        Stop accepting new flows, keeping the socket.
        """
        raise NotImplementedError()

    def enable(self) -> None:
        """
        Accept new flows again after L{disable}.
        """
        raise NotImplementedError()

    def whenDrained(self) -> Deferred:
        """
        A L{Deferred} that fires when no flow is open.
        """
        if not self.flows:
            return succeed(None)
        d: Deferred = Deferred()
        self._drained.append(d)
        return d

    # -- flows ---------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.flows)

    @property
    def bytesIn(self) -> int:
        return self.counters.bytesIn + sum(f.bytesIn for f in self.flows.values())

    @property
    def bytesOut(self) -> int:
        return self.counters.bytesOut + sum(f.bytesOut for f in self.flows.values())

    @property
    def refused(self) -> int:
        """
        Clients turned away (the manhole's REJ column).
        """
        return self.counters.rejected

    def full(self) -> bool:
        """
        Whether C{maxConnections} flows are open already.
        """
        limit = self.listener.maxConnections
        return limit > 0 and len(self.flows) >= limit

    def admit(self, host: str) -> str | None:
        """
        Whether a new flow (TCP connection or UDP session) of the client
        at C{host} (an IP literal) may open now: L{None} when it may, or
        why not, a reason whose first word names the rule (C{deny},
        C{allow}, C{blocked}, C{max_connections}, ...).

        Every path asks this, once per new flow, with the real client's
        address; an admitted client has taken a token of
        C{new_connections_per_client}, and L{flowStarted} counts its flow.
        """
        if not self.enabled:
            return "listener disabled"
        blocks = _access.blocklist.addresses
        if self._checked or blocks is not None:
            try:
                key = clientKey(host)
            except OSError:
                return f"allow list cannot match {host!r}, not an IP address"
            if blocks is not None and key in blocks:
                return "blocked from the manhole"
            denied, allowed = self._denied, self._allowed
            if denied is not None and key in denied:
                return "deny list"
            if allowed is not None and key not in allowed:
                return "allow list does not include it"
        if self.full():
            return f"max_connections {self.listener.maxConnections} reached"
        if self._perClient:
            access = self.listener.access
            clients = self.clients
            limit = access.maxPerClient
            if limit and clients.open.get(key, 0) >= limit:
                return f"max_connections_per_client {limit} reached"
            rate = access.newPerClient
            if rate is not None and not clients.take(key, rate, self.reactor.seconds()):
                return f"new_connections_per_client {rate} exceeded"
        return None

    def admitCount(self, count: int) -> int | None:
        """
        How many of C{count} new flows may open now, when no rule of
        L{admit} reads the client's address (no allow or deny list, no
        per-client limit, no manhole block) and the listener is enabled:
        the first that many are admitted, the others are refused by
        C{max_connections} (ask L{admit} for the reason).  L{None} when
        a rule does read it: then ask L{admit} for each client.
        """
        if not self.enabled or self._checked or _access.blocklist.addresses is not None:
            return None
        limit = self.listener.maxConnections
        if limit <= 0:
            return count
        return max(0, min(count, limit - len(self.flows)))

    def rejected(
        self, client: str, reason: str, kind: str | None = None, count: int = 1
    ) -> None:
        """
        Count C{count} refusals of C{client} (C{host:port}) for C{reason}
        (from L{admit}, whose rule gives the C{kind} the metrics count it
        under unless given: see L{refusalKind}), and log at a rate bounded
        for the whole process.
        """
        self.countRejected(kind or refusalKind(reason), count)
        listener = self.listener
        _access.refusalLog.refused(
            self.reactor, listener.proto, listener.mapping, client, reason, count
        )

    def countRejected(self, kind: str, count: int = 1) -> None:
        counters = self.counters
        counters.rejected += count
        counters.rejectedBy[kind] = counters.rejectedBy.get(kind, 0) + count

    def flowStarted(self, flow: IFlow) -> None:
        self.flows[flow.id] = flow
        self.counters.total += 1
        if self._perClient:
            self._countClient(flow)

    def flowsStarted(self, flows: list) -> None:
        """
        L{flowStarted} for each of C{flows} (L{IFlow}s), at once.
        """
        table = self.flows
        for flow in flows:
            table[flow.id] = flow
        self.counters.total += len(flows)
        if self._perClient:
            for flow in flows:
                self._countClient(flow)

    def _countClient(self, flow: IFlow) -> None:
        try:
            key = clientKey(hostOf(flow.client))
        except OSError:
            return
        self.clients.opened(key)
        self._counted[flow.id] = (self.clients, key)

    def flowEnded(self, flow: IFlow, reason: str) -> None:
        """
        Forget C{flow}, add its bytes to the totals and write its access
        line.  Calling it twice for one flow is harmless.
        """
        self.flowsEnded(((flow, reason, flow.bytesIn, flow.bytesOut),))

    def flowsEnded(self, ended: Iterable[tuple[IFlow, str, int, int]]) -> None:
        """
        L{flowEnded} for each C{(flow, reason, bytesIn, bytesOut)} of
        C{ended} (the flows the engine reported ended together, with their
        final byte counts): their access lines go to the log in one step
        (L{AccessLog.writeMany}).
        """
        flows = self.flows
        counted = self._counted
        counters = self.counters
        now = self.reactor.seconds()
        lines: list[str] = []
        rows: list[tuple] = []
        durations: list[float] = []
        lastListener = head = arrow = None
        for flow, reason, bytesIn, bytesOut in ended:
            if flows.pop(flow.id, None) is None:
                continue
            if counted:
                clients = counted.pop(flow.id, None)
                if clients is not None:
                    clients[0].closed(clients[1])
            counters.bytesIn += bytesIn
            counters.bytesOut += bytesOut
            duration = now - flow.started
            durations.append(duration)
            if reason.startswith(CONNECT_FAILED):
                kind = connectFailureKind(reason)
                counters.connectFailed[kind] = counters.connectFailed.get(kind, 0) + 1
            listener = flow.listener
            if listener is not lastListener:
                lastListener = listener
                head, arrow = listener.accessLineParts
            # A TLS client's certificate subject, when it sent one.
            peer = getattr(flow, "peer", None)
            client = flow.client
            # Formatted here, once: twisted.logger's own formatting of nine
            # fields would cost more than the rest of a short connection.
            lines.append(
                f"{head}{client}{arrow}{duration:.3f}s in={bytesIn} out={bytesOut} "
                f"{f'peer={peer!r} ' if peer else ''}{reason}"
            )
            rows.append(
                (flow.id, listener, client, duration, bytesIn, bytesOut, peer, reason)
            )
        if not lines:
            return
        self.durations.observeMany(durations)
        accessLog.writeMany(lines, rows)
        if not flows:
            self._emptied()

    def flowsEndedTogether(
        self,
        ids: list[int],
        lines: str,
        rows: list[tuple],
        durations: list[float],
        bytesIn: int,
        bytesOut: int,
    ) -> None:
        """
        L{flowsEnded} for flows whose end the TCP engine has already
        written up (L{twistedproxy.tcp.engine.TCPEngine.dialFlows}): the
        ids of the flows, their access C{lines} joined by newlines, their
        L{ACCESS_ROW}s, their durations, and their bytes summed.  None of
        them failed to connect and none has a C{peer}.
        """
        flows = self.flows
        for flowId in ids:
            flows.pop(flowId, None)
        counted = self._counted
        if counted:
            for flowId in ids:
                clients = counted.pop(flowId, None)
                if clients is not None:
                    clients[0].closed(clients[1])
        counters = self.counters
        counters.bytesIn += bytesIn
        counters.bytesOut += bytesOut
        self.durations.observeMany(durations)
        accessLog.writeBlock(lines, rows)
        if not flows:
            self._emptied()

    def _emptied(self) -> None:
        """
        The last flow ended: fire what waits for the listener to drain.
        """
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)


#: How the access line's reason of a flow whose target never answered starts.
CONNECT_FAILED = "connect failed: "


def connectFailureKind(reason: str) -> str:
    """
    The kind of a failed connect for counting, from its access line reason
    (C{"connect failed: connection refused"} is C{"connection refused"}):
    a timeout is C{"timeout"} whatever its length, a name that did not
    resolve is C{"no address"}.
    """
    why = reason[len(CONNECT_FAILED) :]
    if why.startswith("timed out"):
        return "timeout"
    if why.startswith("no address for"):
        return "no address"
    return why


def refusalKind(reason: str) -> str:
    """
    The metrics' name for the rule behind a refusal reason of
    L{ListenerService.admit}: C{"disabled"}, C{"denied"} (the manhole's
    blocks, deny and allow lists) or C{"limit"} (every limit).
    """
    if reason.startswith("listener disabled"):
        return "disabled"
    if reason.startswith(("blocked", "deny", "allow")):
        return "denied"
    return "limit"


def refusalResets(reason: str) -> bool:
    """
    Whether a TCP client refused for C{reason} (from
    L{ListenerService.admit}) is reset rather than closed cleanly.

    SPEC.md's words: a client refused by an access rule (allow and deny
    lists, the manhole's blocks, a disabled listener) is reset, so a port
    scan learns nothing more than from a closed port; a client over a
    limit (C{max_connections}, the per-client limits) is I{closed}, a clean
    end of stream, as nginx C{stream}'s C{limit_conn} closes it, so that a
    client may tell "busy, try again" from "not for you".
    """
    return refusalKind(reason) != "limit"


def fastPathWanted() -> bool:
    """
    Whether listeners may use the compiled fast paths where they are built:
    C{PORTPROXY_FASTPATH=0} in the environment turns them off, to compare
    or to rule them out.
    """
    return os.environ.get("PORTPROXY_FASTPATH", "1").strip() != "0"


def listeningSocketOptions(skt: socket.socket, host: str) -> None:
    """
    Options every listening socket gets before it binds.

    An IPv6 socket is IPv6 only, so that a no-host listen can bind
    C{0.0.0.0} and C{::} on the same port side by side.
    """
    if skt.family == socket.AF_INET6:
        skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def clientAddress(address) -> str:
    """
    C{host:port} of a Twisted L{IPv4Address}/L{IPv6Address} or a
    C{(host, port)} tuple.
    """
    if isinstance(address, tuple):
        host, port = address[0], address[1]
    else:
        host, port = address.host, address.port
    return formatHostPort(host, port)
