"""
Unit tests for L{twistedproxy.tcp}: the relay's logic with fake transports
and a memory reactor, and the listening socket's disable/enable with a real
loopback socket driven by a memory reactor.
"""

from __future__ import annotations

import errno
import socket

import pytest
from fakes import CLIENT, FakeResolver, Harness, RelayTransport, messages, tcpListener
from support import onFreePort
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import (
    CannotListenError,
    ConnectBindError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from twistedproxy.model import Target, Timeouts
from twistedproxy.tcp import relay as relayModule
from twistedproxy.tcp.listener import DEFAULT_BACKLOG, TCPListener, listenBacklog
from twistedproxy.tcp.relay import FAREWELL_SECONDS, ClosingClient, Relay

pytestmark = pytest.mark.usefixtures("recordFarewells")


def tick(reactor, seconds: float, step: float = 1.0) -> None:
    """
    Advance C{reactor} second by second, as time passes in a real one.
    """
    for _ in range(int(seconds / step)):
        reactor.advance(step)


def test_connectsOnlyAfterTargetAnswers():
    """
    The client is paused from accept until the target connection is made,
    and the target connect uses the listener's target with no second timer.
    """
    h = Harness()
    relay, client = h.accept()
    assert client.producerState == "paused"
    assert h.lastDial()[:2] == ("10.0.0.2", 80)
    assert h.lastDial()[3] is None
    assert list(h.service.flows) == [relay.id]
    _side, target = h.answer()
    assert client.producerState == "producing"
    assert client.noDelay and target.noDelay and client.keepAlive and target.keepAlive


def test_flowControlBothWays():
    """
    Each side's transport is the other side's streaming producer, so a full
    buffer on one side pauses reading on the other.
    """
    h = Harness()
    _relay, client, _side, target = h.connected()
    assert target.producer is client and target.streaming
    assert client.producer is target and client.streaming


def test_halfCloseUnregistersProducer():
    """
    The client's end of stream half-closes the target, which stops being
    paced by the client, and the flow is only over once both sockets are
    closed (the behaviour itself is in test_tcpforwarding.py).
    """
    h = Harness()
    relay, client, side, target = h.connected()
    relay.readConnectionLost()
    assert target.writeClosed
    assert target.producer is None
    assert not client.disconnecting
    side.readConnectionLost()
    assert client.writeClosed
    assert client.disconnecting and target.disconnecting
    side.connectionLost(Failure(ConnectionDone()))
    assert h.service.flows
    relay.connectionLost(Failure(ConnectionDone()))
    assert h.service.flows == {}


def test_idleTimeout():
    """
    A connection with nothing sent either way for idle_timeout is closed,
    no earlier than the timeout after its last byte and no later than a
    quarter timeout after that.
    """
    h = Harness(timeouts=Timeouts(connect=5, idle=100))
    relay, client, side, target = h.connected()
    tick(h.reactor, 60)
    relay.dataReceived(b"x")
    tick(h.reactor, 99)
    assert not client.aborted
    tick(h.reactor, 26)
    assert client.aborted and target.aborted
    with capturedLogs() as events:
        relay.connectionLost(Failure(ConnectionAborted()))
        side.connectionLost(Failure(ConnectionAborted()))
    assert messages(events)[0].endswith("idle timeout")
    assert h.reactor.getDelayedCalls() == []


def test_idleTimeoutCountsBothDirections():
    """
    Traffic from the target alone keeps a connection from going idle.
    """
    h = Harness(timeouts=Timeouts(connect=5, idle=100))
    _relay, client, side, _target = h.connected()
    for _ in range(10):
        tick(h.reactor, 50)
        side.dataReceived(b"tick")
    assert not client.aborted


def test_noIdleTimer():
    """
    With idle_timeout 0 a connected flow has no timer at all.
    """
    h = Harness()
    h.connected()
    assert h.reactor.getDelayedCalls() == []


def test_maxConnectionsRejects():
    """
    A client over max_connections is closed at once through
    L{ClosingClient} (a FIN, not a reset), never dials, and is counted and
    logged as rejected.
    """
    h = Harness(maxConnections=1)
    h.connected()
    with capturedLogs() as events:
        relay, client = h.accept(IPv4Address("TCP", "192.0.2.8", 1234))
    assert client.finished and not client.aborted
    assert len(h.reactor.tcpClients) == 1
    assert h.service.counters.rejected == 1
    assert h.service.active == 1
    assert "rejected 192.0.2.8:1234: max_connections 1 reached" in messages(events)[0]
    relay.connectionLost(Failure(ConnectionAborted()))
    assert h.service.active == 1


def test_connectRefused():
    """
    A refused connect ends the client through L{ClosingClient} (a FIN, not
    a reset) and writes an access line with the mapping, client, target
    and reason.
    """
    h = Harness()
    _relay, client = h.accept()
    with capturedLogs() as events:
        h.refuse()
    assert client.finished and not client.aborted
    [line] = messages(events)
    assert line.startswith("tcp web 192.0.2.7:40000 -> 10.0.0.2:80 ")
    assert line.endswith("connect failed: connection refused")
    assert h.service.flows == {}


def test_connectFailureWithoutDescriptors():
    """
    A connect that cannot even get a socket (out of file descriptors) fails
    the flow with the OS's words.
    """
    h = Harness()
    _relay, client = h.accept()
    with capturedLogs() as events:
        h.lastDial()[2].clientConnectionFailed(
            h.reactor.connectors[-1],
            Failure(ConnectBindError(errno.EMFILE, "Too many open files")),
        )
    assert client.finished
    assert messages(events)[0].endswith("connect failed: too many open files")


def test_connectTimeout():
    """
    A target that does not answer within connect_timeout: the attempt is
    stopped and the client closed with a timeout reason.
    """
    h = Harness(timeouts=Timeouts(connect=2.5))
    _relay, client = h.accept()
    tick(h.reactor, 2.4, 0.1)
    assert not client.finished
    with capturedLogs() as events:
        tick(h.reactor, 0.2, 0.1)
    assert h.reactor.connectors[-1].stoppedConnecting
    assert client.finished and not client.aborted
    assert messages(events)[0].endswith("connect failed: timed out after 2.5s")
    assert h.reactor.getDelayedCalls() == []


def test_closingClientSendsFinThenDropsInput():
    """
    L{ClosingClient} shuts down writing at once (the client reads end of
    stream), drops what the client sent so that closing sends no reset,
    and closes when the client closes its end.
    """
    reactor = MemoryReactorClock()
    proxySide, clientSide = socket.socketpair()
    with clientSide:
        clientSide.sendall(b"sent before the target failed")
        ClosingClient(proxySide.detach(), reactor).start()
        assert clientSide.recv(100) == b""
        [closing] = reactor.getReaders()
        clientSide.sendall(b"more")
        clientSide.shutdown(socket.SHUT_WR)
        closing.doRead()
        assert reactor.getReaders() == [] and reactor.getDelayedCalls() == []
        assert closing.fileno() == -1


def test_closingClientGivesUpAfterItsTime():
    """
    A client that neither closes nor stops sending is closed after
    L{FAREWELL_SECONDS}.
    """
    reactor = MemoryReactorClock()
    proxySide, clientSide = socket.socketpair()
    with clientSide:
        closing = ClosingClient(proxySide.detach(), reactor)
        closing.start()
        reactor.advance(FAREWELL_SECONDS)
        assert reactor.getReaders() == [] and closing.fileno() == -1


def test_closingClientsPastTheirBoundCloseAtOnce(monkeypatch):
    """
    Past L{FAREWELL_CLIENTS} waiting at once, a client still gets its FIN
    but its socket is closed at once, holding no descriptor or timer; one
    that ends frees its place for the next.
    """
    monkeypatch.setattr(relayModule, "FAREWELL_CLIENTS", 2)
    monkeypatch.setattr(ClosingClient, "waiting", 0)
    reactor = MemoryReactorClock()
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        closings = [ClosingClient(p.detach(), reactor) for p, _ in pairs[:3]]
        for closing in closings:
            closing.start()
        assert [c.fileno() >= 0 for c in closings] == [True, True, False]
        assert len(reactor.getDelayedCalls()) == 2 and ClosingClient.waiting == 2
        assert pairs[2][1].recv(100) == b""
        pairs[0][1].close()
        closings[0].doRead()
        late = ClosingClient(pairs[3][0].detach(), reactor)
        late.start()
        assert late.fileno() >= 0 and ClosingClient.waiting == 2
    finally:
        for _, clientSide in pairs:
            clientSide.close()
        reactor.advance(FAREWELL_SECONDS)
    assert ClosingClient.waiting == 0 and reactor.getReaders() == []


def test_lateTargetIsDropped():
    """
    A target connection completing after the relay gave up is closed and
    does not touch the ended flow.
    """
    h = Harness()
    relay, _client = h.accept()
    h.reactor.advance(5)
    relay.connectionLost(Failure(ConnectionAborted()))
    side, target = h.answer()
    assert target.aborted
    side.connectionLost(Failure(ConnectionAborted()))
    assert h.service.flows == {}


def test_hostNameTriesEachAddress():
    """
    A target host name is resolved per connection and each address is
    tried in turn until one answers.
    """
    h = Harness(target=Target("backend.test", 80))
    h.reactor.nameResolver = FakeResolver(
        [IPv6Address("TCP", "::1", 80), IPv4Address("TCP", "127.0.0.1", 80)]
    )
    _relay, client = h.accept()
    assert h.lastDial()[:2] == ("::1", 80)
    h.refuse()
    assert h.lastDial()[:2] == ("127.0.0.1", 80)
    assert not client.finished
    h.answer()
    assert client.producerState == "producing"
    h.accept()
    assert h.reactor.nameResolver.names == ["backend.test", "backend.test"]


def test_hostNameWithoutAddress():
    """
    A name that resolves to nothing fails the connect with a clear reason.
    """
    h = Harness(target=Target("nothing.test", 80))
    h.reactor.nameResolver = FakeResolver([])
    with capturedLogs() as events:
        _relay, client = h.accept()
    assert client.finished and not client.aborted
    assert messages(events)[0].endswith("connect failed: no address for nothing.test")


def test_reconfigureAffectsOnlyNewConnections():
    """
    After reconfigure, new clients dial the new target while an open flow
    keeps its old listener and target.
    """
    h = Harness()
    old, *_ = h.connected()
    h.service.reconfigure(tcpListener(target=Target("10.0.0.9", 81)))
    new, _ = h.accept()
    assert h.lastDial()[:2] == ("10.0.0.9", 81)
    assert old.listener.target == Target("10.0.0.2", 80)
    assert new.listener.target == Target("10.0.0.9", 81)


def test_killWhileConnecting():
    """
    close() during the connect stops the attempt and ends the flow.
    """
    h = Harness()
    relay, client = h.accept()
    relay.close("killed")
    assert h.reactor.connectors[-1].stoppedConnecting
    assert client.aborted
    relay.connectionLost(Failure(ConnectionAborted()))
    assert h.service.flows == {}
    assert h.reactor.getDelayedCalls() == []


def test_proxyStoppingEndsFlowAtFirstLoss():
    """
    When the reactor is stopping, the first side reported lost ends the
    flow with "proxy stopped", without waiting for the other side.
    """
    h = Harness()
    relay, client, side, _target = h.connected()
    h.reactor.running = False
    with capturedLogs() as events:
        side.connectionLost(Failure(ConnectionLost()))
    assert h.service.flows == {}
    assert messages(events)[0].endswith("proxy stopped")
    assert not client.aborted
    relay.connectionLost(Failure(ConnectionLost()))
    assert len(messages(events)) == 1


def test_proxyStoppingWhileConnecting():
    """
    A connect attempt cut by the reactor stopping ends the flow instead of
    trying the next address.
    """
    h = Harness(target=Target("backend.test", 80))
    h.reactor.nameResolver = FakeResolver(
        [IPv6Address("TCP", "::1", 80), IPv4Address("TCP", "127.0.0.1", 80)]
    )
    _relay, _client = h.accept()
    h.reactor.running = False
    h.refuse()
    assert len(h.reactor.tcpClients) == 1
    assert h.service.flows == {}


def test_drainedAfterLastFlow():
    """
    whenDrained fires once the last open flow has ended.
    """
    h = Harness()
    relay, _client, side, _target = h.connected()
    drained = h.service.whenDrained()
    assert not drained.called
    relay.close("killed")
    relay.connectionLost(Failure(ConnectionAborted()))
    side.connectionLost(Failure(ConnectionAborted()))
    assert drained.called


def test_backlogFromSomaxconn(tmp_path):
    """
    The listen backlog is the kernel's somaxconn, or 4096 when that cannot
    be read.
    """
    path = tmp_path / "somaxconn"
    path.write_text("8192\n")
    assert listenBacklog(str(path)) == 8192
    assert listenBacklog(str(tmp_path / "missing")) == DEFAULT_BACKLOG


def test_backlogReadOnce(tmp_path):
    """
    somaxconn is read once, not once per listener: a changed value is seen
    only after C{cache_clear()} (which a reload does).
    """
    path = tmp_path / "somaxconn"
    path.write_text("8192\n")
    assert listenBacklog(str(path)) == 8192
    path.write_text("1024\n")
    assert listenBacklog(str(path)) == 8192
    listenBacklog.cache_clear()
    assert listenBacklog(str(path)) == 1024


# -- the listening socket, real but driven by a memory reactor ----------------


def canConnect(host, port) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(2)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return False
    return True


def boundListener(host="127.0.0.1") -> TCPListener:
    """
    A started listener on a free port of C{host}, named as a map names it:
    not port 0, because a socket bound to port 0 loses its port when a
    disabled listener leaves the listening state (the kernel's
    C{SOCK_BINDPORT_LOCK} is set by an explicit port only).
    """
    reactor = MemoryReactorClock()
    reactor.running = True

    def bind(port: int) -> TCPListener:
        service = TCPListener(tcpListener(host=host, port=port), reactor, backlog=8)
        service.privilegedStartService()
        return service

    service = onFreePort(bind, host=host)
    service.startService()
    return service


def boundPort(service: TCPListener) -> int:
    """
    The port C{service} listens on.
    """
    return service.port.socket.getsockname()[1]


def test_bindListens():
    """
    bind() opens a listening socket with SO_REUSEADDR and the given
    backlog, watched by the reactor.
    """
    service = boundListener()
    try:
        assert service.bound
        skt = service.port.socket
        assert skt.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert service.port.backlog == 8
        assert service.port in service.reactor.readers
        assert canConnect("127.0.0.1", boundPort(service))
    finally:
        service.stopService()


def test_bindFailure():
    """
    A port in use makes bind() raise CannotListenError.
    """
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        service = TCPListener(
            tcpListener(port=busy.getsockname()[1]), MemoryReactorClock()
        )
        with pytest.raises(CannotListenError):
            service.bind()
        assert not service.bound


def test_ipv6IsV6OnlySoBothWildcardsBind():
    """
    An IPv6 listener is IPv6-only, so C{::} and C{0.0.0.0} bind the same
    port side by side.
    """
    reactor = MemoryReactorClock()
    six = TCPListener(tcpListener(host="::", port=0), reactor)
    six.bind()
    try:
        four = TCPListener(tcpListener(host="0.0.0.0", port=boundPort(six)), reactor)
        four.bind()
        four.stopService()
        assert six.port.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    finally:
        six.stopService()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_disableRefusesEnableResumes(host):
    """
    A disabled listener refuses connects (rather than leaving them in the
    backlog) while keeping its port; enable() accepts again on the same
    socket.
    """
    service = boundListener(host)
    port = boundPort(service)
    try:
        skt = service.port.socket
        service.disable()
        assert not service.enabled
        assert service.port not in service.reactor.readers
        assert not canConnect(host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as other, pytest.raises(OSError):
            other.bind((host, port))
        service.enable()
        assert service.enabled
        assert service.port.socket is skt
        assert service.port in service.reactor.readers
        assert canConnect(host, port)
    finally:
        service.stopService()


def test_disableRefusesQueuedConnects():
    """
    Connects waiting in the accept queue when the listener is disabled are
    reset rather than left hanging.
    """
    service = boundListener()
    try:
        waiting = socket.create_connection(("127.0.0.1", boundPort(service)))
        service.disable()
        with waiting:
            waiting.settimeout(2)
            with pytest.raises(ConnectionResetError):
                waiting.send(b"x")
                waiting.recv(1)
    finally:
        service.stopService()


def test_stopWhileDisabledFreesThePort():
    """
    Stopping a disabled listener closes its socket, so the port can be
    bound again.
    """
    service = boundListener()
    port = boundPort(service)
    service.disable()
    service.stopService()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_disabledBeforeBindStaysDisabled():
    """
    A listener disabled before it binds binds without accepting.
    """
    reactor = MemoryReactorClock()

    def bind(port: int) -> TCPListener:
        service = TCPListener(tcpListener(port=port), reactor)
        service.disable()
        service.bind()
        return service

    service = onFreePort(bind)
    try:
        assert not canConnect("127.0.0.1", boundPort(service))
    finally:
        service.stopService()


def test_stopClosesSocketAtOnceFlowsRunOn():
    """
    stopService closes the listening socket in the same turn (the port can
    be bound again at once) while open flows run on.
    """
    service = boundListener()
    relay = Relay(service, CLIENT)
    relay.makeConnection(RelayTransport())
    port = boundPort(service)
    service.stopService()
    assert not service.bound
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))
    assert service.active == 1
    assert not service.whenDrained().called


