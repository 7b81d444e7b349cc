"""
Tests for L{twistedproxy.control}: the AMP control socket's commands, the
lease a connection holds on what it published, and how published
listeners sit beside the map's (overlaps, reload, the manhole), with fake
listeners and an in-memory connection.
"""

import io
import os
import socket
from contextlib import redirect_stdout

import pytest
from test_service import FakeListener, listener, makeProxy, proxyMap, reload
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient

from twistedproxy.admin import Console
from twistedproxy.control import (
    ControlProtocol,
    ControlService,
    Publish,
    Unpublish,
    adoptSocket,
    requestedListener,
)
from twistedproxy.model import TCP, UDP, Control, ProxyMap


@pytest.fixture(autouse=True)
def cleanFakes():
    FakeListener.busy = set()
    FakeListener.stopping = None


def startedProxy(*listeners):
    proxy, maps = makeProxy(proxyMap(*listeners))
    proxy.privilegedStartService()
    proxy.startService()
    return proxy, maps


class Client:
    """
    An AMP client connected in memory to a L{ControlProtocol} of C{proxy}.
    """

    def __init__(self, proxy):
        self.proxy = proxy

        def server() -> ControlProtocol:
            return ControlProtocol(proxy)

        self.client, self.server, self.pump = connectedServerAndClient(server, amp.AMP)
        self.server.factory = type("F", (), {"connections": set()})()

    def call(self, command, **arguments):
        results = []
        self.client.callRemote(command, **arguments).addBoth(results.append)
        self.pump.flush()
        assert results, "no answer"
        return results[0]

    def publish(
        self, proto="tcp", host="127.0.0.1", port=8080, target="198.18.0.2", to=80
    ):
        return self.call(
            Publish,
            proto=proto,
            host_ip=host,
            host_port=port,
            container_ip=target,
            container_port=to,
        )

    def close(self):
        self.client.transport.loseConnection()
        self.pump.flush()


def refusal(result) -> str:
    """
    The text of a refused command's error.
    """
    assert not isinstance(result, dict), result
    return result.value.args[0] if result.value.args else str(result.value)


def test_publishStartsANamedListener():
    """
    Publish starts a listener for the requested address and target, named
    C{@proto-host:port}, and answers that name.
    """
    proxy, _ = startedProxy()
    client = Client(proxy)
    assert client.publish() == {"name": "@tcp-127.0.0.1:8080"}
    service = proxy.listeners[(TCP, "127.0.0.1", 8080)]
    assert service.running and service.bound
    assert (
        str(service.listener)
        == "tcp 127.0.0.1:8080 -> 198.18.0.2:80 [@tcp-127.0.0.1:8080]"
    )
    assert proxy.published == {(TCP, "127.0.0.1", 8080): client.server}


def test_connectionLostEndsTheLease():
    """
    When the connection that published mappings closes, each of them is
    stopped and forgotten.
    """
    proxy, _ = startedProxy()
    client = Client(proxy)
    client.publish(port=8080)
    client.publish(proto="udp", port=8080)
    service = proxy.listeners[(TCP, "127.0.0.1", 8080)]
    client.close()
    assert proxy.published == {}
    assert proxy.listeners == {}
    assert not service.running


def test_unpublishByName():
    """
    Unpublish stops one mapping of the connection and leaves its others.
    """
    proxy, _ = startedProxy()
    client = Client(proxy)
    client.publish(port=8080)
    client.publish(port=8081)
    assert client.call(Unpublish, name="@tcp-127.0.0.1:8080") == {}
    assert list(proxy.published) == [(TCP, "127.0.0.1", 8081)]


