import select
import socket
import time

import pytest
from support import ProxyProcess, queueEmpty


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
        from twistedproxy.udp import UDPListener

        self.target = target
        self.service = UDPListener(listener, forwarding.reactor)
        self.service.privilegedStartService()
        self.service.startService()
        assert (self.service.engine is not None) == engine, forwarding.name
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


def udpSocket(
    host: str = "127.0.0.1", timeout: float = 5.0, address: tuple | None = None
) -> socket.socket:
    """
    A UDP socket bound to C{address}, or to a free port of C{host}; reads
    time out after C{timeout} seconds.
    """
    address = address or (host, 0)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    skt = socket.socket(family, socket.SOCK_DGRAM)
    skt.bind(address)
    skt.settimeout(timeout)
    return skt


class UDPForwarding:
    """
    UDP listeners forwarding their datagrams in Python (C{"python"}) or
    through the compiled engine (C{"engine"}), under a private epoll
    reactor (not the global one) that the test iterates with L{spin}.

    @ivar name: C{"python"} or C{"engine"}.
    @ivar engine: whether the compiled engine forwards.
    """

    def __init__(self, name: str, monkeypatch) -> None:
        from twisted.internet.epollreactor import EPollReactor

        from twistedproxy import fastudp, udp

        self.name = name
        self.engine = name == "engine"
        if self.engine and not fastudp.available():
            pytest.skip("twistedproxy._fastudp is not built")
        # whatever the environment running the tests says
        monkeypatch.setenv("PORTPROXY_FASTPATH", "1" if self.engine else "0")
        self._monkeypatch = monkeypatch
        self._opener = udp.connectedDatagramSocket
        self.reactor = EPollReactor()
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
            from twistedproxy._fastudp import PENDING_DATAGRAMS

            return PENDING_DATAGRAMS
        from twistedproxy.udp import RESOLVING_QUEUE

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
        from twistedproxy import udp

        if error is None:
            self._monkeypatch.setattr(udp, "connectedDatagramSocket", self._opener)
            return

        def failing(*args, **kwargs):
            raise error

        self._monkeypatch.setattr(udp, "connectedDatagramSocket", failing)

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
            self.reactor.doIteration(0.02)
        return result

    def spinFor(self, seconds: float) -> None:
        """
        Iterate the reactor for C{seconds}: for tests that must let time
        pass (a timeout, a rate's refill), not wait for a condition.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(min(0.02, max(0.0, deadline - time.monotonic())))

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
        from twistedproxy import fastudp

        for service in self.services:
            service.close()
        engine = fastudp._engines.pop(id(self.reactor), None)
        if engine is not None:
            engine.stop()
        self.reactor.removeAll()
        self.reactor._poller.close()


@pytest.fixture(params=["python", "engine"])
def udpForwarding(request, monkeypatch):
    """
    UDP listeners that forward in Python, then through the compiled
    engine: a behaviour test taking this fixture runs against both.
    """
    forwarding = UDPForwarding(request.param, monkeypatch)
    yield forwarding
    forwarding.close()