class _ShortSender:
    """
    A socket whose send takes only part of what it is given, or fails.
    """

    def __init__(self, takes=None, error=None):
        self.takes = takes
        self.error = error

    def send(self, data):
        if self.error is not None:
            raise self.error
        return self.takes


def test_sendHeaderPartialIsAFailure():
    """
    A PROXY header that is not sent whole in one call, or whose send
    fails, is a failure with a reason; a whole one is not.
    """
    from twistedproxy.tcp.relay import sendHeader

    assert sendHeader(_ShortSender(takes=5), b"x" * 5) is None
    assert sendHeader(_ShortSender(takes=3), b"x" * 5) == (
        "cannot send the PROXY header: 3 of 5 bytes sent"
    )
    assert sendHeader(_ShortSender(error=BrokenPipeError(32, "Broken pipe")), b"x") == (
        "cannot send the PROXY header: broken pipe"
    )


def test_proxyHeaderFollowsTheListener():
    """
    The header a flow sends is the listener's client_address version of
    the flow's addresses, and nothing without one.
    """
    from twistedproxy.model import ClientIdentity
    from twistedproxy.proxyprotocol import Addresses
    from twistedproxy.tcp.relay import proxyHeader

    addresses = Addresses(("192.0.2.1", 1000), ("192.0.2.2", 80))
    v1 = tcpListener(identity=ClientIdentity("proxy_protocol_v1"))
    assert proxyHeader(v1, addresses) == b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80\r\n"
    v2 = tcpListener(identity=ClientIdentity("proxy_protocol_v2"))
    assert proxyHeader(v2, addresses)[12:14] == b"\x21\x11"
    assert proxyHeader(tcpListener(), None) == b""
    assert (
        proxyHeader(tcpListener(identity=ClientIdentity("transparent")), addresses)
        == b""
    )
