"""
Tests for L{twistedproxy.tls} and the TLS keys of the map: the ClientHello
reader, server-name matching, the certificate checks of C{config}, what
TLS changes for the relay engine, the access line and the manhole, and the
three TLS relay kinds of L{twistedproxy.tcp} with fake transports and a
memory reactor (test_tcp's harness).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
from certs import Authority
from fakes import (
    CLIENT,
    FakeFlow,
    FakeListener,
    Harness,
    RelayTransport,
    listener,
    messages,
    tcpListener,
)
from OpenSSL import SSL, crypto
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from twistedproxy import tls
from twistedproxy.admin import _clientText
from twistedproxy.config import ConfigError, parseMap
from twistedproxy.model import Target, TLSSettings
from twistedproxy.tcp.relay import (
    RoutingRelay,
    TerminatingRelay,
    TLSTargetSide,
    canHandOff,
)


class CertificateTransport(RelayTransport):
    """
    A client transport whose peer sent the certificate in C{path}.
    """

    def __init__(self, path) -> None:
        RelayTransport.__init__(self)
        self.certificate = crypto.load_certificate(
            crypto.FILETYPE_PEM, Path(path).read_bytes()
        )

    def getPeerCertificate(self):
        return self.certificate


def clientHello(serverName: str | None) -> bytes:
    """
    The first bytes Python's C{ssl} sends as a client asking for
    C{serverName} (none when L{None}).
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=serverName)
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


# -- the ClientHello -------------------------------------------------------------


def test_serverNameOfAClientHello() -> None:
    """
    The server name of a real ClientHello is read, and a ClientHello
    without one reads as L{None}.
    """
    assert tls.clientHelloServerName(clientHello("app.example.com")) == (
        True,
        "app.example.com",
    )
    assert tls.clientHelloServerName(clientHello(None)) == (True, None)


def test_partialClientHelloWaitsForMore() -> None:
    """
    Every proper prefix of a ClientHello asks for more bytes rather than
    failing.
    """
    hello = clientHello("app.example.com")
    for end in range(len(hello)):
        assert tls.clientHelloServerName(hello[:end]) == (False, None)


def test_clientHelloAcrossRecords() -> None:
    """
    A ClientHello split over two TLS records (allowed, rare) is read whole.
    """
    hello = clientHello("split.example")
    body = hello[5:]
    header = hello[:3]
    first, second = body[:40], body[40:]
    records = (
        header
        + len(first).to_bytes(2, "big")
        + first
        + header
        + len(second).to_bytes(2, "big")
        + second
    )
    assert tls.clientHelloServerName(records) == (True, "split.example")


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS handshake"),
        (
            b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
            "the first handshake message is not a ClientHello",
        ),
        (b"\x16\x03\x01\x00\x00", "bad TLS record length"),
        (b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03", "malformed ClientHello"),
    ],
)
def test_notAClientHello(data: bytes, problem: str) -> None:
    """
    Bytes that are not a TLS ClientHello are refused with the reason.
    """
    with pytest.raises(tls.NotClientHello, match=problem):
        tls.clientHelloServerName(data)


# -- names --------------------------------------------------------------------------


def test_nameTable() -> None:
    """
    An exact name wins over a suffix, a longer suffix over a shorter, names
    compare without case or a final dot, and C{*.example.com} covers names
    under example.com at any depth but not example.com itself.
    """
    table = tls.NameTable(
        [
            ("*.example.com", "any"),
            ("www.example.com", "www"),
            ("*.api.example.com", "api"),
        ]
    )
    assert table.match("www.example.com") == "www"
    assert table.match("WWW.Example.COM.") == "www"
    assert table.match("shop.example.com") == "any"
    assert table.match("a.b.example.com") == "any"
    assert table.match("v1.api.example.com") == "api"
    assert table.match("example.com") is None
    assert table.match("badexample.com") is None
    assert table.match(None) is None
    assert not tls.NameTable([])


def test_sniRouterKeepsOneListenerPerTarget() -> None:
    """
    A route's listener settings are the mapping's with the route's target,
    the same object for every client of that route; unmatched names get
    the mapping's own.
    """
    base = listener(
        443,
        tls=TLSSettings(
            sniRoutes=(
                ("a.example", Target("127.0.0.3", 443)),
                ("*.b.example", Target("127.0.0.3", 443)),
            )
        ),
    )
    router = tls.SNIRouter(base)
    routed = router.route("a.example")
    assert routed.target == Target("127.0.0.3", 443)
    assert router.route("x.b.example") is routed
    assert router.route("other.example") is base
    assert router.route(None) is base
    assert routed.accessLineParts == ("tcp web ", " -> 127.0.0.3:443 ")


