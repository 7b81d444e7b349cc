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
from twistedproxy.tcp.engine import AccessTag, EngineFlow, TCPEngine, acceptClients
from twistedproxy.tcp.relay import proxyHeader, refuseDescriptor

#: accept() errors that say the process or the system is out of file
#: descriptors.
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)

if TYPE_CHECKING:
    from twistedproxy.model import Listener
    from twistedproxy.tcp.listener import ListeningPort, TCPListener
    from twistedproxy.tcp.relay import Relay


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
        self._access: AccessTag | None = None

    def accessTag(self) -> AccessTag:
        """
        The L{AccessTag} of the listener's current L{Listener}, one object
        for as long as it stays the same (the engine groups the flows that
        end together by it).
        """
        listener = self.service.listener
        tag = self._access
        if tag is None or tag[1] is not listener:
            head, arrow = listener.accessLineParts
            tag = self._access = (self.service, listener, head, arrow)
        return tag

    def acceptClients(self, port: ListeningPort) -> None:
        """
        Accept clients.  While the target is an address, the waiting
        clients are accepted in one call of the engine and go to
        L{EngineFlow}s and then to the engine with no Twisted transport or
        protocol built for them: all of them at once (L{dialBatch}) when
        L{batches} says so, else each alone (L{dial}; a client of TLS the
        TLS engine terminates: to a
        L{twistedproxy.tcp.tlsengine.TLSDial}).  Otherwise (and always
        for SNI routing and TLS in Python, whose client speaks first)
        Twisted's own accept builds a L{Relay}.
        """
        service = self.service
        if not service.targetIsAddress or (
            service.listener.tls and not service.tlsEngineApplies()
        ):
            tcp.Port.doRead(port)
            return
        # Bare descriptors, already non-blocking, and the clients'
        # addresses already written as the access line wants them: the
        # clients' sockets go to the engine without a Python socket
        # object ever being built.
        clients, error = acceptClients(port.socket.fileno(), port.numberAccepts)
        if error in _OUT_OF_DESCRIPTORS and clients:
            # The batch took the last descriptors, and each client needs
            # one more for its target: half of them are closed at once so
            # that the other half can be served.
            kept = len(clients) // 2
            for clientFd, client in clients[kept:]:
                os.close(clientFd)
                port.shed(client)
            clients = clients[:kept]
        if clients:
            if self.batches():
                self.dialBatch(clients)
            else:
                for clientFd, client in clients:
                    self.dial(clientFd, client)
        if error:
            # Out of descriptors or memory, or worse: Twisted's accept
            # knows how to shed the client and log it.
            tcp.Port.doRead(port)
            return
        # Scaled as Twisted's own accept loop does.
        accepted = len(clients)
        if accepted == port.numberAccepts:
            port.numberAccepts += 20
        else:
            port.numberAccepts = max(1, accepted)

    def batches(self) -> bool:
        """
        Whether this listener's clients are admitted and dialed a batch at
        a time (L{dialBatch}): unless its TLS is terminated (by the TLS
        engine), it reads a PROXY header from its clients, its targets see
        the client's own address (C{client_address: transparent}) or it
        sends a PROXY header but listens on every address (which one the
        client reached takes a system call per client).
        """
        listener = self.service.listener
        if listener.tls is not None:
            return False
        identity = listener.identity
        if not identity:
            return True
        return (
            not identity.acceptProxyProtocol
            and not identity.transparent
            and listener.host not in (ANY_IPV4, ANY_IPV6)
        )

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
            self.dialIdentified(clientFd, client, knownAddresses(listener, client))
            return
        self.dialIdentified(clientFd, client, None)

    def dialBatch(self, clients: list[tuple[int, str]]) -> None:
        """
        Admit the accepted C{clients} (each its bare non-blocking
        descriptor and its C{host:port}), as L{dial} would one by one,
        and dial the target, an address, for all the admitted ones in one
        call of the engine (L{TCPEngine.dialFlows}).  See L{batches}.
        """
        service = self.service
        engine = self.engine
        listener = service.listener
        started = service.reactor.seconds()
        accepted = EngineFlow.accepted
        flows: list[EngineFlow] = []
        clientFds: list[int] = []
        admitted = service.admitCount(len(clients))
        if admitted is None:
            # A rule reads the client's address: each is admitted, and
            # counted, before the next is asked about.
            for clientFd, client in clients:
                refusal = service.admit(hostOf(client))
                if refusal is not None:
                    refuseDescriptor(clientFd, refusal, service.reactor)
                    service.rejected(client, refusal)
                    continue
                flow = accepted(service, engine, clientFd, client, started)
                service.flowStarted(flow)
                flows.append(flow)
                clientFds.append(clientFd)
        else:
            for clientFd, client in clients[:admitted]:
                flows.append(accepted(service, engine, clientFd, client, started))
                clientFds.append(clientFd)
            service.flowsStarted(flows)
            for clientFd, client in clients[admitted:]:
                # The listener is full now: admit() says so in its words.
                refusal = service.admit(hostOf(client)) or (
                    f"max_connections {listener.maxConnections} reached"
                )
                refuseDescriptor(clientFd, refusal, service.reactor)
                service.rejected(client, refusal)
        if not flows:
            return
        headers = None
        if listener.identity.proxyProtocolVersion:
            headers = []
            for flow in flows:
                flow.addresses = knownAddresses(listener, flow.client)
                headers.append(proxyHeader(listener, flow.addresses))
        engine.dialFlows(flows, clientFds, headers, self.accessTag())

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


def knownAddresses(listener: Listener, client: str) -> Addresses:
    """
    The addresses of C{client} (C{host:port}) of a C{listener} that
    listens on one address: both ends are known without asking the
    socket.
    """
    host, _, port = client.rpartition(":")
    return Addresses((host.strip("[]"), int(port)), (listener.host, listener.port))


def tcpForwarder(service: TCPListener, engine: TCPEngine | None) -> ITCPForwarder:
    """
    The forwarder of C{service}, picked when it binds: the compiled
    engine's when the root service has one (it is built, and
    C{PORTPROXY_FASTPATH} does not turn it off), else Python's.
    """
    if engine is None:
        return PythonForwarder()
    return EngineForwarder(service, engine)
