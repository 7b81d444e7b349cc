"""
systemd integration without a systemd library: readiness notices over
C{$NOTIFY_SOCKET} (C{Type=notify}), the watchdog, and listening sockets
passed in by socket activation (C{LISTEN_FDS}).

Both follow the protocols of C{sd_notify(3)} and C{sd_listen_fds(3)}: a
notice is one datagram of C{KEY=VALUE} lines sent to the AF_UNIX socket
named in C{$NOTIFY_SOCKET} (an abstract one when the name starts with
C{@}); inherited sockets are the descriptors from 3 on, C{$LISTEN_FDS} of
them, meant for this process when C{$LISTEN_PID} is its pid, named by
C{$LISTEN_FDNAMES} (C{FileDescriptorName=}).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twistedproxy.model import TCP, UDP, Listener

log = Logger(namespace="portproxy")

#: The first inherited descriptor (C{SD_LISTEN_FDS_START}).
LISTEN_FDS_START = 3

_SOCKET_TYPES = {TCP: socket.SOCK_STREAM, UDP: socket.SOCK_DGRAM}


def monotonicMicroseconds() -> int:
    """
    C{CLOCK_MONOTONIC} in microseconds, as C{RELOADING=1} wants it in
    C{MONOTONIC_USEC}.
    """
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """
    Tells systemd about the root service's life: a watcher of
    L{twistedproxy.service.ProxyService}.

    @ivar address: the notify socket's address for C{sendto}.
    @ivar watchdogInterval: seconds between two C{WATCHDOG=1}, half of
        C{$WATCHDOG_USEC}; L{None} when systemd watches nothing.
    """

    def __init__(
        self,
        address,
        reactor,
        watchdogInterval: float | None = None,
        monotonic=monotonicMicroseconds,
    ) -> None:
        self.address = address
        self.reactor = reactor
        self.watchdogInterval = watchdogInterval
        self._monotonic = monotonic
        self._socket = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        )
        self._watchdog: LoopingCall | None = None
        self._failed = False

    @classmethod
    def fromEnvironment(cls, reactor, environ=os.environ, pid: int | None = None):
        """
        A notifier for C{$NOTIFY_SOCKET}, or L{None} when it is not set.
        """
        name = environ.get("NOTIFY_SOCKET", "")
        if not name:
            return None
        address = "\0" + name[1:] if name.startswith("@") else name
        interval = None
        watchdogPid = environ.get("WATCHDOG_PID", "")
        usec = environ.get("WATCHDOG_USEC", "")
        pid = os.getpid() if pid is None else pid
        if usec.isdigit() and int(usec) > 0 and watchdogPid in ("", str(pid)):
            interval = int(usec) / 2e6
        return cls(address, reactor, interval)

    def notify(self, *assignments: str) -> None:
        """
        Send one notice of C{KEY=VALUE} C{assignments}.  A failure is
        logged once and otherwise ignored: systemd going away must not
        stop the proxy.
        """
        try:
            self._socket.sendto("\n".join(assignments).encode("utf-8"), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warn("cannot notify systemd: {error}", error=e)

    # -- ProxyService watcher ------------------------------------------

    def started(self, proxy) -> None:
        self.notify("READY=1", _status(proxy))
        if self.watchdogInterval is not None and self._watchdog is None:
            self._watchdog = LoopingCall(self.notify, "WATCHDOG=1")
            self._watchdog.clock = self.reactor
            self._watchdog.start(self.watchdogInterval, now=True)

    def reloading(self, proxy) -> None:
        self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={self._monotonic()}", "STATUS=reloading"
        )

    def reloaded(self, proxy, summary: str) -> None:
        self.notify("READY=1", _status(proxy, summary))

    def stopping(self, proxy) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog.running:
            watchdog.stop()
        self.notify("STOPPING=1", "STATUS=stopping")


def _status(proxy, summary: str | None = None) -> str:
    unbound = len(proxy.unboundListeners())
    status = f"STATUS={len(proxy.listeners)} listeners"
    if unbound:
        status += f", {unbound} failed to bind"
    status += f", {sum(s.active for s in proxy.allListeners())} open"
    if summary is not None:
        status += f"; {summary}"
    return status


class InheritedSocket:
    """
    One listening socket systemd passed in.

    @ivar name: its C{FileDescriptorName=} (C{"unknown"} when systemd gave
        none).
    @ivar proto: C{"tcp"} or C{"udp"}; L{None} for another kind of socket.
    @ivar host: the normalized address it is bound to.
    @ivar taken: whether a listener of the map has used it.
    """

    def __init__(self, skt: socket.socket, name: str) -> None:
        self.socket = skt
        self.name = name
        self.proto = next((p for p, t in _SOCKET_TYPES.items() if t == skt.type), None)
        self.host: str | None = None
        self.port: int | None = None
        if skt.family in (socket.AF_INET, socket.AF_INET6) and self.proto is not None:
            address = skt.getsockname()
            self.host = str(ipaddress.ip_address(address[0]))
            self.port = address[1]
        self.taken = False

    def __str__(self) -> str:
        if self.host is None:
            return f"'{self.name}' (fd {self.socket.fileno()}, not a TCP or UDP socket)"
        where = f"[{self.host}]" if ":" in self.host else self.host
        return f"'{self.name}' ({self.proto} {where}:{self.port})"


class InheritedSockets:
    """
    The sockets systemd passed to this process, kept open for its whole
    life: a listener that takes one gets a duplicate of its descriptor, so
    that closing the listener (a reload removed it, or disabled and removed)
    leaves systemd's socket open, bound, and ready for the next start.
    """

    def __init__(self, sockets: list[InheritedSocket]) -> None:
        self.sockets = sockets

    @classmethod
    def fromEnvironment(
        cls, environ=os.environ, pid: int | None = None
    ) -> InheritedSockets:
        """
        The sockets of C{$LISTEN_FDS} when C{$LISTEN_PID} is this process;
        the variables are removed from C{environ}, so that nothing this
        process starts takes them for its own.
        """
        pid = os.getpid() if pid is None else pid
        count = environ.get("LISTEN_FDS", "")
        listenPid = environ.get("LISTEN_PID", "")
        names = environ.get("LISTEN_FDNAMES", "")
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            environ.pop(key, None)
        if not count.isdigit() or listenPid != str(pid):
            return cls([])
        nameList = names.split(":") if names else []
        sockets = []
        for index in range(int(count)):
            fd = LISTEN_FDS_START + index
            os.set_inheritable(fd, False)
            name = nameList[index] if index < len(nameList) else "unknown"
            sockets.append(InheritedSocket(socket.socket(fileno=fd), name))
        return cls(sockets)

    def take(
        self, listener: Listener, mappings: frozenset = frozenset()
    ) -> socket.socket | None:
        """
        A new descriptor of the inherited socket for C{listener}, or
        L{None}.  A socket matches a listener bound to the same protocol,
        address and port; a socket named after a mapping of the map (one
        of C{mappings}) matches that mapping's listeners only.
        """
        host = str(ipaddress.ip_address(listener.host))
        for inherited in self.sockets:
            if (inherited.proto, inherited.host, inherited.port) != (
                listener.proto,
                host,
                listener.port,
            ):
                continue
            if inherited.name in mappings and inherited.name != listener.mapping:
                continue
            inherited.taken = True
            return inherited.socket.dup()
        return None

    def untaken(self) -> list[InheritedSocket]:
        return [inherited for inherited in self.sockets if not inherited.taken]
