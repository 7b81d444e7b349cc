"""
The twistd plugin's options and service: C{twistd portproxy -c map.yaml}.
"""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from twistedproxy.config import ConfigError, loadMap
from twistedproxy.logs import twistdJSONObserver
from twistedproxy.service import ProxyService, StartupError
from twistedproxy.systemd import InheritedSockets, Notifier


class Options(usage.Options):
    synopsis = "-c MAP.yaml"
    longdesc = (
        "Forward host TCP and UDP ports to backend ip:port endpoints as the "
        "YAML map says. SIGHUP re-reads the map and applies it without "
        "dropping connections. Check a map without running it with "
        "'python -m twistedproxy check MAP.yaml'."
    )
    optParameters = [
        ["config", "c", None, "The YAML map to serve (required)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("-c/--config MAP.yaml is required")


def serviceForMap(path: str, reactor=None) -> ProxyService:
    """
    The root service for the map at C{path}.  An invalid map prints every
    error, one C{FILE:LINE: message} a line, and exits with status 1 before
    anything listens.  A listener that cannot bind later stops twistd
    with its one logged line and no traceback (L{quietStartupErrors}),
    also written to the terminal when the log goes elsewhere (see
    L{makeService}).

    Under systemd, the service takes the listening sockets passed in
    (C{$LISTEN_FDS}, read here, before twistd forks into a daemon) and
    tells C{$NOTIFY_SOCKET} when it is ready, reloading and stopping.
    """
    if not isinstance(sys.excepthook, _QuietHook):
        sys.excepthook = quietStartupErrors()
    try:
        proxyMap = loadMap(path)
    except ConfigError as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        raise SystemExit(1) from None
    if reactor is None:
        from twisted.internet import reactor
    service = ProxyService(
        path, proxyMap, reactor=reactor, inherited=InheritedSockets.fromEnvironment()
    )
    notifier = Notifier.fromEnvironment(reactor)
    if notifier is not None:
        service.watchers.append(notifier)
    return service


def quietStartupErrors(hook=None):
    """
    An exception hook (for C{sys.excepthook}) that prints nothing for a
    L{StartupError} and passes any other exception to C{hook}.

    A listener that cannot bind fails twistd's C{privilegedStartService},
    and twistd lets that exception out of C{run()}: Python would print a
    traceback of twistd's start-up (some 24 lines) after the one line that
    matters, which L{ProxyService} has logged already.  The process still
    exits with status 1; in daemon mode twistd's parent process exits with
    status 1 too, after the problems were written to the terminal
    (L{ProxyService.terminal}) and before its own short line.
    """
    if hook is None:
        hook = sys.excepthook

    return _QuietHook(hook)


class _QuietHook:
    def __init__(self, hook) -> None:
        self.hook = hook

    def __call__(self, kind, value, tb) -> None:
        if not issubclass(kind, StartupError):
            self.hook(kind, value, tb)


def keptTerminal(twistdOptions) -> int | None:
    """
    A descriptor of standard error for L{ProxyService.terminal}, when
    twistd's options (C{twistdOptions}, as twistd parsed them) say the log
    will not go there: in daemon mode (which points standard error at
    C{/dev/null}), or with C{--logfile FILE}.  L{None} when the log goes
    to the terminal already, or there is no standard error.
    """
    logfile = twistdOptions.get("logfile")
    if twistdOptions.get("nodaemon") and logfile in (None, "-"):
        return None
    try:
        return os.dup(2)
    except OSError:
        return None


def makeService(options: Options) -> ProxyService:
    service = serviceForMap(options["config"])
    if options.parent is not None:
        service.terminal = keptTerminal(options.parent)
    if service.map.logFormat == "json" and options.parent is not None:
        service.logObserver = twistdJSONObserver(options.parent)
    return service