# -- the map --------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    ca = Authority(tmp_path)
    ca.server = ca.issue("server", "localhost", ("localhost",))
    ca.other = ca.issue("other", "other.example", ("other.example",))
    return ca


def mapOf(body: str, path) -> str:
    """
    A map of one mapping C{m} on line 2 with the keys of C{body} (indented
    as the mapping's keys) from line 5.
    """
    return "mappings:\n  - name: m\n    listen: 8443\n    target: 127.0.0.1:80\n" + body


def errorsOf(text: str, path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parseMap(text, str(path))
    return caught.value.errors


def test_mapReadsTheFiles(tmp_path, pki) -> None:
    """
    tls, target_tls and sni_routes become one TLSSettings per listener,
    with the files' bytes, relative paths taken from the map's directory.
    """
    text = mapOf(
        "    tls:\n"
        "      cert: server.pem\n"
        "      key: server.key\n"
        "      sni:\n"
        "        other.example: {cert: other.pem, key: other.key}\n"
        "      client_ca: test-CA.pem\n"
        "      min_version: 1.3\n"
        "    target_tls: {server_name: backend.internal, ca: test-CA.pem}\n",
        tmp_path,
    )
    proxyMap = parseMap(text, str(tmp_path / "map.yaml"))
    settings = next(proxyMap.listeners()).tls
    terminate = settings.terminate
    assert terminate.default.cert == str(tmp_path / "server.pem")
    assert terminate.default.certPem == (tmp_path / "server.pem").read_bytes()
    assert [name for name, _ in terminate.byName] == ["other.example"]
    assert terminate.clientCAPem == pki.path.read_bytes()
    assert terminate.minVersion == "1.3"
    assert settings.originate.serverName == "backend.internal"
    assert settings.originate.verify is True
    assert proxyMap.warnings == ()


def test_changedFilesChangeTheListener(tmp_path, pki) -> None:
    """
    The same map read after the certificate files changed gives listeners
    that differ, so a reload reconfigures them.
    """
    text = mapOf("    tls: {cert: server.pem, key: server.key}\n", tmp_path)
    before = next(parseMap(text, str(tmp_path / "map.yaml")).listeners())
    again = next(parseMap(text, str(tmp_path / "map.yaml")).listeners())
    pki.issue("server", "localhost", ("localhost",))
    after = next(parseMap(text, str(tmp_path / "map.yaml")).listeners())
    assert before == again
    assert before != after


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "    tls: {cert: missing.pem, key: server.key}\n",
            "map.yaml:5: tls: cannot read certificate {d}/missing.pem: no such file or directory (mapping 'm')",
        ),
        (
            "    tls: {cert: server.pem, key: other.key}\n",
            "map.yaml:5: tls: key {d}/other.key does not match certificate {d}/server.pem (mapping 'm')",
        ),
        (
            "    tls: {cert: server.key, key: server.key}\n",
            "map.yaml:5: tls: {d}/server.key holds no PEM certificate (mapping 'm')",
        ),
        (
            "    tls: {cert: server.pem, key: server.pem}\n",
            "map.yaml:5: tls: {d}/server.pem holds no PEM private key (mapping 'm')",
        ),
        ("    tls: {cert: server.pem}\n", "map.yaml:5: tls: missing key 'key'"),
        (
            "    tls: {cert: server.pem, key: server.key, min_version: 1.1}\n",
            "map.yaml:5: tls.min_version: expected 1.2 or 1.3, got 1.1",
        ),
        (
            "    tls: {cert: server.pem, key: server.key, sni: {'bad name': {cert: server.pem, key: server.key}}}\n",
            "map.yaml:5: tls.sni: 'bad name' is not a host name or *.SUFFIX",
        ),
        (
            "    target_tls: {ca: nowhere.pem}\n",
            "map.yaml:5: target_tls.ca: cannot read CA file {d}/nowhere.pem: no such file or directory (mapping 'm')",
        ),
        (
            "    target_tls: {cert: server.pem}\n",
            "map.yaml:5: target_tls: a client certificate needs both cert and key (missing key)",
        ),
        (
            "    target_tls: false\n",
            "map.yaml:5: target_tls: leave it out to speak plain TCP to the target",
        ),
        (
            "    sni_routes: {a.example: 127.0.0.1:80-81}\n",
            "map.yaml:5: sni_routes.a.example: expected one port, got 80-81",
        ),
        (
            "    sni_routes: []\n",
            "map.yaml:5: sni_routes: expected a mapping of server names (NAME or *.SUFFIX)"
            " to HOST:PORT targets, got a list",
        ),
        (
            "    sni_routes: {a.example: 127.0.0.1:80}\n    target_tls: true\n",
            "map.yaml:5: sni_routes: passes TLS through unchanged, so it cannot be combined"
            " with tls or target_tls",
        ),
        (
            "    proto: [tcp, udp]\n    target_tls: true\n",
            "map.yaml:6: target_tls: TLS is for TCP only, and this mapping has proto udp",
        ),
    ],
)
def test_mapErrors(tmp_path, pki, body, message) -> None:
    """
    Missing, unreadable or mismatched files and misused TLS keys are
    errors at their line, naming the mapping where a file is concerned.
    """
    errors = errorsOf(mapOf(body, tmp_path), tmp_path / "map.yaml")
    assert errors[0] == f"{tmp_path}/" + message.format(d=tmp_path)