def test_unpublishOnlyWhatThisConnectionPublished():
    """
    A connection cannot unpublish another connection's mapping.
    """
    proxy, _ = startedProxy()
    owner, other = Client(proxy), Client(proxy)
    owner.publish()
    result = other.call(Unpublish, name="@tcp-127.0.0.1:8080")
    assert refusal(result) == (
        "this connection has published no mapping named '@tcp-127.0.0.1:8080'"
    )
    assert list(proxy.published) == [(TCP, "127.0.0.1", 8080)]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            {"proto": "sctp"},
            "protocol 'sctp' is not supported by portproxy (only tcp and udp)",
        ),
        ({"host": "localhost"}, "host address 'localhost' is not an IP address"),
        ({"port": 0}, "host port 0 is out of range (1-65535)"),
        ({"to": 70000}, "container port 70000 is out of range (1-65535)"),
        ({"target": "0.0.0.0"}, "container address 0.0.0.0 is the wildcard address"),
    ],
)
def test_badRequestsRefused(arguments, message):
    """
    A request that cannot be a mapping is refused with a sentence saying
    what is wrong, and nothing starts.
    """
    proxy, _ = startedProxy()
    result = Client(proxy).publish(**arguments)
    assert refusal(result) == message
    assert proxy.listeners == {}


def test_overlappingTheMapRefused():
    """
    A published listener that overlaps one of the map (a wildcard over
    its address) is refused, naming the map's mapping and line.
    """
    proxy, _ = startedProxy(listener(8080, name="web"))
    result = Client(proxy).publish(host="0.0.0.0", port=8080)
    assert refusal(result) == (
        "cannot listen on tcp 0.0.0.0:8080 for mapping '@tcp-0.0.0.0:8080': it overlaps"
        " tcp 127.0.0.1:8080 of mapping 'web' (map.yaml:8080)"
    )
    assert list(proxy.listeners) == [(TCP, "127.0.0.1", 8080)]


def test_overlappingAnotherPublishedRefused():
    """
    Two published listeners may not overlap either, whichever connection
    published them; another protocol on the same port is fine.
    """
    proxy, _ = startedProxy()
    Client(proxy).publish(host="127.0.0.1", port=8080)
    other = Client(proxy)
    assert refusal(other.publish(host="0.0.0.0", port=8080)) == (
        "cannot listen on tcp 0.0.0.0:8080 for mapping '@tcp-0.0.0.0:8080': it overlaps"
        " tcp 127.0.0.1:8080, published through the control socket as"
        " '@tcp-127.0.0.1:8080'"
    )
    assert other.publish(proto="udp", host="0.0.0.0", port=8080) == {
        "name": "@udp-0.0.0.0:8080"
    }


def test_bindFailureRefused():
    """
    A port that cannot be bound is refused with the system's reason.
    """
    FakeListener.busy = {8080}
    proxy, _ = startedProxy()
    assert refusal(Client(proxy).publish()) == (
        "cannot listen on tcp 127.0.0.1:8080 for mapping '@tcp-127.0.0.1:8080':"
        " address already in use"
    )
    assert proxy.published == {}


def test_reloadLeavesPublishedAlone():
    """
    A reload of the map neither stops nor counts the published listeners.
    """
    proxy, maps = startedProxy(listener(1))
    Client(proxy).publish(port=8080)
    maps.next = proxyMap(listener(2))
    summary = reload(proxy)
    assert "added 1, removed 1, changed 0, unchanged 0, failed 0" in summary
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 2), (TCP, "127.0.0.1", 8080)}
    assert proxy.listeners[(TCP, "127.0.0.1", 8080)].running


def test_reloadAddingAnOverlapFails():
    """
    A reload that adds a map listener overlapping a published one reports
    it as failed, with the map line and the published mapping's name, and
    applies the rest.
    """
    proxy, maps = startedProxy()
    Client(proxy).publish(host="127.0.0.1", port=8080)
    maps.next = proxyMap(listener(8080, name="web", host="0.0.0.0"), listener(9))
    summary = reload(proxy)
    assert summary.endswith(
        "added 1, removed 0, changed 0, unchanged 0, failed 1 (map.yaml:8080: cannot"
        " listen on tcp 0.0.0.0:8080 for mapping 'web': it overlaps tcp"
        " 127.0.0.1:8080, published through the control socket as"
        " '@tcp-127.0.0.1:8080')"
    )
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 9), (TCP, "127.0.0.1", 8080)}


