import select
import socket
import time

import pytest
from support import ProxyProcess, queueEmpty, udpSocket


@pytest.fixture(params=["fastpath", "python"])
def proxy(request, tmp_path):
    """
    A portproxy twistd process in its own directory, stopped after the
    test: once with the compiled fast paths (where they are built) and once
    with the pure-Python relays, so that both stay tested.
    """
    process = ProxyProcess(tmp_path, fastPath=request.param == "fastpath")
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def accessLinesAtOnce(monkeypatch):
    """
    In-process tests drive fake reactors whose clocks the process's access
    log does not share: there it writes every line at once (its window is
    tested in test_listener.py, and by the twistd processes of the
    end-to-end tests).
    """
    from twistedproxy.listener import accessLog

    monkeypatch.setattr(accessLog, "window", 0)


@pytest.fixture(autouse=True)
def freshAccessState(monkeypatch):
    """
    Every test starts with no run-time blocks, no per-client counts and an
    empty refusal log, as a new process does.
    """
    from twistedproxy import access

    monkeypatch.setattr(access, "blocklist", access.Blocklist())
    monkeypatch.setattr(access, "clientTables", access.ClientTables())
    monkeypatch.setattr(access, "refusalLog", access.RefusalLog())


@pytest.fixture
def recordFarewells(monkeypatch):
    """
    Relays end the clients they cannot serve or turn away over a limit
    through L{ClosingClient}, which needs a real socket: with fake
    transports it only marks the transport C{finished}.
    """
    from twistedproxy.tcp.relay import ClosingClient

    def takeOver(transport, reactor):
        transport.finished = True

    monkeypatch.setattr(ClosingClient, "takeOver", staticmethod(takeOver))


@pytest.fixture
def logged():
    """
    The events logged during the test, in order.
    """
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- the two ways of forwarding -------------------------------------------------
#
# The one place that chooses the implementation a behaviour test runs
# against: tests written once take the fixtures below, and build their
# listeners with the fixtures' methods.


class UDPService:
    """
    A started UDP listener service on loopback, with a target socket and
    clients that are closed with it.

    @ivar service: the listener service.
    @ivar target: the socket the listener forwards to (unless the test
        gave its own target).
    @ivar address: where clients send.
    """

    def __init__(self, forwarding, listener, target, engine: bool) -> None:
        from twistedproxy.udp.listener import UDPListener

        self.target = target
        self.service = UDPListener(listener, forwarding.reactor, forwarding.udpEngine)
        self.service.privilegedStartService()
        self.service.startService()
        assert self.service.forwarder.compiled == engine, forwarding.name
        self.address = self.service.port.socket.getsockname()[:2]
        self.sockets: list = [] if target is None else [target]

    def client(self, host: str = "127.0.0.1") -> socket.socket:
        """
        A new client socket on C{host}, closed with the service.
        """
        skt = udpSocket(host)
        self.sockets.append(skt)
        return skt

    def close(self) -> None:
        if self.service.running:
            self.service.stopService()
        for skt in self.sockets:
            skt.close()