def test_mapWarnings(tmp_path, pki) -> None:
    """
    verify: false and a key file that group or others can read are
    warnings of a valid map.
    """
    (tmp_path / "server.key").chmod(0o640)
    text = mapOf(
        "    tls: {cert: server.pem, key: server.key}\n    target_tls: {verify: false}\n",
        tmp_path,
    )
    proxyMap = parseMap(text, str(tmp_path / "map.yaml"))
    assert [w.split(": ", 2)[1:] for w in proxyMap.warnings] == [
        [
            "warning",
            f"tls.key: key {tmp_path}/server.key can be read by group or others"
            " (mode 640); chmod 600 it (mapping 'm')",
        ],
        [
            "warning",
            "target_tls.verify is false: the target's certificate is not checked, so"
            " anyone between the proxy and the target can read and change the traffic"
            " (mapping 'm')",
        ],
    ]


# -- the relay engine, the access line, the manhole ----------------------------------


class IdleTransport:
    """
    A connected transport with nothing buffered, as the relay engine
    wants one.
    """

    connected = True
    socket = object()
    disconnecting = False
    _writeDisconnecting = False
    _writeDisconnected = False
    _aborting = False
    dataBuffer = b""
    _tempDataBuffer: list = []
    TLS = False


def test_engineRefusesTLSTransports() -> None:
    """
    A TLS transport is never handed to the relay engine, although every
    attribute it passes through from its idle TCP transport says it could
    be.
    """
    tcp = IdleTransport()
    wrapper = tls.TLSTransport.__new__(tls.TLSTransport)
    wrapper.transport = tcp
    wrapper.connected = True  # as makeConnection leaves it
    assert canHandOff(tcp)
    assert wrapper.connected and not wrapper.dataBuffer
    assert not canHandOff(wrapper)
    assert tls.isTLSTransport(wrapper) and not tls.isTLSTransport(tcp)


def test_accessLineAndManholeShowThePeer() -> None:
    """
    A flow with a client certificate's subject shows it in its access line
    and in the manhole's client column.
    """
    service = FakeListener(listener(443), Clock())
    flow = FakeFlow(service, 7, "127.0.0.1:5000", bytesIn=3, bytesOut=4)
    flow.peer = "CN=alice,O=Example"
    assert _clientText(flow) == "127.0.0.1:5000 (CN=alice,O=Example)"
    with capturedLogs() as events:
        flow.close("client closed")
    assert formatEvent(events[0]).endswith(
        "in=3 out=4 peer='CN=alice,O=Example' client closed"
    )


def test_failureText() -> None:
    """
    A certificate for another name is told with the name that was wanted.
    """
    from service_identity import VerificationError
    from service_identity.hazmat import DNS_ID, DNSMismatch

    failure = Failure(
        VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("db.internal"))])
    )
    assert tls.isTLSFailure(failure)
    assert (
        tls.failureText(failure)
        == "the target's certificate is not valid for db.internal"
    )


# -- the relay kinds, with fake transports and a memory reactor ---------------------


def test_terminatingRelayDialsAfterTheHandshake(pki) -> None:
    """
    A TLS client is read (its handshake) but the target is dialed only once
    the handshake completed; what came with the handshake's end reaches
    the target first, and the client certificate's subject is the peer.
    """
    h = Harness()
    relay = TerminatingRelay(h.service, CLIENT)
    client = CertificateTransport(pki.server[0])
    relay.makeConnection(client)
    assert client.producerState == "producing"
    assert h.reactor.tcpClients == []
    relay.dataReceived(b"early ")
    relay.handshakeCompleted()
    assert client.producerState == "paused"
    assert relay.peer == "CN=localhost,O=portproxy tests"
    relay.dataReceived(b"bytes")
    _side, target = h.answer()
    assert target.value() == b"early bytes"
    assert client.producerState == "producing"
    assert relay.bytesIn == len(b"early bytes")


def test_terminatingRelayHandshakeFailure() -> None:
    """
    A failed handshake ends the flow with OpenSSL's reason, and the target
    is never dialed.
    """
    h = Harness()
    relay = TerminatingRelay(h.service, CLIENT)
    relay.makeConnection(RelayTransport())
    with capturedLogs() as events:
        relay.connectionLost(
            Failure(
                SSL.Error([("SSL routines", "", "peer did not return a certificate")])
            )
        )
    assert h.reactor.tcpClients == []
    assert messages(events)[-1].endswith(
        "in=0 out=0 tls: peer did not return a certificate"
    )


