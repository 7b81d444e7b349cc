"""
The control socket: a unix socket on which local programs publish
mappings at run time, speaking AMP (L{twisted.protocols.amp}).

Its one user so far is the Docker shim (C{twistedproxy/_dockershim.c}),
which dockerd runs as its userland proxy once per published port: the shim
sends one L{Publish} and keeps its connection open.  The connection is the
lease: when it closes (the shim stopped, or died), the daemon unpublishes
whatever that connection published.  docs/docker.md describes the
protocol box by box.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistedproxy.model import (
    PROTOCOLS,
    Control,
    Listener,
    ListenerKey,
    Target,
    formatHostPort,
)
from twistedproxy.service import PublishRefused

log = Logger(namespace="portproxy")

#: The Docker shim's file name, next to this module (setup.py builds it).
SHIM_NAME = "portproxy-docker-proxy"


def shimPath() -> str:
    """
    The absolute path of the Docker shim of this installation, whether
    it was built or not.
    """
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIM_NAME)


class Refused(Exception):
    """
    A request the daemon turns down; its text goes back to the client.
    """


class Publish(amp.Command):
    """
    Publish C{host_ip:host_port} to C{container_ip:container_port}, for
    as long as this connection stays open (or until L{Unpublish}).  With
    C{listen_fd}, a socket already bound there (dockerd's, passed on by
    the shim) is used instead of binding one.  Answers the mapping's name.
    """

    arguments = [
        (b"proto", amp.Unicode()),
        (b"host_ip", amp.Unicode()),
        (b"host_port", amp.Integer()),
        (b"container_ip", amp.Unicode()),
        (b"container_port", amp.Integer()),
        (b"listen_fd", amp.Descriptor(optional=True)),
    ]
    response = [(b"name", amp.Unicode())]
    errors = {Refused: b"REFUSED"}


class Unpublish(amp.Command):
    """
    Stop a mapping this connection published; answers once its port is
    free again.
    """

    arguments = [(b"name", amp.Unicode())]
    response = []
    errors = {Refused: b"REFUSED"}


def publishedName(proto: str, host: str, port: int) -> str:
    """
    The mapping name of a published listener: C{@tcp-127.0.0.1:8080}.
    The C{@} marks it as published through the control socket; no map
    name can start with it.
    """
    return f"@{proto}-{formatHostPort(host, port)}"


def _address(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Refused(f"{what} {text!r} is not an IP address") from None


def _port(number: int, what: str) -> int:
    if not 1 <= number <= 65535:
        raise Refused(f"{what} {number} is out of range (1-65535)")
    return number


def requestedListener(
    proto: str, hostIP: str, hostPort: int, containerIP: str, containerPort: int
) -> Listener:
    """
    The listener a L{Publish} asks for, with the built-in timeouts.

    @raise Refused: an argument is not usable.
    """
    if proto not in PROTOCOLS:
        raise Refused(
            f"protocol {proto!r} is not supported by portproxy (only tcp and udp)"
        )
    host = _address(hostIP, "host address")
    port = _port(hostPort, "host port")
    target = Target(
        _address(containerIP, "container address"),
        _port(containerPort, "container port"),
    )
    if target.host in ("0.0.0.0", "::"):
        raise Refused(f"container address {containerIP} is the wildcard address")
    return Listener(publishedName(proto, host, port), proto, host, port, target)


def adoptSocket(fd: int, listener: Listener) -> socket.socket:
    """
    A socket object for descriptor C{fd}, checked to be a socket of
    C{listener}'s protocol bound to its address.

    @raise Refused: it is not; C{fd} is closed then.
    """
    try:
        skt = socket.socket(fileno=fd)
    except OSError as e:
        os.close(fd)
        raise Refused(f"the passed descriptor is not a socket: {e.strerror}") from None
    os.set_inheritable(skt.fileno(), False)
    kind = socket.SOCK_STREAM if listener.proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    try:
        bound = skt.getsockname()
    except OSError:
        bound = None
    if (
        skt.type != kind
        or skt.family != family
        or not bound
        or (
            str(ipaddress.ip_address(bound[0])),
            bound[1],
        )
        != (listener.host, listener.port)
    ):
        skt.close()
        raise Refused(
            f"the passed socket is not a {listener.proto} socket bound to {listener.listen}"
        )
    return skt


class ControlProtocol(amp.AMP):
    """
    One connection to the control socket, and the lease on what it
    published.

    @ivar leased: the keys of the listeners this connection published,
        by mapping name.
    """

    def __init__(self, proxy) -> None:
        amp.AMP.__init__(self)
        self.proxy = proxy
        self.leased: dict[str, ListenerKey] = {}

    @Publish.responder
    def publish(
        self, proto, host_ip, host_port, container_ip, container_port, listen_fd=None
    ):
        try:
            listener = requestedListener(
                proto, host_ip, host_port, container_ip, container_port
            )
        except Refused:
            if listen_fd is not None:
                os.close(listen_fd)
            raise
        adopted = None if listen_fd is None else adoptSocket(listen_fd, listener)
        try:
            self.proxy.publish(listener, self, adopted)
        except PublishRefused as e:
            raise Refused(str(e)) from None
        self.leased[listener.mapping] = listener.key
        return {"name": listener.mapping}

    @Unpublish.responder
    def unpublish(self, name):
        key = self.leased.pop(name, None)
        if key is None:
            raise Refused(f"this connection has published no mapping named {name!r}")
        return self.proxy.unpublish(key).addCallback(lambda _: {})

    def makeConnection(self, transport) -> None:
        # Not AMP's own, which logs two lines per connection: a shim per
        # port would log thousands.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        # The lease ends with the connection.
        leased, self.leased = self.leased, {}
        for key in leased.values():
            self.proxy.unpublish(key)
        # Descriptors that came without a command to claim them.
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()
        self.factory.connections.discard(self)


class ControlFactory(Factory):
    noisy = False

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.connections: set[ControlProtocol] = set()

    def buildProtocol(self, addr) -> ControlProtocol:
        protocol = ControlProtocol(self.proxy)
        protocol.factory = self
        self.connections.add(protocol)
        return protocol


#: Enough for every shim of a large port range to reconnect at once after
#: the daemon restarts (Twisted's default is 50).
BACKLOG = 4096


class ControlService(Service):
    """
    The listening control socket of one C{control} section.

    @ivar settings: the L{Control} section.
    """

    name = "control"

    def __init__(self, settings: Control, proxy, reactor) -> None:
        self.settings = settings
        self.proxy = proxy
        self.reactor = reactor
        self.factory = ControlFactory(proxy)
        self._port = None

    def bind(self) -> None:
        """
        Listen on the socket path, creating its directory (mode 0755)
        when missing and taking over a stale socket file a crashed daemon
        left behind.

        @raise CannotListenError: another process listens there, or the
            path cannot be used.
        """
        path = self.settings.socket
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            _removeStale(path)
        except OSError as e:
            raise CannotListenError(path, 0, e) from e
        # Created with no permissions for anyone but the owner until the
        # mode is set, so nobody connects in between.
        umask = os.umask(0o177)
        try:
            self._port = self.reactor.listenUNIX(
                path, self.factory, backlog=BACKLOG, mode=self.settings.mode
            )
        finally:
            os.umask(umask)

    def stopService(self):
        Service.stopService(self)
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()

    def dropConnections(self) -> None:
        """
        Close every connection; what they published is unpublished.
        """
        for protocol in list(self.factory.connections):
            # Built and connected in one step by the listening port.
            assert protocol.transport is not None
            protocol.transport.loseConnection()


def _removeStale(path: str) -> None:
    """
    Remove a socket file at C{path} that nobody listens on.

    @raise OSError: something listens there (C{EADDRINUSE}), or C{path}
        is not a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(
        errno.EADDRINUSE,
        "another process listens on it (is portproxy running already?)",
    )