class Forwarding:
    """
    A private epoll reactor (not the global one) that a test iterates
    while it waits.

    @ivar name: the way of forwarding under test, C{"python"} or
        C{"engine"}.
    """

    def __init__(self, name: str) -> None:
        from twisted.internet.epollreactor import EPollReactor

        self.name = name
        self.reactor = EPollReactor()

    def spin(self, done, timeout: float = 5.0, what: str = "condition"):
        """
        Iterate the reactor until C{done()} returns something true, and
        return that; fail saying C{what} was awaited after C{timeout}
        seconds.
        """
        deadline = time.monotonic() + timeout
        while not (result := done()):
            assert time.monotonic() < deadline, f"{what} not met in {timeout}s"
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.01)
        return result

    def spinFor(self, seconds: float) -> None:
        """
        Iterate the reactor for C{seconds}: for tests that must let time
        pass (a timeout, a rate's refill), not wait for a condition.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(min(0.01, max(0.0, deadline - time.monotonic())))

    def closeReactor(self) -> None:
        self.reactor.disconnectAll()
        self.reactor.removeAll()
        self.reactor._poller.close()


class UDPForwarding(Forwarding):
    """
    UDP listeners forwarding their datagrams in Python (C{"python"}) or
    through the compiled engine (C{"engine"}), under a private epoll
    reactor (not the global one) that the test iterates with L{spin}.

    @ivar engine: whether the compiled engine forwards.
    """

    def __init__(self, name: str, monkeypatch) -> None:
        from twistedproxy.udp import engine as udpEngine
        from twistedproxy.udp import relay

        self.engine = name == "engine"
        if self.engine and not udpEngine.available():
            pytest.skip("twistedproxy.udp._engine is not built")
        Forwarding.__init__(self, name)
        # whatever the environment running the tests says
        monkeypatch.setenv("PORTPROXY_FASTPATH", "1" if self.engine else "0")
        #: the engine the root service would own and give the listeners
        self.udpEngine = udpEngine.UDPEngine(self.reactor) if self.engine else None
        self._monkeypatch = monkeypatch
        self._opener = relay.connectedDatagramSocket
        self.services: list[UDPService] = []

    def listen(
        self,
        host: str = "127.0.0.1",
        target=None,
        targetName: str | None = None,
        timeout: float = 30.0,
        engine: bool | None = None,
        **settings,
    ) -> UDPService:
        """
        Start a UDP listener of mapping C{echo} on a free port of C{host}
        with the udp timeout C{timeout} and the other L{Listener}
        C{settings}.  It forwards to C{target} when given, else to a new
        socket on 127.0.0.1 (the service's C{target}), named C{targetName}
        when given (the test's resolver answers for it).  It must use the
        engine as the fixture says, or as C{engine} says when given.
        """
        from fakes import udpListener

        from twistedproxy.model import Target

        targetSocket = None
        if target is None:
            targetSocket = udpSocket()
            host_, port = targetSocket.getsockname()
            target = Target(targetName or host_, port)
        listener = udpListener(
            host, target, timeout, port=0, mapping="echo", **settings
        )
        if engine is None:
            engine = self.engine
        service = UDPService(self, listener, targetSocket, engine)
        self.services.append(service)
        return service

    @property
    def held(self) -> int:
        """
        How many datagrams of a client are held while its session opens.
        """
        if self.engine:
            from twistedproxy.udp._engine import PENDING_DATAGRAMS

            return PENDING_DATAGRAMS
        from twistedproxy.udp.relay import RESOLVING_QUEUE

        return RESOLVING_QUEUE

    def released(self, service, flow) -> bool:
        """
        Whether C{flow} of C{service} ended with its socket closed and
        nothing of it kept by the forwarder.
        """
        if self.engine:
            return service.engine.counters(flow.id) is None
        return flow.port.socket.fileno() == -1

    def failSessionSockets(self, error: OSError | None) -> None:
        """
        Make opening a session's socket fail with C{error} from now on
        (L{None}: succeed again).
        """
        opener = self._opener
        if error is not None:

            def opener(*args, **kwargs):
                raise error

        self._openSessionSocketsWith(opener)

    def wrapSessionSockets(self, wrap) -> None:
        """
        Pass every session socket opened from now on, connected to its
        target, through C{wrap} (which returns it) before the forwarder
        gets it.
        """
        opener = self._opener

        def wrapped(*args, **kwargs):
            return wrap(opener(*args, **kwargs))

        self._openSessionSocketsWith(wrapped)

    def _openSessionSocketsWith(self, opener) -> None:
        from twistedproxy.udp import listener, relay

        # both modules that open session sockets look the name up at call time
        for module in (listener, relay):
            self._monkeypatch.setattr(module, "connectedDatagramSocket", opener)

    def receive(self, skt: socket.socket, timeout: float = 5.0) -> tuple:
        """
        Iterate the reactor until a datagram is at C{skt}; return it and
        its source.
        """
        self.spin(
            lambda: select.select([skt], [], [], 0)[0],
            timeout,
            f"a datagram at {skt.getsockname()}",
        )
        return skt.recvfrom(70000)

    def nothingArrives(self, skt: socket.socket, seconds: float = 0.2) -> None:
        """
        Iterate the reactor for C{seconds} and fail if a datagram arrives
        at C{skt} meanwhile.
        """
        self.spinFor(seconds)
        assert not select.select([skt], [], [], 0)[0], skt.recv(70000)

    def readEmpty(self, service: UDPService, timeout: float = 5.0) -> None:
        """
        Iterate the reactor until every datagram sent to C{service} was
        read from its listening socket.
        """

        self.spin(
            lambda: queueEmpty(service.service.port.socket),
            timeout,
            "the listening socket read empty",
        )

    def close(self) -> None:
        for service in self.services:
            service.close()
        if self.udpEngine is not None:
            self.udpEngine.stop()
        self.closeReactor()


@pytest.fixture(params=["python", "engine"])
def udpForwarding(request, monkeypatch):
    """
    UDP listeners that forward in Python, then through the compiled
    engine: a behaviour test taking this fixture runs against both.
    """
    forwarding = UDPForwarding(request.param, monkeypatch)
    yield forwarding
    forwarding.close()


class TCPService:
    """
    A started TCP listener service on loopback forwarding to a listening
    socket of the test's.

    @ivar service: the listener service.
    @ivar targets: the socket the target listens on.
    @ivar address: where clients connect.
    """

    def __init__(self, forwarding, listener, targets: socket.socket) -> None:
        from twistedproxy.tcp.listener import TCPListener

        self.targets = targets
        self.service = TCPListener(
            listener, forwarding.reactor, backlog=16, engine=forwarding.relay
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.address = (
            self.service.port.getHost().host,
            self.service.port.getHost().port,
        )
        self.sockets: list = [targets]

    def close(self) -> None:
        if self.service.running:
            self.service.stopService()
        for skt in self.sockets:
            skt.close()


class TCPForwarding(Forwarding):
    """
    TCP listeners that relay their connections in Python (C{"python"}) or,
    once connected, through the compiled relay engine (C{"engine"}), under
    a private epoll reactor (not the global one) that the test iterates
    while it reads its sockets.

    @ivar relay: the L{twistedproxy.tcp.engine.TCPEngine} the listeners
        hand their connections to, or L{None}.
    """

    def __init__(self, name: str) -> None:
        from twistedproxy.tcp import engine as tcpEngine

        if name == "engine" and not tcpEngine.available():
            pytest.skip("twistedproxy.tcp._engine is not built")
        Forwarding.__init__(self, name)
        # as while it runs: relays that lose a side with the reactor
        # stopped end as "proxy stopped"
        self.reactor.running = True
        self.relay = tcpEngine.TCPEngine(self.reactor) if name == "engine" else None
        self.services: list[TCPService] = []

    def listen(self, idle: float = 0, **settings) -> TCPService:
        """
        Start a TCP listener of mapping C{web} on a free port of 127.0.0.1
        forwarding to a new listening socket, with the idle timeout
        C{idle} and the other L{Listener} C{settings}.
        """
        from fakes import tcpListener

        from twistedproxy.model import Target, Timeouts

        targets = socket.socket()
        targets.bind(("127.0.0.1", 0))
        targets.listen(16)
        targets.setblocking(False)
        listener = tcpListener(
            port=0,
            target=Target(*targets.getsockname()),
            timeouts=Timeouts(connect=5, idle=idle),
            **settings,
        )
        service = TCPService(self, listener, targets)
        self.services.append(service)
        return service

    def connect(self, service: TCPService) -> tuple:
        """
        Connect a client to C{service} and return it, the target's end of
        its connection and its flow once that is relayed (by the engine,
        for C{"engine"}).
        """
        client = socket.create_connection(service.address, timeout=5)
        client.setblocking(False)
        service.sockets.append(client)
        accepted: list = []

        def relayed():
            if not accepted:
                try:
                    accepted.append(service.targets.accept()[0])
                except BlockingIOError:
                    return None
                accepted[0].setblocking(False)
                service.sockets.append(accepted[0])
            flows = [f for f in service.service.flows.values() if self._relayed(f)]
            return flows and flows[-1]

        flow = self.spin(relayed, what="the connection relayed")
        return client, accepted[0], flow

    def _relayed(self, flow) -> bool:
        from twistedproxy.tcp.engine import EngineFlow

        if self.relay is not None:
            return isinstance(flow, EngineFlow)
        return getattr(flow, "targetTransport", None) is not None

    def _read(self, skt: socket.socket, into: list):
        try:
            data = skt.recv(1 << 20)
        except BlockingIOError:
            return None
        into.append(data)
        return data

    def receive(self, skt: socket.socket, size: int) -> bytes:
        """
        Iterate the reactor until C{size} bytes came at C{skt}; return them.
        """
        chunks: list[bytes] = []

        def enough() -> bool:
            while (got := self._read(skt, chunks)) is not None:
                assert got, f"end of stream after {b''.join(chunks)!r}"
                if sum(map(len, chunks)) >= size:
                    return True
            return False

        self.spin(enough, what=f"{size} bytes")
        return b"".join(chunks)

    def receiveAll(self, skt: socket.socket) -> bytes:
        """
        Iterate the reactor until the end of stream at C{skt}; return what
        came before it.
        """
        chunks: list[bytes] = []

        def ended() -> bool:
            while (got := self._read(skt, chunks)) is not None:
                if not got:
                    return True
            return False

        self.spin(ended, what="the end of stream")
        return b"".join(chunks)

    def assertReset(self, skt: socket.socket) -> None:
        """
        Iterate the reactor until C{skt} is reset (bytes queued before
        may come first); fail on an end of stream.
        """

        def reset() -> bool:
            try:
                while self._read(skt, []) is not None:
                    pass
            except ConnectionResetError:
                return True
            return False

        self.spin(reset, what="a reset")

    def close(self) -> None:
        for service in self.services:
            service.close()
        if self.relay is not None:
            self.relay.stop()
        self.reactor.running = False
        self.closeReactor()


@pytest.fixture(params=["python", "engine"])
def tcpForwarding(request):
    """
    TCP listeners that relay in Python, then through the compiled relay
    engine: a behaviour test taking this fixture runs against both.
    """
    forwarding = TCPForwarding(request.param)
    yield forwarding
    forwarding.close()