def test_targetHandshakeFailureIsAFailedConnect() -> None:
    """
    A TLS target whose certificate does not verify fails the dial: the
    client is closed (not reset) and the access line gives the mismatch; until its
    handshake ends, giving up the dial aborts the target connection.
    """
    from service_identity import VerificationError
    from service_identity.hazmat import DNS_ID, DNSMismatch

    h = Harness()
    relay, client = h.accept()
    side = TLSTargetSide(relay)
    target = RelayTransport()
    side.makeConnection(target)
    assert relay.targetTransport is None and client.producerState == "paused"
    with capturedLogs() as events:
        side.connectionLost(
            Failure(
                VerificationError(
                    errors=[DNSMismatch(mismatched_id=DNS_ID("db.internal"))]
                )
            )
        )
        # Closed, not reset: a failed connect ends the client with a FIN.
        assert client.disconnecting and not client.aborted
        relay.connectionLost(Failure(ConnectionAborted()))
    assert messages(events)[-1].endswith(
        "connect failed: tls: the target's certificate is not valid for db.internal"
    )

    relay, client = h.accept()
    side = TLSTargetSide(relay)
    target = RelayTransport()
    side.makeConnection(target)
    relay.close("killed")
    assert target.aborted


def test_targetHandshakeDoneStartsTheRelay() -> None:
    """
    The relay with a TLS target starts when the target's handshake
    completes, not when its TCP connection does.
    """
    h = Harness()
    relay, client = h.accept()
    side = TLSTargetSide(relay)
    target = RelayTransport()
    side.makeConnection(target)
    assert client.producerState == "paused"
    side.handshakeCompleted()
    assert relay.targetTransport is target
    assert client.producerState == "producing"


def routingHarness():
    h = Harness(
        tls=TLSSettings(sniRoutes=(("app.example", Target("10.0.0.3", 443)),)),
        target=Target("10.0.0.9", 443),
    )
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    relay = RoutingRelay(h.service, CLIENT)
    client = RelayTransport()
    client.handle = ours
    relay.makeConnection(client)
    return h, relay, client, theirs


def test_routingRelayPeeksThenDials() -> None:
    """
    The route is chosen from the ClientHello's server name, which stays on
    the socket for the relay that follows; a partial ClientHello is peeked
    at again a little later.
    """
    h, relay, client, theirs = routingHarness()
    assert h.reactor.tcpClients == []
    (peek,) = h.reactor.readers
    hello = clientHello("app.example")
    theirs.sendall(hello[:50])
    peek.doRead()
    assert h.reactor.readers == set() and h.reactor.tcpClients == []
    h.reactor.advance(tls.PEEK_AGAIN)
    theirs.sendall(hello[50:])
    peek.doRead()
    assert h.lastDial()[:2] == ("10.0.0.3", 443)
    assert (
        relay.listener.target == Target("10.0.0.3", 443)
        and relay.serverName == "app.example"
    )
    assert client.handle.recv(65536, socket.MSG_PEEK) == hello
    assert h.reactor.readers == set()


def test_routingRelayRefusesWhatIsNotTLS() -> None:
    """
    A client whose first bytes are not a TLS handshake is closed with the
    reason, and nothing is dialed.
    """
    h, relay, client, theirs = routingHarness()
    (peek,) = h.reactor.readers
    theirs.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with capturedLogs() as events:
        peek.doRead()
        relay.connectionLost(Failure(ConnectionAborted()))
    assert client.aborted and h.reactor.tcpClients == []
    assert messages(events)[-1].endswith("sni_routes: not a TLS handshake")


def test_reloadTurnsTerminationOnAndOff() -> None:
    """
    A reload that adds or removes tls: on a bound listener changes the
    factory of its port, so clients accepted from then on get TLS or not.
    """
    from twisted.internet.testing import MemoryReactorClock

    from twistedproxy.model import KeyPair, ServerTLS
    from twistedproxy.tcp.listener import RelayFactory, TCPListener

    plain = tcpListener(port=0)
    terminating = replace(
        plain, tls=TLSSettings(terminate=ServerTLS(KeyPair("c.pem", "k.pem")))
    )
    service = TCPListener(plain, MemoryReactorClock())
    service.bind()
    try:
        assert isinstance(service.port.factory, RelayFactory)
        service.reconfigure(terminating)
        assert tls.isTLSTransport(service.port.factory.buildProtocol(CLIENT))
        assert service.port.factory.service is service
        service.reconfigure(plain)
        assert isinstance(service.port.factory, RelayFactory)
    finally:
        service.stopService()
