"""
The root service: one child service per listener of the map (and the
manhole), started from the map at start-up and brought in line with the
file again by every reload.
"""

from __future__ import annotations

import signal
import socket
import sys
from typing import Callable, Iterator, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from twistedproxy.config import ConfigError, loadMap
from twistedproxy.listener import IFlow, ListenerService, fastPathWanted
from twistedproxy.model import ANY_IPV6, TCP, UDP, Listener, ListenerKey, Mapping, ProxyMap
from twistedproxy.plan import diff

log = Logger(namespace="portproxy")

#: A reload's summary line names at most this many failures.
_SUMMARY_FAILURES = 10


class StartupError(Exception):
    """
    A listener of the map could not be started; the message names it.
    """


def _ipv6Available() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True


def _relayEngine(reactor):
    """
    The relay engine for established TCP connections, or L{None} when it
    is not built or not wanted.
    """
    from twistedproxy import fastrelay

    if not (fastrelay.available() and fastPathWanted()):
        return None
    return fastrelay.FastRelay(reactor)


def _listenerTypes() -> dict:
    from twistedproxy.tcp import TCPListener
    from twistedproxy.udp import UDPListener

    return {TCP: TCPListener, UDP: UDPListener}


def _bindProblem(error: CannotListenError) -> str:
    """
    The operating system's words for a failed bind, without Twisted's
    wrapping.
    """
    cause = error.socketError
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause)


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
        return deferToThreadPool(reactor, reactor.getThreadPool(), _yieldingOften, f, *args)

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
    """

    def __init__(
        self,
        configPath: str,
        proxyMap: ProxyMap,
        reactor=None,
        load: Callable[[str], ProxyMap] = loadMap,
        listenerTypes: Optional[dict] = None,
        manholeType=None,
        ipv6Available: Callable[[], bool] = _ipv6Available,
        relayEngine=_relayEngine,
        inThread: Optional[Callable[..., Deferred]] = None,
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
        self._ipv6Available = ipv6Available
        #: Relays established TCP connections in its own thread, or None.
        self.fastRelay = relayEngine(reactor)
        self.listeners: dict[ListenerKey, ListenerService] = {}
        self.draining: list[ListenerService] = []
        self.manhole = None
        self._reloading = False
        self._queued: list[Deferred] = []
        self._previousHandler = None

    # -- start and stop ------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Bind every listener (and the manhole) before twistd drops
        privileges; any failure stops the start-up with a message naming
        the mapping.
        """
        problems = []
        for listener in self.map.listeners():
            service, problem = self._bindListener(listener)
            if problem:
                problems.append(problem)
            elif service is not None:
                self._attach(service)
        if self.map.manhole is not None:
            try:
                self._attachManhole(self.map.manhole)
            except CannotListenError as e:
                problems.append(self._manholeProblem(self.map.manhole, e))
        if problems:
            for service in list(self):
                service.disownServiceParent()
                # Not running yet, so disowning did not stop it: close
                # its socket.
                service.stopService()
            self.listeners.clear()
            self.manhole = None
            for problem in problems:
                log.error("{problem}", problem=problem)
            raise StartupError("\n".join(problems))
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        MultiService.startService(self)
        self._previousHandler = signal.signal(signal.SIGHUP, self._sighup)
        for listener in self.map.listeners():
            if listener.key in self.listeners:
                log.info("{listener}", listener=listener)
        log.info(
            "portproxy started: {count} listeners from {path}{engine}",
            count=len(self.listeners),
            path=self.configPath,
            engine="" if self.fastRelay is None else ", TCP relay engine on",
        )

    def stopService(self):
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        stopped = MultiService.stopService(self)
        if self.fastRelay is not None:
            # Every connection the engine relays ends now, each with its
            # access line.
            self.fastRelay.stop()
        return stopped

    def _sighup(self, signum, frame) -> None:
        # Only schedule: the reload runs on the reactor, never inside the
        # signal handler.
        self.reactor.callFromThread(self.reload)

    # -- listeners -----------------------------------------------------

    def _bindListener(
        self, listener: Listener
    ) -> tuple[Optional[ListenerService], Optional[str]]:
        """
        A bound listener service, or a message saying why there is none.
        A wildcard IPv6 listener on a host without IPv6 is skipped with a
        warning and no message.
        """
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
            if listener.proto == TCP:
                service.fastRelay = self.fastRelay
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
            f"{self.configPath}:{listener.line}: cannot listen on {listener.key} "
            f"for mapping '{listener.mapping}': {problem}"
        )

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

    def findFlow(self, flowId: int) -> Optional[IFlow]:
        for service in self.allListeners():
            flow = service.flows.get(flowId)
            if flow is not None:
                return flow
        return None

    def _mappingListeners(self, name: str) -> list[ListenerService]:
        self.map.mapping(name)  # KeyError for a name the map does not have
        return [s for s in self.listeners.values() if s.listener.mapping == name]

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

    # -- manhole -------------------------------------------------------

    def _attachManhole(self, settings) -> None:
        manholeType = self._manholeType
        if manholeType is None:
            from twistedproxy.manhole import ManholeService as manholeType
        manhole = manholeType(settings, self, self.reactor)
        manhole.bind()
        self.manhole = manhole
        manhole.setServiceParent(self)

    def _manholeProblem(self, settings, error: CannotListenError) -> str:
        return (
            f"{self.configPath}:{settings.line}: cannot listen on "
            f"{settings.listen} for the manhole: {_bindProblem(error)}"
        )

    def _detachManhole(self) -> Deferred:
        manhole, self.manhole = self.manhole, None
        return manhole.disownServiceParent()

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
                try:
                    summary = yield self._reloadOnce()
                except Exception:
                    log.failure("reload of {path} failed", path=self.configPath)
                    summary = f"reload of {self.configPath}: failed, see the log"
                for d in waiting:
                    d.callback(summary)
                waiting, self._queued = self._queued, []
        finally:
            self._reloading = False

    def _running(self) -> ProxyMap:
        """
        What runs now, as a map: the listeners that are bound and the
        manhole if it is.  A reload is planned against this, not against
        L{map}, so that listeners that failed to bind are simply added
        again, and a reload always starts from the sockets that exist.
        """
        listeners = tuple(service.listener for service in self.listeners.values())
        return ProxyMap(
            path=self.configPath,
            mappings=(Mapping("", listeners),) if listeners else (),
            manhole=None if self.manhole is None else self.manhole.settings,
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
            log.error("{summary}", summary=summary)
            return summary
        if not self.running:
            return f"reload of {self.configPath}: not applied, the proxy is stopping"

        plan = diff(self._running(), newMap)
        # From here on the new map is the one served, whatever happens.
        self.map = newMap
        failed: list[str] = []

        # Removed listeners first, so that their ports are free for added
        # ones (127.0.0.1:80 replaced by 0.0.0.0:80, say).
        stopping = [self._detach(self.listeners[listener.key]) for listener in plan.removed]
        if plan.manholeAction in ("removed", "moved") and self.manhole is not None:
            stopping.append(self._detachManhole())
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

        if plan.manholeAction is not None and plan.manhole is not None:
            problem = self._applyManhole(plan.manhole, plan.manholeAction)
            if problem:
                failed.append(problem)
                log.error("{problem}", problem=problem)

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
        log.info("{summary}", summary=summary)
        return summary

    def _applyManhole(self, settings, action: str) -> Optional[str]:
        """
        Start the manhole (C{action} C{"added"} or C{"moved"}) or let the
        running one re-read its files; L{None}, or what failed.
        """
        if action in ("added", "moved"):
            try:
                self._attachManhole(settings)
            except CannotListenError as e:
                return self._manholeProblem(settings, e)
            except Exception as e:
                log.failure("starting the manhole")
                return (
                    f"{self.configPath}:{settings.line}: cannot start the manhole: "
                    f"unexpected {type(e).__name__}: {e}"
                )
            log.info("manhole on {listen}", listen=settings.listen)
            return None
        # Re-read authorized_keys on every reload, changed or not.
        try:
            self.manhole.reconfigure(settings)
        except Exception as e:
            log.failure("reconfiguring the manhole")
            return (
                f"{self.configPath}:{settings.line}: manhole not reconfigured: "
                f"unexpected {type(e).__name__}: {e}"
            )
        return None
