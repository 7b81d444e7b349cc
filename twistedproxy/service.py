"""
The root service: one child service per listener of the map (and the
manhole), started from the map at start-up and brought in line with the
file again by every reload; and the listeners published at run time
through the control socket (L{twistedproxy.control}), which reloads leave
alone.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from twisted.application.service import MultiService
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger

from twistedproxy.config import ConfigError, loadMap
from twistedproxy.config import _overlaps as overlaps
from twistedproxy.listener import IFlow, ListenerService, fastPathWanted
from twistedproxy.logs import useLogFormat
from twistedproxy.metrics import ReloadCounts
from twistedproxy.model import (
    ANY_IPV6,
    TCP,
    UDP,
    Listener,
    ListenerKey,
    Mapping,
    ProxyMap,
)
from twistedproxy.plan import diff
from twistedproxy.systemd import InheritedSockets

if TYPE_CHECKING:
    from types import FrameType

    from twistedproxy.manhole import ManholeService
    from twistedproxy.tcp.engine import TCPEngine
    from twistedproxy.tcp.tlsengine import TLSEngine
    from twistedproxy.udp.engine import UDPEngine

log = Logger(namespace="portproxy")

#: A reload's summary line names at most this many failures.
_SUMMARY_FAILURES = 10


class StartupError(Exception):
    """
    Listeners of the map (or its manhole, HTTP or control sections) could
    not be started.

    @ivar problems: what failed, one C{FILE:LINE: message} each, naming
        the mapping; logged, and written to L{ProxyService.terminal}.
    """

    def __init__(self, problems: list[str]) -> None:
        Exception.__init__(self, problems)
        self.problems = problems

    def __str__(self) -> str:
        # What twistd's daemon parent prints after "An error has occurred"
        # is cut at 100 bytes, too short for a problem: the problems
        # themselves reach the terminal through ProxyService.terminal.
        count = len(self.problems)
        return f"{count} start-up problem{'' if count == 1 else 's'}, listed above and in the log"


class PublishRefused(Exception):
    """
    A listener asked for through the control socket cannot be started;
    the message says why, for the one who asked.
    """


def _ipv6Available() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True


#: The key of L{compiledEngines}' TLS termination engine, beside the
#: protocols' own.
TLS_ENGINE = "tls"


def compiledEngines(reactor) -> dict[str, TCPEngine | UDPEngine | TLSEngine | None]:
    """
    The compiled engines the listeners of this process share, by
    protocol: each is L{None} where its extension is not built, and both
    are when C{PORTPROXY_FASTPATH=0} turns them off.  The one place that
    decides whether the fast paths run; a listener picks its forwarder
    from what it is given here.
    """
    from twistedproxy.tcp import engine as tcpEngine
    from twistedproxy.tcp import tlsengine
    from twistedproxy.udp import engine as udpEngine

    wanted = fastPathWanted()
    tcp = tcpEngine.TCPEngine(reactor) if wanted and tcpEngine.available() else None
    return {
        TCP: tcp,
        UDP: udpEngine.UDPEngine(reactor) if wanted and udpEngine.available() else None,
        # TLS termination shares the TCP engine's accept path.
        TLS_ENGINE: None if tcp is None else tlsengine.tlsEngine(reactor),
    }


def _listenerTypes() -> dict:
    from twistedproxy.tcp.listener import TCPListener
    from twistedproxy.udp.listener import UDPListener

    return {TCP: TCPListener, UDP: UDPListener}


def _bindProblem(error: Exception) -> str:
    """
    The operating system's words for a failed bind, without Twisted's
    wrapping (a L{CannotListenError}'s cause, or the error itself).
    """
    cause = error.socketError if isinstance(error, CannotListenError) else error
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause)


def _logWarnings(proxyMap: ProxyMap) -> None:
    for warning in proxyMap.warnings:
        log.warn("{warning}", warning=warning)


def _yieldingOften(f, *args):
    """
    Call C{f} with the interpreter switching threads every millisecond
    rather than every 5: the reactor thread, waiting for the GIL at each
    step of a connection, then waits less while a long load runs.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.001))
    try:
        return f(*args)
    finally:
        sys.setswitchinterval(interval)


