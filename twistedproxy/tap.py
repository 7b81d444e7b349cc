"""
The twistd plugin's options and service: C{twistd portproxy -c map.yaml}.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from twistedproxy.config import ConfigError, loadMap
from twistedproxy.logs import twistdJSONObserver
from twistedproxy.service import ProxyService
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
    anything listens.

    Under systemd, the service takes the listening sockets passed in
    (C{$LISTEN_FDS}, read here, before twistd forks into a daemon) and
    tells C{$NOTIFY_SOCKET} when it is ready, reloading and stopping.
    """
    try:
        proxyMap = loadMap(path)
    except ConfigError as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        raise SystemExit(1)
    if reactor is None:
        from twisted.internet import reactor
    service = ProxyService(
        path, proxyMap, reactor=reactor, inherited=InheritedSockets.fromEnvironment()
    )
    notifier = Notifier.fromEnvironment(reactor)
    if notifier is not None:
        service.watchers.append(notifier)
    return service


def makeService(options: Options) -> ProxyService:
    service = serviceForMap(options["config"])
    if service.map.logFormat == "json" and options.parent is not None:
        service.logObserver = twistdJSONObserver(options.parent)
    return service
