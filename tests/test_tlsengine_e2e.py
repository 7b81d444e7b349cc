"""
End-to-end tests of TLS termination's behaviour at its edges: the server
name choosing the certificate, clients that never finish or never begin a
handshake, and a client that never reads.  Each runs on the compiled fast
path, where the TLS engine (twistedproxy.tcp._tlsengine) serves C{tls:}
listeners, and on the pure-Python path (the C{proxy} fixture); the last
test checks that the engine does serve them.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time

import pytest
from certs import Authority, peerCommonName, tlsConnect
from support import (
    ProxyProcess,
    TCPEchoServer,
    freePort,
    readAll,
    roundTrip,
    rssKiB,
    threadNames,
)

from twistedproxy.tcp import engine as fastrelay
from twistedproxy.tcp import tlsengine

MiB = 1024 * 1024


@pytest.fixture
def pki(tmp_path):
    """
    A CA with certificates for localhost, api.example and *.apps.example,
    and a client certificate.
    """
    ca = Authority(tmp_path / "pki")
    ca.server = ca.issue("server", "localhost", ("localhost", "127.0.0.1"))
    ca.api = ca.issue("api", "api", ("api.example",))
    ca.apps = ca.issue("apps", "apps", ("*.apps.example", "deep.x.apps.example"))
    ca.alice = ca.issue("alice", "alice", client=True)
    return ca


def _map(port: int, target: int, pki, extra: str = "") -> str:
    cert, key = pki.server
    return f"""
mappings:
  - name: secure
    listen: 127.0.0.1:{port}
    target: 127.0.0.1:{target}
    connect_timeout: 1s
    tls:
      cert: {cert}
      key: {key}
{extra}"""


def _received(conn: socket.socket) -> bytes:
    """
    What the proxy sent on C{conn} before it closed it (with a FIN, or a
    reset, which the pure-Python path sends when a handshake fails).
    """
    try:
        return readAll(conn)
    except ConnectionResetError:
        return b""


def _closedWithNothing(conn: socket.socket) -> bool:
    """
    Whether the proxy closed C{conn} without sending a byte.
    """
    return _received(conn) == b""


def test_serverNameChoosesTheCertificate(proxy, pki) -> None:
    """
    The client's server name picks the certificate: an exact name, a
    C{*.suffix} at any depth, case and a trailing dot ignored, and the
    default for an unknown name.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        sni = (
            "      sni:\n"
            f"        api.example: {{cert: {pki.api[0]}, key: {pki.api[1]}}}\n"
            f"        '*.apps.example': {{cert: {pki.apps[0]}, key: {pki.apps[1]}}}\n"
        )
        proxy.start(_map(port, echo.port, pki, sni))
        context = ssl.create_default_context(cafile=str(pki.path))
        context.check_hostname = False
        for name, expected in [
            ("api.example", "api"),
            ("API.Example", "api"),
            ("one.apps.example", "apps"),
            ("deep.x.apps.example", "apps"),
            ("localhost", "localhost"),
            ("other.example", "localhost"),
        ]:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=name) as conn,
            ):
                assert peerCommonName(conn) == expected, name
                assert roundTrip(conn, name.encode()) == name.encode()


def test_handshakeNeverFinished(proxy, pki) -> None:
    """
    A client that connects and never sends its ClientHello is closed at
    connect_timeout, the target never dialed, and the access line says
    why.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(_map(port, echo.port, pki))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            began = time.monotonic()
            assert _closedWithNothing(conn)
            waited = time.monotonic() - began
        assert 0.8 < waited < 5, waited
        proxy.waitFor(
            r"tcp secure 127\.0\.0\.1:\d+ -> \S+ \S+ in=0 out=0 tls: no handshake in 1s"
        )
        assert echo.accepted == 0


def test_refusedTargetClosesTheClient(proxy, pki) -> None:
    """
    A handshaken client whose target refuses the connection (dialed by
    the engine itself on the fast path) gets a close_notify and a FIN and
    nothing else, and the access line says why, as on the Python path.
    """
    port, nothing = freePort(), freePort()
    proxy.start(_map(port, nothing, pki))
    with tlsConnect(port, "localhost", pki.path) as conn:
        conn.sendall(b"lost")
        assert conn.recv(100) == b""
    proxy.waitFor(
        r"tcp secure 127\.0\.0\.1:\d+ -> \S+ \S+ in=\d+ out=0"
        r" connect failed: connection refused"
    )


def test_garbageInsteadOfAHandshake(proxy, pki) -> None:
    """
    A client that speaks plain HTTP to a TLS port is closed with a TLS
    alert or nothing, the target is never dialed, and OpenSSL's reason is
    in the access line.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(_map(port, echo.port, pki))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = _received(conn)
        # Nothing, or one TLS alert record.
        assert answer == b"" or answer[:1] == b"\x15", answer
        proxy.waitFor(r"in=0 out=0 tls: (http request|wrong version number)")
        assert echo.accepted == 0


