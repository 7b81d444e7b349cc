"""
End-to-end tests of TLS: a real twistd, certificates made by the test, and
real clients (C{openssl s_client}, C{curl}, Python's C{ssl}) on loopback.
Each test runs on the compiled fast paths and on the pure-Python path (the
C{proxy} fixture).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from certs import Authority, TLSEchoServer, peerCommonName, tlsConnect
from support import (
    ProxyProcess,
    TCPEchoServer,
    freePort,
    proxyEnvironment,
    readAll,
    roundTrip,
    turnedAway,
)

from twistedproxy.tcp import engine as fastrelay
from twistedproxy.tcp import tlsengine


@pytest.fixture
def pki(tmp_path):
    """
    A CA with a server certificate for localhost and 127.0.0.1, one for
    another name, and a client certificate; and a second CA the proxy
    does not trust.
    """
    ca = Authority(tmp_path / "pki")
    ca.server = ca.issue("server", "localhost", ("localhost", "127.0.0.1"))
    ca.wrong = ca.issue("wrong", "wrong.example", ("wrong.example",))
    ca.alice = ca.issue("alice", "alice", client=True)
    ca.stranger = Authority(tmp_path / "other", "other CA")
    ca.mallory = ca.stranger.issue("mallory", "mallory", client=True)
    return ca


def _closedWithNothing(conn: socket.socket) -> bool:
    """
    Whether the proxy closed C{conn} (a FIN, or a reset when what the
    client sent was left unread) without sending a byte.
    """
    try:
        return readAll(conn) == b""
    except ConnectionResetError:
        return True


def _terminating(port, target, pki, extra=""):
    cert, key = pki.server
    return f"""
mappings:
  - name: secure
    listen: 127.0.0.1:{port}
    target: 127.0.0.1:{target}
    tls:
      cert: {cert}
      key: {key}
{extra}"""


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over tls\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_terminateWithRealClients(proxy, pki) -> None:
    """
    A mapping with tls: serves Python's ssl, openssl s_client and curl
    with the map's certificate, and relays their cleartext to a plain
    target.
    """
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    with TCPEchoServer() as echo:
        echoPort, httpPort = freePort(), freePort()
        proxy.start(
            _terminating(echoPort, echo.port, pki)
            + f"""
  - name: web
    listen: 127.0.0.1:{httpPort}
    target: 127.0.0.1:{http.server_address[1]}
    tls: {{cert: {pki.server[0]}, key: {pki.server[1]}, min_version: 1.3}}
"""
        )
        with tlsConnect(echoPort, "localhost", pki.path) as conn:
            assert peerCommonName(conn) == "localhost"
            assert roundTrip(conn, b"x" * 100000) == b"x" * 100000

        # s_client ends when the server closes: the target answers an
        # HTTP/1.0 request and closes, and the proxy sends close_notify.
        sClient = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{httpPort}",
                "-servername",
                "localhost",
                "-CAfile",
                str(pki.path),
                "-verify_return_error",
                "-quiet",
            ],
            input=b"GET / HTTP/1.0\r\n\r\n",
            capture_output=True,
            timeout=20,
        )
        assert sClient.stdout.endswith(b"\r\n\r\nhello over tls\n"), sClient.stderr

        curl = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                str(pki.path),
                f"https://localhost:{httpPort}/",
            ],
            capture_output=True,
            timeout=20,
        )
        assert curl.stdout == b"hello over tls\n", curl.stderr
        # min_version: 1.3 refuses a client that offers at most TLS 1.2.
        old = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                str(pki.path),
                "--tls-max",
                "1.2",
                f"https://localhost:{httpPort}/",
            ],
            capture_output=True,
            timeout=20,
        )
        assert old.returncode != 0
        proxy.waitFor(
            r"tcp secure 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ \S+ in=100000 out=100000 client closed"
        )
        proxy.waitFor(
            r"tcp web 127\.0\.0\.1:\d+ -> \S+ \S+ in=0 out=0 tls: unsupported protocol"
        )
    http.shutdown()


def test_overLimitClosedCleanly(proxy, pki) -> None:
    """
    A client of a TLS-terminating listener over max_connections is closed
    before any handshake with a clean end of stream (not a reset), as a
    plain TCP client is, and counted as rejected.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(_terminating(port, echo.port, pki, "    max_connections: 1\n"))
        with tlsConnect(port, "localhost", pki.path) as held:
            assert roundTrip(held, b"in") == b"in"
            assert turnedAway(port) == "end of stream"
        proxy.waitFor(
            r"tcp secure rejected 127\.0\.0\.1:\d+: max_connections 1 reached"
        )


