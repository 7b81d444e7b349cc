"""
What every listener service has, whatever its protocol: the counters the
manhole reads, the table of open flows (TCP connections or UDP sessions),
the access log line written when a flow ends, and the socket options a
listening socket needs.

L{twistedproxy.tcp.TCPListener} and L{twistedproxy.udp.UDPListener} are the
two kinds; L{twistedproxy.service.ProxyService} holds one per listener of
the map, keyed by L{twistedproxy.model.ListenerKey}.
"""

from __future__ import annotations

import itertools
import os
import socket
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from twistedproxy.model import Listener, formatHostPort

log = Logger(namespace="portproxy")

#: Flow ids are unique across the whole process, so C{kill(id)} in the
#: manhole needs no listener name.
_flowIds = itertools.count(1)


def nextFlowId() -> int:
    return next(_flowIds)


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

    @ivar window: seconds; 0 writes every line at once.
    """

    def __init__(self, reactor=None, window: float = 0.02) -> None:
        self._reactor = reactor
        self.window = window
        self._pending: list[str] = []
        self._lastWrite = float("-inf")
        self._flushCall = None
        self._atShutdown = False

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def write(self, line: str, flowId: int, reason: str) -> None:
        if self._pending:
            self._pending.append(line)
            return
        now = self.reactor.seconds()
        if now - self._lastWrite >= self.window:
            self._lastWrite = now
            log.info("{access}", access=line, flow=flowId, reason=reason)
            return
        self._pending.append(line)
        self._flushCall = self.reactor.callLater(self._lastWrite + self.window - now, self.flush)
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
        if lines:
            self._lastWrite = self.reactor.seconds()
            log.info("{access}", access="\n".join(lines), flows=len(lines))


#: The process's access log.
accessLog = AccessLog()


class IFlow(Interface):
    """
    One TCP connection or UDP session, as the manhole and the access log
    see it.
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

    __slots__ = ("total", "rejected", "bytesIn", "bytesOut")

    def __init__(self) -> None:
        self.total = 0
        self.rejected = 0
        self.bytesIn = 0
        self.bytesOut = 0


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

    reactor: object

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
    """

    proto: str

    def __init__(self, listener: Listener, reactor) -> None:
        Notices.__init__(self)
        self.listener = listener
        self.name = str(listener.key)
        self.reactor = reactor
        self.counters = Counters()
        self.flows: dict[int, IFlow] = {}
        self.enabled = True
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

    def full(self) -> bool:
        """
        Whether C{maxConnections} flows are open already.
        """
        limit = self.listener.maxConnections
        return limit > 0 and len(self.flows) >= limit

    def rejected(self, client: str, reason: str) -> None:
        """
        Count a client turned away (over the limit, or the listener
        disabled).
        """
        self.counters.rejected += 1
        log.info(
            "{proto} {mapping} rejected {client}: {reason}",
            proto=self.listener.proto,
            mapping=self.listener.mapping,
            client=client,
            reason=reason,
        )

    def flowStarted(self, flow: IFlow) -> None:
        self.flows[flow.id] = flow
        self.counters.total += 1

    def flowEnded(self, flow: IFlow, reason: str) -> None:
        """
        Forget C{flow}, add its bytes to the totals and write its access
        line.  Calling it twice for one flow is harmless.
        """
        if self.flows.pop(flow.id, None) is None:
            return
        bytesIn = flow.bytesIn
        bytesOut = flow.bytesOut
        counters = self.counters
        counters.bytesIn += bytesIn
        counters.bytesOut += bytesOut
        head, arrow = flow.listener.accessLineParts
        # Formatted here, once: twisted.logger's own formatting of nine
        # fields would cost more than the rest of a short connection.
        accessLog.write(
            f"{head}{flow.client}{arrow}{self.reactor.seconds() - flow.started:.3f}s "
            f"in={bytesIn} out={bytesOut} {reason}",
            flow.id,
            reason,
        )
        if not self.flows:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)


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