def test_idleTimeout(proxy, pki) -> None:
    """
    A TLS connection with no bytes either way for idle_timeout is closed,
    and the access line says so.
    """
    with TCPEchoServer() as echo:
        port = freePort()
        proxy.start(
            _map(port, echo.port, pki).replace(
                "connect_timeout: 1s", "connect_timeout: 1s\n    idle_timeout: 1s"
            )
        )
        with tlsConnect(port, "localhost", pki.path) as conn:
            assert roundTrip(conn, b"once") == b"once"
            began = time.monotonic()
            try:
                assert conn.recv(100) == b""
            except (ConnectionResetError, ssl.SSLError):
                pass
            waited = time.monotonic() - began
        assert 0.8 < waited < 5, waited
        proxy.waitFor(r"in=4 out=4 idle timeout")


class _Firehose:
    """
    A target that sends to its first client as fast as it will take it,
    counting what the kernel accepted.
    """

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(4)
        self.port = self.socket.getsockname()[1]
        self.sent = 0
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.socket.accept()
        chunk = os.urandom(256 * 1024)
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    self.sent += conn.send(chunk)
                except TimeoutError:
                    continue
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.socket.close()


def test_clientThatNeverReadsBoundsMemory(proxy, pki) -> None:
    """
    A target pushing data at a TLS client that reads nothing is stopped by
    flow control: it gets far less than it offers out, and the proxy's
    resident memory grows by less than 8 MiB.
    """
    target = _Firehose()
    try:
        port = freePort()
        proxy.start(_map(port, target.port, pki))
        before = rssKiB(proxy.pid)
        with tlsConnect(port, "localhost", pki.path) as conn:
            # The handshake is done; the proxy dials the target, which then
            # sends until every buffer on the way is full.
            last, stable = -1, 0
            deadline = time.monotonic() + 30
            while stable < 5 and time.monotonic() < deadline:
                time.sleep(0.2)
                stable = stable + 1 if target.sent == last else 0
                last = target.sent
            grown = rssKiB(proxy.pid) - before
            sent = target.sent
            # And the flow still works once the client reads.
            assert conn.recv(65536)
        assert stable >= 5, f"the target kept sending ({sent} bytes)"
        assert 0 < sent < 48 * MiB, sent
        assert grown < 8 * 1024, f"proxy RSS grew by {grown} KiB"
    finally:
        target.close()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def engineThreadCount() -> int:
    """
    How many threads the TLS engine runs: one per CPU (at most 16) unless
    PORTPROXY_ENGINE_THREADS says.
    """
    return fastrelay.engineThreads() or min(len(os.sched_getaffinity(0)), 16)


@pytest.mark.skipif(not tlsengine.available(), reason="the TLS engine is not built")
def test_engineServesTermination(tmp_path, pki) -> None:
    """
    On the fast path the TLS engine terminates a tls: listener's clients:
    its threads start with the first client, it sends session tickets, and
    mutual TLS gives the client's subject to the access line from there.
    """
    proxy = ProxyProcess(tmp_path, fastPath=True)
    with TCPEchoServer() as echo:
        port = freePort()
        try:
            proxy.start(_map(port, echo.port, pki, f"      client_ca: {pki.path}\n"))
            before = _threads(proxy.pid)
            with tlsConnect(port, "localhost", pki.path, client=pki.alice) as conn:
                assert roundTrip(conn, b"engine") == b"engine"
                assert _threads(proxy.pid) == before + engineThreadCount()
                # TLS 1.3 session tickets, as nginx sends by default.
                assert conn.session is not None and conn.session.has_ticket
            proxy.waitFor(r"in=6 out=6 peer='CN=alice,O=portproxy tests' client closed")
        finally:
            proxy.stop()


@pytest.mark.skipif(not tlsengine.available(), reason="the TLS engine is not built")
def test_engineThreadsFromTheEnvironment(tmp_path, pki, monkeypatch) -> None:
    """
    PORTPROXY_ENGINE_THREADS=3 in twistd's environment gives the TLS
    engine 3 threads (tlsengine0 to 2), and 12 clients spread over them
    each get their own bytes back.
    """
    monkeypatch.setenv("PORTPROXY_ENGINE_THREADS", "3")
    proxy = ProxyProcess(tmp_path, fastPath=True)
    with TCPEchoServer() as echo:
        port = freePort()
        try:
            proxy.start(_map(port, echo.port, pki))
            conns = [tlsConnect(port, "localhost", pki.path) for _ in range(12)]
            try:
                for i, conn in enumerate(conns):
                    conn.sendall(b"%d," % i * (i + 1))
                for i, conn in enumerate(conns):
                    want = b"%d," % i * (i + 1)
                    got = b""
                    while len(got) < len(want):
                        chunk = conn.recv(len(want) - len(got))
                        assert chunk, got
                        got += chunk
                    assert got == want
                assert threadNames(proxy.pid, "tlsengine") == [
                    "tlsengine0",
                    "tlsengine1",
                    "tlsengine2",
                ]
            finally:
                for conn in conns:
                    conn.close()
        finally:
            proxy.stop()