def test_originate(proxy, pki) -> None:
    """
    target_tls: plain clients reach a TLS target whose certificate is
    valid for the name it is reached by; a certificate for another name
    closes the client, and the access line names the target and the
    mismatch; verify: false accepts it.
    """
    with TLSEchoServer(*pki.server) as good, TLSEchoServer(*pki.wrong) as wrong:
        goodPort, wrongPort, unverifiedPort = freePort(), freePort(), freePort()
        proxy.start(f"""
mappings:
  - name: good
    listen: 127.0.0.1:{goodPort}
    target: localhost:{good.port}
    target_tls: {{ca: {pki.path}}}
  - name: wrong
    listen: 127.0.0.1:{wrongPort}
    target: 127.0.0.1:{wrong.port}
    target_tls: {{ca: {pki.path}}}
  - name: unverified
    listen: 127.0.0.1:{unverifiedPort}
    target: 127.0.0.1:{wrong.port}
    target_tls: {{verify: false}}
""")
        proxy.waitFor(r"warning: target_tls.verify is false")
        with socket.create_connection(("127.0.0.1", goodPort), timeout=10) as conn:
            assert roundTrip(conn, b"y" * 200000) == b"y" * 200000
            conn.shutdown(socket.SHUT_WR)
            assert readAll(conn) == b""
        with socket.create_connection(("127.0.0.1", wrongPort), timeout=10) as conn:
            conn.sendall(b"secret")
            assert _closedWithNothing(conn)
        proxy.waitFor(
            rf"tcp wrong 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{wrong.port} \S+ in=0 out=0 "
            r"connect failed: tls: the target's certificate is not valid for 127\.0\.0\.1"
        )
        with socket.create_connection(
            ("127.0.0.1", unverifiedPort), timeout=10
        ) as conn:
            assert roundTrip(conn, b"z" * 1000) == b"z" * 1000
        proxy.waitFor(
            r"tcp good 127\.0\.0\.1:\d+ -> localhost:\d+ \S+ in=200000 out=200000 client closed"
        )


def test_originateWithClientCertificate(proxy, pki) -> None:
    """
    target_tls with cert and key presents the proxy's client certificate
    to a target that requires one.
    """
    with TLSEchoServer(*pki.server, clientCA=pki.path) as target:
        port = freePort()
        proxy.start(f"""
mappings:
  - listen: 127.0.0.1:{port}
    target: 127.0.0.1:{target.port}
    target_tls: {{ca: {pki.path}, server_name: localhost, cert: {pki.alice[0]}, key: {pki.alice[1]}}}
""")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert roundTrip(conn, b"mtls") == b"mtls"
        assert target.clients[-1]["commonName"] == "alice"


def test_mutualTLS(proxy, pki) -> None:
    """
    With client_ca, a client certificate from that CA is accepted and its
    subject is in the access line; no certificate, or one from another
    CA, fails the handshake and the target is never dialed.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            _terminating(port, echo.port, pki, f"      client_ca: {pki.path}\n")
        )
        with tlsConnect(port, "localhost", pki.path, client=pki.alice) as conn:
            assert roundTrip(conn, b"hi alice") == b"hi alice"
        proxy.waitFor(r"in=8 out=8 peer='CN=alice,O=portproxy tests' client closed")
        assert echo.accepted == 1
        for client in (None, pki.mallory):
            with (
                pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)),
                tlsConnect(port, "localhost", pki.path, client=client) as conn,
            ):
                # TLS 1.3: the server's verdict on the client's
                # certificate arrives after the client's handshake.
                conn.sendall(b"let me in")
                conn.recv(100)
        proxy.waitFor(r"(?s)in=0 out=0 tls: .*in=0 out=0 tls: ")
        assert echo.accepted == 1


def test_sniRoutes(proxy, pki) -> None:
    """
    sni_routes sends each client, unchanged, to the target of its server
    name: an exact name, a *.suffix, and the mapping's target for other
    names and for none.
    """
    app = pki.issue("app", "app.example", ("app.example",))
    api = pki.issue("api", "v1.api.example", ("v1.api.example",))
    with (
        TLSEchoServer(*app) as appTarget,
        TLSEchoServer(*api) as apiTarget,
        TLSEchoServer(*pki.server) as fallback,
    ):
        port = freePort()
        proxy.start(f"""
mappings:
  - name: edge
    listen: 127.0.0.1:{port}
    target: 127.0.0.1:{fallback.port}
    sni_routes:
      app.example: 127.0.0.1:{appTarget.port}
      "*.api.example": 127.0.0.1:{apiTarget.port}
""")
        for name, target, common in (
            ("app.example", appTarget, "app.example"),
            ("v1.api.example", apiTarget, "v1.api.example"),
            ("localhost", fallback, "localhost"),
        ):
            with tlsConnect(port, name, pki.path) as conn:
                assert peerCommonName(conn) == common
                assert roundTrip(conn, b"r" * 300000) == b"r" * 300000
            proxy.waitFor(rf"tcp edge 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{target.port} ")
        # No server name at all (an IP address is not sent as SNI).
        context = ssl.create_default_context(cafile=str(pki.path))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            assert peerCommonName(conn) == "localhost"
        assert fallback.accepted == 2
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert _closedWithNothing(conn)
        proxy.waitFor(r"sni_routes: not a TLS handshake")


def test_certificateRotationBySIGHUP(proxy, pki, tmp_path) -> None:
    """
    SIGHUP re-reads the certificate files: new clients get the new
    certificate, an open TLS connection goes on with the old one, and a
    key that does not match refuses the reload with FILE:LINE.
    """
    live = tmp_path / "live"
    live.mkdir()
    first = pki.issue("first", "first", ("localhost",))
    second = pki.issue("second", "second", ("localhost",))
    cert, key = live / "cert.pem", live / "key.pem"
    for source, dest in zip(first, (cert, key), strict=True):
        shutil.copy(source, dest)
    key.chmod(0o600)
    with TCPEchoServer() as echo:
        port = freePort()
        mapText = f"""