def _inReactorThreadPool(reactor) -> Callable[..., Deferred]:
    """
    Run a function in the reactor's thread pool: a reload reads and checks
    the map there, so that a big file does not stop the reactor accepting.
    """

    def inThread(f, *args) -> Deferred:
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), _yieldingOften, f, *args
        )

    return inThread


class ProxyService(MultiService):
    """
    Every listener of one map file, and the manhole.

    @ivar map: the map being served: the last one applied, including
        listeners that failed to bind (the next reload tries them again).
    @ivar listeners: the live listener services by key.
    @ivar draining: removed TCP listeners whose connections are still open;
        each leaves the list when its last connection ends.
    @ivar manhole: the manhole service, or L{None}.
    @ivar http: the HTTP endpoint's service (L{twistedproxy.web}), or
        L{None}.
    @ivar reloadCounts: what the reloads came to, for C{/metrics}.
    @ivar engines: the compiled engines by protocol (L{compiledEngines}),
        which this service owns: it gives each to the listeners of its
        protocol and stops them when it stops.
    @ivar terminal: a descriptor of the terminal (standard error) twistd
        was started from, kept through daemonizing when the log does not
        go there, to which start-up problems are written as well, as
        nginx prints a failed bind; closed once the listeners are bound.
        L{None} when there is none.
    @ivar watchers: objects told of the service's life: C{started(proxy)}
        once every listener is bound and started, C{reloading(proxy)} and
        C{reloaded(proxy, summary)} around each reload, C{stopping(proxy)}
        (L{twistedproxy.systemd.Notifier} is one).
    """

    def __init__(
        self,
        configPath: str,
        proxyMap: ProxyMap,
        reactor=None,
        load: Callable[[str], ProxyMap] = loadMap,
        listenerTypes: dict | None = None,
        manholeType=None,
        httpType=None,
        ipv6Available: Callable[[], bool] = _ipv6Available,
        engines: Callable[[object], dict] = compiledEngines,
        inherited: InheritedSockets | None = None,
        controlType=None,
        inThread: Callable[..., Deferred] | None = None,
    ) -> None:
        """
        @param load: reads and checks a map file; a pure function, run by
            C{inThread}.
        @param inThread: calls a function with arguments off the reactor
            thread and returns a L{Deferred} of its result; by default the
            reactor's thread pool.
        """
        MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.configPath = configPath
        self.map = proxyMap
        self.reactor = reactor
        self._load = load
        self._inThread = inThread or _inReactorThreadPool(reactor)
        self._listenerTypes = listenerTypes
        self._manholeType = manholeType
        self._httpType = httpType
        self._ipv6Available = ipv6Available
        #: The compiled engines, by protocol (L{None}: Python forwards).
        self.engines = engines(reactor)
        #: Listening sockets systemd passed in (socket activation).
        self.inheritedSockets = InheritedSockets([]) if inherited is None else inherited
        self.listeners: dict[ListenerKey, ListenerService] = {}
        self.draining: list[ListenerService] = []
        self.manhole: ManholeService | None = None
        self.http = None
        self.reloadCounts = ReloadCounts()
        self.watchers: list = []
        self.terminal: int | None = None
        #: Listeners published through the control socket, by key: the
        #: lease (the control connection) that holds each.
        self.published: dict[ListenerKey, object] = {}
        self.control = None
        self._controlType = controlType
        self._mapIndex: tuple = (None, {})
        self._publishedPorts: dict[tuple[str, int], list[ListenerKey]] = {}
        self._reloading = False
        self._queued: list[Deferred] = []
        self._previousHandler: (
            Callable[[int, FrameType | None], object] | int | None
        ) = None

    #: The observer twistd should log through (an C{ILogObserver}), set
    #: before twistd attaches this service to its application.
    logObserver: ILogObserver | None = None

    # -- start and stop ------------------------------------------------

    def setServiceParent(self, parent) -> None:
        """
        Attach to C{parent}; when that is twistd's application and
        L{logObserver} is set, twistd logs through it from its first line.
        """
        if self.logObserver is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.logObserver)
        MultiService.setServiceParent(self, parent)

    def privilegedStartService(self) -> None:
        """
        Bind every listener (and the manhole) before twistd drops
        privileges; any failure stops the start-up with a message naming
        the mapping.
        """
        useLogFormat(self.map.logFormat)
        problems = []
        for listener in self.map.listeners():
            service, problem = self._bindListener(listener)
            if problem:
                problems.append(problem)
            elif service is not None:
                self._attach(service)
        for section in ("manhole", "http"):
            settings = getattr(self.map, section)
            if settings is not None:
                try:
                    self._attachSection(section, settings)
                except CannotListenError as e:
                    problems.append(self._sectionProblem(section, settings, e))
        if self.map.control is not None and not problems:
            try:
                self._attachControl(self.map.control)
            except CannotListenError as e:
                problems.append(self._controlProblem(self.map.control, e))
        if problems:
            for service in list(self):
                service.disownServiceParent()
                # Not running yet, so disowning did not stop it: close
                # its socket.
                service.stopService()
            self.listeners.clear()
            self.manhole = self.http = None
            self.control = None
            for problem in problems:
                log.error("{problem}", problem=problem)
            self._tellTerminal(problems)
            raise StartupError(problems)
        self._tellTerminal([])
        for inherited in self.inheritedSockets.untaken():
            log.warn(
                "socket {socket} from systemd matches no listener of the map; kept open, unused",
                socket=str(inherited),
            )
        MultiService.privilegedStartService(self)

    def _tellTerminal(self, problems: list[str]) -> None:
        """
        Write C{problems}, one a line, to L{terminal}, if any, and close
        it: start-up is over either way.
        """
        terminal, self.terminal = self.terminal, None
        if terminal is None:
            return
        try:
            text = "".join(f"{problem}\n" for problem in problems).encode()
            while text:
                text = text[os.write(terminal, text) :]
        except OSError:
            # The terminal is gone: the log has the problems.
            pass
        finally:
            os.close(terminal)

    def startService(self) -> None:
        MultiService.startService(self)
        self._previousHandler = signal.signal(signal.SIGHUP, self._sighup)
        _logWarnings(self.map)
        for listener in self.map.listeners():
            if listener.key in self.listeners:
                log.info("{listener}", listener=listener)
        if self.control is not None:
            log.info("control socket on {path}", path=self.control.settings.socket)
        log.info(
            "portproxy started: {count} listeners from {path}{engine}",
            count=len(self.listeners),
            path=self.configPath,
            engine=(
                ""
                if self.tcpEngine is None
                else ", TCP relay engine on"
                + ("" if self.tlsEngine is None else ", TLS engine on")
            ),
        )
        if self.http is not None:
            log.info("http on {listen}", listen=self.http.settings.listen)
        self._tell("started")

    @property
    def tcpEngine(self) -> TCPEngine | None:
        """
        The compiled engine of TCP listeners, or L{None}.
        """
        return self.engines.get(TCP)

    @property
    def tlsEngine(self) -> TLSEngine | None:
        """
        The compiled engine that terminates the TLS of C{tls:} listeners,
        or L{None}.
        """
        return self.engines.get(TLS_ENGINE)

    @property
    def udpEngine(self) -> UDPEngine | None:
        """
        The compiled engine of UDP listeners, or L{None}.
        """
        return self.engines.get(UDP)

    def stopService(self):
        self._tell("stopping")
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        stopped = MultiService.stopService(self)
        # Every connection and session the engines carry ends now, each
        # with its access line.
        for engine in self.engines.values():
            if engine is not None:
                engine.stop()
        return stopped

    def _tell(self, event: str, *args) -> None:
        """
        Call C{event} of every watcher with this service and C{args}.
        """
        for watcher in self.watchers:
            getattr(watcher, event)(self, *args)

    def _sighup(self, signum, frame) -> None:
        # Only schedule: the reload runs on the reactor, never inside the
        # signal handler.
        self.reactor.callFromThread(self.reload)

    # -- listeners -----------------------------------------------------

    def _bindListener(
        self,
        listener: Listener,
        adopted: socket.socket | None = None,
        published: bool = False,
    ) -> tuple[ListenerService | None, str | None]:
        """
        A bound listener service, or a message saying why there is none.
        A wildcard IPv6 listener on a host without IPv6 is skipped with a
        warning and no message.  A listener that overlaps one of the other
        origin (the map's, or one published through the control socket)
        is refused.

        @param adopted: a socket bound to the listener's address already,
            to use instead of binding one.
        @param published: whether the listener comes from the control
            socket rather than the map.
        """
        place = "" if published else f"{self.configPath}:{listener.line}: "
        clash = self._overlapping(listener, published)
        if clash is not None:
            return None, (
                f"{place}cannot listen on {listener.key} for mapping "
                f"'{listener.mapping}': it overlaps {clash}"
            )
        if listener.host == ANY_IPV6 and not self._ipv6Available():
            log.warn(
                "no IPv6 on this host: skipping {key} [{mapping}]",
                key=listener.key,
                mapping=listener.mapping,
            )
            return None, None
        types = self._listenerTypes or _listenerTypes()
        try:
            service = types[listener.proto](listener, self.reactor)
            service.engine = self.engines.get(listener.proto)
            if listener.proto == TCP:
                service.tlsEngine = self.tlsEngine
            if adopted is None:
                adopted = self.inheritedSockets.take(
                    listener, frozenset(m.name for m in self.map.mappings)
                )
            service.inheritedSocket = adopted
            service.bind()
        except CannotListenError as e:
            problem = _bindProblem(e)
        except Exception as e:
            # Not a map's fault (the map was checked): a bug, or the
            # system.  One listener fails; the others still start.
            log.failure("binding {key}", key=listener.key)
            problem = f"unexpected {type(e).__name__}: {e}"
        else:
            return service, None
        return None, (
            f"{place}cannot listen on {listener.key} "
            f"for mapping '{listener.mapping}': {problem}"
        )

    def _overlapping(self, listener: Listener, published: bool) -> str | None:
        """
        What C{listener} would overlap, in words: a published listener
        may overlap nothing of the map or of the other published ones; a
        map listener nothing published (the map checked its own).
        """
        proto, host, port = listener.key
        for key in self._publishedPorts.get((proto, port), ()):
            if overlaps(key.host, host):
                return (
                    f"{key}, published through the control socket as "
                    f"'{self.listeners[key].listener.mapping}'"
                )
        if published:
            for other in self._mapListeners(proto, port):
                if overlaps(other.host, host):
                    return (
                        f"{other.key} of mapping '{other.mapping}' "
                        f"({self.configPath}:{other.line})"
                    )
        return None

    def _mapListeners(self, proto: str, port: int) -> list[Listener]:
        """
        The map's listeners on C{proto} and C{port}, from an index built
        once per map.
        """
        if self._mapIndex[0] is not self.map:
            index: dict[tuple[str, int], list[Listener]] = {}
            for listener in self.map.listeners():
                index.setdefault((listener.proto, listener.port), []).append(listener)
            self._mapIndex = (self.map, index)
        return self._mapIndex[1].get((proto, port), [])

    def _attach(self, service: ListenerService) -> None:
        self.listeners[service.listener.key] = service
        service.setServiceParent(self)

    def _detach(self, service: ListenerService) -> Deferred:
        """
        Stop a listener: it accepts nothing more at once; TCP connections
        it still has are kept in L{draining} until they end.
        """
        del self.listeners[service.listener.key]
        stopped = service.disownServiceParent()
        if service.flows:
            self.draining.append(service)
            service.whenDrained().addCallback(lambda _: self.draining.remove(service))
        return stopped

    def allListeners(self) -> Iterator[ListenerService]:
        """
        Live listeners, then draining ones.
        """
        yield from self.listeners.values()
        yield from self.draining

    def unboundListeners(self) -> list[Listener]:
        """
        Listeners of the map without a bound socket: they failed to bind
        (a wildcard IPv6 listener skipped on a host without IPv6 is not
        one of them).
        """
        ipv6 = None
        unbound = []
        for listener in self.map.listeners():
            if listener.key in self.listeners:
                continue
            if listener.host == ANY_IPV6:
                if ipv6 is None:
                    ipv6 = self._ipv6Available()
                if not ipv6:
                    continue
            unbound.append(listener)
        return unbound

    def findFlow(self, flowId: int) -> IFlow | None:
        for service in self.allListeners():
            flow = service.flows.get(flowId)
            if flow is not None:
                return flow
        return None

    def _mappingListeners(self, name: str) -> list[ListenerService]:
        found = [s for s in self.listeners.values() if s.listener.mapping == name]
        if not found:
            self.map.mapping(name)  # KeyError for a name the map does not have
        return found

    def disable(self, name: str) -> None:
        """
        Stop accepting on mapping C{name}'s listeners, keeping the sockets.
        """
        for service in self._mappingListeners(name):
            service.disable()

    def enable(self, name: str) -> None:
        """
        Accept again on mapping C{name}'s listeners.  Every listener is
        tried; if some cannot listen again (another socket took the
        address meanwhile), the first such error is raised after the rest
        are enabled.
        """
        failures = []
        for service in self._mappingListeners(name):
            try:
                service.enable()
            except CannotListenError as e:
                failures.append(e)
        if failures:
            raise failures[0]

    # -- mappings published through the control socket -----------------

    def publish(
        self, listener: Listener, lease: object, adopted: socket.socket | None = None
    ) -> None:
        """
        Start a listener that the map does not have, held by C{lease} (a
        control connection) until L{unpublish}; reloads leave it alone.

        @param adopted: a socket bound to its address already (the one
            dockerd passed the shim), to use instead of binding one.
        @raise PublishRefused: it overlaps a listener already there, or
            cannot bind; the message says which and why.
        """
        service, problem = self._bindListener(listener, adopted, published=True)
        if service is None:
            if adopted is not None:
                adopted.close()
            if problem is None:
                problem = f"cannot listen on {listener.key}: no IPv6 on this host"
            log.warn(
                "control: refused {listener}: {problem}",
                listener=listener,
                problem=problem,
            )
            raise PublishRefused(problem)
        self.published[listener.key] = lease
        self._publishedPorts.setdefault((listener.proto, listener.port), []).append(
            listener.key
        )
        self._attach(service)
        log.info("{listener} (published)", listener=listener)

    def unpublish(self, key: ListenerKey) -> Deferred:
        """
        Stop a listener L{publish} started, as a reload stops a removed
        one: UDP sessions end, TCP connections run on until they close.
        """
        del self.published[key]
        keys = self._publishedPorts[(key.proto, key.port)]
        keys.remove(key)
        if not keys:
            del self._publishedPorts[(key.proto, key.port)]
        service = self.listeners[key]
        log.info("{listener} (unpublished)", listener=service.listener)
        return maybeDeferred(self._detach, service)

    def _attachControl(self, settings) -> None:
        controlType = self._controlType
        if controlType is None:
            from twistedproxy.control import ControlService as controlType
        control = controlType(settings, self, self.reactor)
        control.bind()
        self.control = control
        control.setServiceParent(self)

    def _controlProblem(self, settings, error: Exception) -> str:
        return (
            f"{self.configPath}:{settings.line}: cannot listen on the control "
            f"socket {settings.socket}: {_bindProblem(error)}"
        )

    def _reloadControl(self, settings) -> list[str]:
        """
        Bring the control socket in line with the map's C{control}
        section: a new path or mode is a new socket (connections on the
        old one keep their mappings); no section closes the socket and
        every connection, whose mappings then end.

        @return: the problems, as the reload summary lists them.
        """
        old = self.control
        if old is not None and old.settings == settings:
            return []
        if old is not None:
            self.control = None
            old.disownServiceParent()
            if settings is None:
                old.dropConnections()
                log.info("control socket {path} closed", path=old.settings.socket)
        if settings is None:
            return []
        try:
            self._attachControl(settings)
        except CannotListenError as e:
            problem = self._controlProblem(settings, e)
            log.error("{problem}", problem=problem)
            return [problem]
        log.info("control socket on {path}", path=settings.socket)
        return []

    # -- the manhole and the HTTP endpoint -------------------------------

    def _sectionType(self, section: str):
        if section == "manhole":
            if self._manholeType is not None:
                return self._manholeType
            from twistedproxy.manhole import ManholeService

            return ManholeService
        if self._httpType is not None:
            return self._httpType
        from twistedproxy.web import HttpService

        return HttpService

    def _attachSection(self, section: str, settings) -> None:
        """
        Bind and start the service of the map's C{section} (C{"manhole"}
        or C{"http"}), a socket of its own, and keep it in the attribute of
        that name; L{CannotListenError} when it cannot bind.
        """
        service = self._sectionType(section)(settings, self, self.reactor)
        service.bind()
        setattr(self, section, service)
        service.setServiceParent(self)

    def _sectionProblem(self, section: str, settings, error: CannotListenError) -> str:
        what = "the manhole" if section == "manhole" else section
        return (
            f"{self.configPath}:{settings.line}: cannot listen on "
            f"{settings.listen} for {what}: {_bindProblem(error)}"
        )

    def _detachSection(self, section: str) -> Deferred:
        service = getattr(self, section)
        setattr(self, section, None)
        return service.disownServiceParent()

    # -- reload --------------------------------------------------------

    def reload(self) -> Deferred:
        """
        Read the map file again and apply it.  Requests made while a
        reload runs are merged into one more reload after it.

        @return: a L{Deferred} firing with the summary line.
        """
        d: Deferred = Deferred()
        if self._reloading:
            self._queued.append(d)
        else:
            self._reloadUntilDone([d])
        return d

    @inlineCallbacks
    def _reloadUntilDone(self, waiting: list[Deferred]):
        self._reloading = True
        try:
            while waiting:
                self._tell("reloading")
                try:
                    summary = yield self._reloadOnce()
                except Exception:
                    log.failure("reload of {path} failed", path=self.configPath)
                    summary = f"reload of {self.configPath}: failed, see the log"
                    self.reloadCounts.reloaded(False)
                self._tell("reloaded", summary)
                for d in waiting:
                    d.callback(summary)
                waiting, self._queued = self._queued, []
        finally:
            self._reloading = False

    def _running(self) -> ProxyMap:
        """
        What of the map runs now, as a map: its listeners that are bound
        (not those published through the control socket, which reloads
        leave alone), and the manhole and HTTP endpoint if they are.  A
        reload is planned against this, not against L{map}, so that
        listeners that failed to bind are simply added again, and a reload
        always starts from the sockets that exist.
        """
        listeners = tuple(
            service.listener
            for key, service in self.listeners.items()
            if key not in self.published
        )
        return ProxyMap(
            path=self.configPath,
            mappings=(Mapping("", listeners),) if listeners else (),
            manhole=None if self.manhole is None else self.manhole.settings,
            http=None if self.http is None else self.http.settings,
        )

    @inlineCallbacks
    def _reloadOnce(self):
        """
        Load the map in a thread (reading, parsing and checking a big file
        takes a while, and the reactor goes on accepting meanwhile), then
        apply it on the reactor thread.  Everything that can be wrong with
        a map is found by the load, before anything changes; what can still
        fail when applying it (a bind, the manhole's key files) fails for
        that listener alone, logged and counted as failed, and the rest
        applies.
        """
        log.info("reloading {path}", path=self.configPath)
        try:
            newMap = yield self._inThread(self._load, self.configPath)
        except ConfigError as e:
            for error in e.errors:
                log.error("{error}", error=error)
            summary = (
                f"reload of {self.configPath}: invalid, nothing changed "
                f"({e.count} error{'s' if e.count != 1 else ''})"
            )
            log.error("{summary}", summary=summary, errors=e.count)
            self.reloadCounts.reloaded(False)
            return summary
        if not self.running:
            return f"reload of {self.configPath}: not applied, the proxy is stopping"

        plan = diff(self._running(), newMap)
        # From here on the new map is the one served, whatever happens.
        self.map = newMap
        failed: list[str] = []
        _logWarnings(newMap)

        # Removed listeners first, so that their ports are free for added
        # ones (127.0.0.1:80 replaced by 0.0.0.0:80, say).
        stopping = [
            self._detach(self.listeners[listener.key]) for listener in plan.removed
        ]
        for section in ("manhole", "http"):
            action = getattr(plan, f"{section}Action")
            if action in ("removed", "moved") and getattr(self, section) is not None:
                stopping.append(self._detachSection(section))
        # (A service that stops at once returns None, not a Deferred.)
        stopping = [d for d in stopping if isinstance(d, Deferred)]
        for ok, result in (yield DeferredList(stopping, consumeErrors=True)):
            if not ok:
                log.failure("stopping a listener", result)
        for listener in plan.removed:
            log.info("{listener} (removed)", listener=listener)

        for listener in plan.changed:
            self.listeners[listener.key].reconfigure(listener)
            log.info("{listener} (changed)", listener=listener)
        for listener in plan.kept:
            log.info("{listener} (unchanged)", listener=listener)
        from twistedproxy.tcp.listener import listenBacklog

        # Read again for the listeners added now: the sysctl may have changed.
        listenBacklog.cache_clear()
        added = 0
        for listener in plan.added:
            service, problem = self._bindListener(listener)
            if problem:
                failed.append(problem)
                log.error("{problem}", problem=problem)
            elif service is not None:
                self._attach(service)
                added += 1
                log.info("{listener} (added)", listener=listener)

        for section in ("manhole", "http"):
            action, settings = getattr(plan, f"{section}Action"), getattr(plan, section)
            if action is not None and settings is not None:
                problem = self._applySection(section, settings, action)
                if problem:
                    failed.append(problem)
                    log.error("{problem}", problem=problem)
        useLogFormat(newMap.logFormat)
        failed += self._reloadControl(newMap.control)

        summary = (
            f"reload of {self.configPath}: added {added}, "
            f"removed {len(plan.removed)}, changed {len(plan.changed)}, "
            f"unchanged {len(plan.kept)}, failed {len(failed)}"
        )
        if failed:
            # Each failure has had its own line; the summary stays short.
            shown = failed[:_SUMMARY_FAILURES]
            if len(failed) > len(shown):
                shown.append(f"and {len(failed) - len(shown)} more")
            summary += " (" + "; ".join(shown) + ")"
        log.info(
            "{summary}",
            summary=summary,
            added=added,
            removed=len(plan.removed),
            changed=len(plan.changed),
            unchanged=len(plan.kept),
            failed=len(failed),
        )
        self.reloadCounts.reloaded(True)
        return summary

    def _applySection(self, section: str, settings, action: str) -> str | None:
        """
        Start the manhole or the HTTP endpoint (C{action} C{"added"} or
        C{"moved"}), or let the running manhole re-read its files;
        L{None}, or what failed.
        """
        what = "the manhole" if section == "manhole" else section
        if action in ("added", "moved"):
            try:
                self._attachSection(section, settings)
            except CannotListenError as e:
                return self._sectionProblem(section, settings, e)
            except Exception as e:
                log.failure("starting {what}", what=what)
                return (
                    f"{self.configPath}:{settings.line}: cannot start {what}: "
                    f"unexpected {type(e).__name__}: {e}"
                )
            log.info("{section} on {listen}", section=section, listen=settings.listen)
            return None
        if section != "manhole":
            return None
        # Re-read authorized_keys on every reload, changed or not.
        if self.manhole is None:  # _running() plans a manhole that is not up as added
            return None
        try:
            self.manhole.reconfigure(settings)
        except Exception as e:
            log.failure("reconfiguring the manhole")
            return (
                f"{self.configPath}:{settings.line}: manhole not reconfigured: "
                f"unexpected {type(e).__name__}: {e}"
            )
        return None