def test_manholeShowsPublishedMappings(monkeypatch):
    """
    status() lists published listeners after the map's, marked by the
    '@' of their names and a legend line; disable() takes their names.
    """
    # status() asks for a UDP listener's drop count; these fakes have none.
    monkeypatch.setattr(FakeListener, "proto", TCP, raising=False)
    proxy, _ = startedProxy(listener(1, name="web"))
    Client(proxy).publish(proto="udp", port=5353, to=53)
    out = io.StringIO()
    console = Console(proxy, out.write)
    with redirect_stdout(out):
        console.status()
        console.disable("@udp-127.0.0.1:5353")
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("web ")
    assert lines[2].split()[:4] == [
        "@udp-127.0.0.1:5353",
        "udp",
        "127.0.0.1:5353",
        "198.18.0.2:53",
    ]
    assert lines[3] == "@name: published through the control socket (1)"
    assert (
        lines[4]
        == "@udp-127.0.0.1:5353: disabled, not accepting new connections or sessions"
    )
    assert not proxy.listeners[(UDP, "127.0.0.1", 5353)].enabled


def test_requestedListenerNormalizesAddresses():
    """
    Addresses are normalized as the map normalizes them, so that one
    address written two ways is one listener.
    """
    result = requestedListener("udp", "::0001", 53, "fd00::0002", 5353)
    assert result.key == (UDP, "::1", 53)
    assert (result.mapping, str(result.target)) == ("@udp-[::1]:53", "[fd00::2]:5353")


def test_adoptSocketChecksTheAddress():
    """
    A passed socket is taken only when it is of the protocol and bound to
    the address asked for; otherwise it is closed and refused.
    """
    good = socket.socket()
    good.bind(("127.0.0.1", 0))
    port = good.getsockname()[1]
    adopted = adoptSocket(
        os.dup(good.fileno()),
        requestedListener("tcp", "127.0.0.1", port, "127.0.0.2", 1),
    )
    assert adopted.getsockname() == ("127.0.0.1", port)
    adopted.close()
    fd = os.dup(good.fileno())
    with pytest.raises(Exception) as raised:
        adoptSocket(fd, requestedListener("udp", "127.0.0.1", port, "127.0.0.2", 1))
    assert (
        str(raised.value)
        == f"the passed socket is not a udp socket bound to 127.0.0.1:{port}"
    )
    with pytest.raises(OSError):
        os.fstat(fd)
    good.close()


def test_controlServiceTakesOverAStaleSocket(tmp_path):
    """
    The control socket binds over a socket file nobody listens on (a
    crashed daemon's), and refuses one that a live process listens on.
    """
    path = str(tmp_path / "run" / "ctl.sock")
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    reactor = MemoryReactorClock()
    ControlService(Control(socket=path, mode=0o600), None, reactor).bind()
    assert reactor.unixServers[0][0] == path
    assert reactor.unixServers[0][3] == 0o600
    live = socket.socket(socket.AF_UNIX)
    live.bind(path + "2")
    live.listen()
    try:
        with pytest.raises(Exception) as raised:
            ControlService(Control(socket=path + "2"), None, reactor).bind()
        assert "another process listens on it" in str(raised.value)
    finally:
        live.close()


def test_reloadOpensMovesAndClosesTheControlSocket(tmp_path):
    """
    A reload that adds a control section opens the socket, one that
    changes it opens the new one keeping published mappings, and one that
    removes it closes every connection, which unpublishes their mappings.
    """
    proxy, maps = startedProxy()
    first = Control(socket=str(tmp_path / "a.sock"))
    maps.next = ProxyMap("map.yaml", control=first)
    reload(proxy)
    assert proxy.control.settings == first
    client = Client(proxy)
    proxy.control.factory.connections.add(client.server)
    client.server.factory = proxy.control.factory
    client.publish()
    maps.next = ProxyMap("map.yaml", control=Control(socket=str(tmp_path / "b.sock")))
    reload(proxy)
    assert proxy.control.settings.socket.endswith("b.sock")
    assert list(proxy.published) == [(TCP, "127.0.0.1", 8080)]
    moved = proxy.control
    moved.factory.connections.add(client.server)
    maps.next = ProxyMap("map.yaml")
    reload(proxy)
    client.pump.flush()
    assert proxy.control is None
    assert proxy.published == {}