mappings:
  - name: rotating
    listen: 127.0.0.1:{port}
    target: 127.0.0.1:{echo.port}
    tls: {{cert: {cert}, key: {key}}}
"""
        proxy.start(mapText)
        with tlsConnect(port, "localhost", pki.path) as kept:
            assert peerCommonName(kept) == "first"
            assert roundTrip(kept, b"before") == b"before"
            for source, dest in zip(second, (cert, key), strict=True):
                shutil.copy(source, dest)
            assert "changed 1" in proxy.reload()
            with tlsConnect(port, "localhost", pki.path) as fresh:
                assert peerCommonName(fresh) == "second"
                assert roundTrip(fresh, b"new") == b"new"
            assert roundTrip(kept, b"after") == b"after"

            shutil.copy(first[1], key)
            summary = proxy.reload()
            assert "invalid, nothing changed" in summary
            proxy.waitFor(
                rf"map\.yaml:6: tls: key {key} does not match certificate {cert} \(mapping 'rotating'\)"
            )
            with tlsConnect(port, "localhost", pki.path) as fresh:
                assert peerCommonName(fresh) == "second"
            assert roundTrip(kept, b"still") == b"still"


def test_checkLoadsTheFiles(tmp_path, pki) -> None:
    """
    check reads and matches the certificate and key files: a mismatch is
    an error with FILE:LINE, verify: false and a key others can read are
    warnings.
    """
    loose = tmp_path / "loose.key"
    shutil.copy(pki.server[1], loose)
    loose.chmod(0o644)
    mapPath = tmp_path / "map.yaml"
    mapPath.write_text(f"""
mappings:
  - name: a
    listen: 127.0.0.1:8443
    target: 127.0.0.1:80
    tls: {{cert: {pki.server[0]}, key: {loose}}}
  - name: b
    listen: 127.0.0.1:8444
    target: 127.0.0.1:443
    target_tls: {{verify: false}}
""")
    check = [sys.executable, "-m", "twistedproxy", "check", str(mapPath)]
    good = subprocess.run(check, capture_output=True, text=True, env=proxyEnvironment())
    assert good.returncode == 0
    assert good.stderr.splitlines() == [
        f"{mapPath}:6: warning: tls.key: key {loose} can be read by group or others"
        " (mode 644); chmod 600 it (mapping 'a')",
        f"{mapPath}:10: warning: target_tls.verify is false: the target's certificate is"
        " not checked, so anyone between the proxy and the target can read and change"
        " the traffic (mapping 'b')",
    ]
    mapPath.write_text(mapPath.read_text().replace(str(loose), str(pki.wrong[1])))
    bad = subprocess.run(check, capture_output=True, text=True, env=proxyEnvironment())
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[0] == (
        f"{mapPath}:6: tls: key {pki.wrong[1]} does not match certificate {pki.server[0]}"
        " (mapping 'a')"
    )


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.skipif(
    not (fastrelay.available() and tlsengine.available()),
    reason="the relay engine or the TLS engine is not built",
)
def test_enginesTakeTerminationAndPassthrough(tmp_path, pki) -> None:
    """
    On the fast path, a TLS-terminated flow goes to the TLS engine (whose
    threads, as many as the relay engine's, start with its first flow) and
    not to the relay engine, and an
    SNI-routed flow goes to the relay engine after its ClientHello (its
    relay threads, one per CPU unless PORTPROXY_ENGINE_THREADS says, start
    then).
    """
    # the engines' default: one per CPU, at most 16 (_engine.h)
    relayThreads = fastrelay.engineThreads() or min(len(os.sched_getaffinity(0)), 16)
    proxy = ProxyProcess(tmp_path, fastPath=True)
    with TCPEchoServer() as echo, TLSEchoServer(*pki.server) as tlsTarget:
        terminating, routing = freePort(), freePort()
        try:
            proxy.start(
                _terminating(terminating, echo.port, pki)
                + f"""
  - name: edge
    listen: 127.0.0.1:{routing}
    target: 127.0.0.1:{tlsTarget.port}
    sni_routes: {{other.example: 127.0.0.1:1}}
"""
            )
            before = _threads(proxy.pid)
            with tlsConnect(terminating, "localhost", pki.path) as conn:
                assert roundTrip(conn, b"t" * 50000) == b"t" * 50000
                assert _threads(proxy.pid) == before + relayThreads
                with tlsConnect(routing, "localhost", pki.path) as passthrough:
                    assert roundTrip(passthrough, b"p" * 50000) == b"p" * 50000
                    assert _threads(proxy.pid) == before + 2 * relayThreads
        finally:
            proxy.stop()
