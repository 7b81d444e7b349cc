"""
The seam between a TCP listener and what carries its clients' bytes.

A L{TCPListener} binds, admits and identifies; an L{ITCPForwarder},
picked once by L{tcpForwarder} when the listener binds, accepts its
clients and carries their bytes.  Two implementations:

  - L{PythonForwarder}: Twisted accepts each client and a
    L{twistedproxy.tcp.relay.Relay} copies its bytes in the reactor.
  - L{EngineForwarder}: the compiled engine of the root service
    (L{twistedproxy.tcp.engine.TCPEngine}) copies them with C{splice(2)}
    in its own thread.  A client of a target that is an address is
    accepted without any Twisted object and dialed by an
    L{twistedproxy.tcp.engine.EngineFlow}; any other client (a host
    name, TLS, SNI routing) starts as a Python relay, which offers its
    two connections to the engine once the target answered.

The listener never asks which one it has.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING

from twisted.internet import tcp
from zope.interface import Attribute, Interface, implementer

from twistedproxy import tls
from twistedproxy.access import hostOf
from twistedproxy.listener import IFlow
from twistedproxy.model import ANY_IPV4, ANY_IPV6, formatHostPort
from twistedproxy.proxyprotocol import Addresses
from twistedproxy.tcp.engine import EngineFlow, TCPEngine, acceptClient
from twistedproxy.tcp.relay import refuseDescriptor

if TYPE_CHECKING:
    from twistedproxy.tcp.listener import ListeningPort, TCPListener
    from twistedproxy.tcp.relay import Relay

#: accept() errors that concern one client only: take the next.
_ACCEPT_AGAIN = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR)


class ITCPForwarder(Interface):
    """
    Carries the bytes of a TCP listener's clients.
    """

    compiled = Attribute("C{True} when the compiled engine carries the bytes.")

    def acceptClients(port: ListeningPort) -> None:
        """
        The listening C{port} is readable: accept its waiting clients and
        start serving each admitted one.
        """

    def established(relay: Relay) -> IFlow | None:
        """
        The target of the Python C{relay} answered and both its
        connections are set up: take them over and return the flow that
        stands for the relay from now on, or return L{None} to leave them
        to the relay.
        """


@implementer(ITCPForwarder)
class PythonForwarder:
    """
    Twisted accepts every client, and its L{Relay} copies the bytes.
    """

    compiled = False

    def acceptClients(self, port: ListeningPort) -> None:
        tcp.Port.doRead(port)

    def established(self, relay: Relay) -> IFlow | None:
        return None


@implementer(ITCPForwarder)
class EngineForwarder:
    """
    The compiled engine carries the bytes of every client it can take.

    @ivar service: the listener served.
    @ivar engine: the root service's L{TCPEngine}.
    """

    compiled = True

    def __init__(self, service: TCPListener, engine: TCPEngine) -> None:
        self.service = service
        self.engine = engine

    def acceptClients(self, port: ListeningPort) -> None:
        """
        Accept clients.  While the target is an address, a client goes
        straight to an L{EngineFlow} and then to the engine, with no
        Twisted transport or protocol built for it (a client of TLS the
        TLS engine terminates: to a L{twistedproxy.tcp.tlsengine.TLSDial});
        otherwise (and always for SNI routing and TLS in Python, whose
        client speaks first) Twisted's own accept builds a L{Relay}.
        """
        service = self.service
        if not service.targetIsAddress or (
            service.listener.tls and not service.tlsEngineApplies()
        ):
            tcp.Port.doRead(port)
            return
        accepted = 0
        # A bare descriptor, already non-blocking, and the client's address
        # already written as the access line wants it: the client's socket
        # goes to the engine without a Python socket object ever being built.
        listeningFd = port.socket.fileno()
        while accepted < port.numberAccepts:
            try:
                client = acceptClient(listeningFd)
            except OSError as e:
                if e.errno in _ACCEPT_AGAIN:
                    continue
                # Out of descriptors or memory, or worse: Twisted's accept
                # knows how to shed the client and log it.
                tcp.Port.doRead(port)
                return
            if client is None:
                break
            accepted += 1
            self.dial(*client)
        # Scaled as Twisted's own accept loop does.
        if accepted == port.numberAccepts:
            port.numberAccepts += 20
        else:
            port.numberAccepts = max(1, accepted)

    def established(self, relay: Relay) -> IFlow | None:
        if tls.isTLSTransport(relay.transport) or tls.isTLSTransport(
            relay.targetTransport
        ):
            # A TLS side's bytes on the socket are not the bytes relayed.
            return None
        return self.engine.adoptFlow(
            relay,
            relay.transport,
            relay.targetTransport,
            relay.listener.timeouts.idle,
            self.service.flowEnded,
        )

    # -- clients accepted here ------------------------------------------------

    def dial(self, clientFd: int, client: str) -> None:
        """
        A client accepted for the engine (its bare non-blocking
        descriptor, and its C{host:port}): identify and admit it, connect
        to the target, an address, and hand both sockets to the engine
        when it answers.
        """
        listener = self.service.listener
        if listener.identity:
            if listener.identity.acceptProxyProtocol or listener.host in (
                ANY_IPV4,
                ANY_IPV6,
            ):
                self._identifyDescriptor(clientFd, client)
                return
            # Both ends are known without asking the socket.
            host, _, port = client.rpartition(":")
            addresses = Addresses(
                (host.strip("[]"), int(port)), (listener.host, listener.port)
            )
            self.dialIdentified(clientFd, client, addresses)
            return
        self.dialIdentified(clientFd, client, None)

    def dialIdentified(
        self, clientFd: int, client: str, addresses: Addresses | None
    ) -> None:
        """
        Admit and dial for a client of the engine whose real address is
        known: C{client} (C{host:port}), and C{addresses} when the
        listener's C{client_address} or C{accept_proxy_protocol} needed
        them.
        """
        service = self.service
        refusal = service.admit(hostOf(client))
        if refusal is not None:
            refuseDescriptor(clientFd, refusal, service.reactor)
            service.rejected(client, refusal)
            return
        if service.listener.tls is not None and service.tlsEngine is not None:
            service.tlsEngine.dial(service, clientFd, client, addresses)
            return
        EngineFlow.dial(service, self.engine, clientFd, client, addresses)

    def _identifyDescriptor(self, clientFd: int, client: str) -> None:
        """
        L{TCPListener.identify} a client of the engine, then
        L{dialIdentified} it.
        """
        service = self.service
        try:
            skt = socket.socket(fileno=clientFd)
        except OSError as e:
            os.close(clientFd)
            service.refusedHeader(
                client, f"cannot read the client's socket: {e.strerror}"
            )
            return

        def identified(addresses: Addresses | None, problem: str | None) -> None:
            fd = skt.detach()
            if problem is not None or addresses is None:
                # A FIN: a client that misbehaved is not owed a reset.
                os.close(fd)
                service.refusedHeader(client, problem or "no address")
                return
            self.dialIdentified(fd, formatHostPort(*addresses.source), addresses)

        service.identify(skt, identified)


def tcpForwarder(service: TCPListener, engine: TCPEngine | None) -> ITCPForwarder:
    """
    The forwarder of C{service}, picked when it binds: the compiled
    engine's when the root service has one (it is built, and
    C{PORTPROXY_FASTPATH} does not turn it off), else Python's.
    """
    if engine is None:
        return PythonForwarder()
    return EngineForwarder(service, engine)
