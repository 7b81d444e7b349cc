"""
End-to-end tests of C{client_address: proxy_protocol_v1 | proxy_protocol_v2}
and C{accept_proxy_protocol} through a real twistd, on the compiled fast
paths and the pure-Python path (the C{proxy} fixture runs both): the
target is an echo server, so what it received comes back to the client.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from support import (
    TCPEchoServer,
    UDPEchoServer,
    freePort,
    readAll,
    udpSocket,
    waitUntil,
)

from twistedproxy.proxyprotocol import Addresses, encode


def tcpMap(listen, target, extra="", proto="tcp"):
    return (
        "mappings:\n"
        "  - name: pp\n"
        f"    proto: {proto}\n"
        f'    listen: "{listen}"\n'
        f'    target: "{target}"\n'
        f"{extra}"
    )


def startEchoed(
    proxy, echo, extra="", proto="tcp", host="127.0.0.1", wildcard=False
) -> int:
    """
    Start C{proxy} with the mapping C{pp} (and its C{extra} keys) from a
    free port of C{host}, or of every address with C{wildcard}, to
    C{echo} on C{host}; return the port.
    """
    port = freePort(proto, host)
    address = f"[{host}]" if ":" in host else host
    listen = f"{port}" if wildcard else f"{address}:{port}"
    proxy.start(tcpMap(listen, f"{address}:{echo.port}", extra, proto))
    return port


def send(port, payload, host="127.0.0.1"):
    """
    Connect, send C{payload}, half-close; what came back, and the client's
    own address.
    """
    with socket.create_connection((host, port), timeout=10.0) as conn:
        own = conn.getsockname()[:2]
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        try:
            return readAll(conn), own
        except ConnectionResetError:
            return b"", own


@pytest.mark.parametrize("wildcard", [False, True], ids=["address", "wildcard"])
def test_sendsV1(proxy, wildcard):
    """
    With proxy_protocol_v1 the target first receives the PROXY v1 line
    naming the client's address and port and the address it connected to
    (on a wildcard listener too).
    """
    with TCPEchoServer() as echo:
        port = startEchoed(
            proxy,
            echo,
            "    client_address: proxy_protocol_v1\n",
            wildcard=wildcard,
        )
        got, (_host, cport) = send(port, b"hello")
        assert (
            got
            == f"PROXY TCP4 127.0.0.1 127.0.0.1 {cport} {port}\r\n".encode() + b"hello"
        )


def test_sendsV2IPv4(proxy):
    """
    With proxy_protocol_v2 the target first receives the binary v2 header
    (PROXY command, TCP over IPv4) with the client's address.
    """
    with TCPEchoServer() as echo:
        port = startEchoed(proxy, echo, "    client_address: proxy_protocol_v2\n")
        got, own = send(port, b"x" * 100000)
        header = encode(2, Addresses(own, ("127.0.0.1", port)))
        assert header[12:14] == b"\x21\x11"
        assert got == header + b"x" * 100000


def test_sendsV2IPv6(proxy):
    """
    An IPv6 client's v2 header is TCP over IPv6 (0x21) with 16-byte
    addresses.
    """
    with TCPEchoServer("::1") as echo:
        port = startEchoed(
            proxy, echo, "    client_address: proxy_protocol_v2\n", host="::1"
        )
        got, own = send(port, b"six", host="::1")
        header = encode(2, Addresses(own, ("::1", port)))
        assert header[13] == 0x21 and len(header) == 16 + 36
        assert got == header + b"six"


def test_acceptsHeaderAndPassesItOn(proxy):
    """
    From a source in accept_proxy_protocol, the header's client is the
    client: the header is not relayed, the v1 header sent on names it,
    and so does the access line.
    """
    with TCPEchoServer() as echo:
        port = startEchoed(
            proxy,
            echo,
            "    client_address: proxy_protocol_v1\n"
            "    accept_proxy_protocol: [127.0.0.0/8]\n",
        )
        incoming = encode(2, Addresses(("203.0.113.7", 4242), ("198.51.100.1", 80)))
        got, _ = send(port, incoming + b"payload")
        assert got == b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 80\r\npayload"
        proxy.waitFor(r"tcp pp 203\.0\.113\.7:4242 -> 127\.0\.0\.1:\d+ ")


def test_acceptsV1HeaderInPieces(proxy):
    """
    A v1 header that arrives in several segments is read whole, and the
    bytes after it reach the target untouched.
    """
    with TCPEchoServer() as echo:
        port = startEchoed(proxy, echo, "    accept_proxy_protocol: [127.0.0.1/32]\n")
        with socket.create_connection(("127.0.0.1", port), timeout=10.0) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(b"PROXY TCP6 2001:db8::1 ")
            conn.sendall(b"2001:db8::2 1234 443\r\n")
            conn.sendall(b"after")
            conn.shutdown(socket.SHUT_WR)
            assert readAll(conn) == b"after"
        proxy.waitFor(r"tcp pp \[2001:db8::1\]:1234 -> ")


def test_listedSourceWithoutHeaderKeepsItsAddress(proxy):
    """
    A listed source that sends no header is relayed as itself.
    """
    with TCPEchoServer() as echo:
        port = startEchoed(proxy, echo, "    accept_proxy_protocol: [127.0.0.0/8]\n")
        got, (_host, cport) = send(port, b"GET / HTTP/1.0\r\n\r\n")
        assert got == b"GET / HTTP/1.0\r\n\r\n"
        proxy.waitFor(rf"tcp pp 127\.0\.0\.1:{cport} -> ")


def test_headerFromUnlistedSourceCloses(proxy):
    """
    A header from a source not in accept_proxy_protocol closes the
    connection, which never reaches the target, and is counted.
    """
    with TCPEchoServer() as echo:
        port = startEchoed(proxy, echo, "    accept_proxy_protocol: [10.0.0.0/8]\n")
        incoming = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 80\r\n"
        got, _ = send(port, incoming + b"payload")
        assert got == b""
        proxy.waitFor(
            r"tcp pp closed 127\.0\.0\.1:\d+: PROXY header from a source"
            r" not in accept_proxy_protocol"
        )
        assert echo.accepted == 0


def test_malformedHeaderCloses(proxy):
    """
    A malformed header from a listed source closes the connection.
    """
    with TCPEchoServer() as echo:
        port = startEchoed(proxy, echo, "    accept_proxy_protocol: [127.0.0.0/8]\n")
        got, _ = send(port, b"PROXY TCP4 203.0.113.777 198.51.100.1 4242 80\r\nx")
        assert got == b""
        proxy.waitFor(
            r"tcp pp closed 127\.0\.0\.1:\d+: PROXY v1 header with an address"
        )
        assert echo.accepted == 0


def udpExchange(c, payload, address):
    """
    Send C{payload} until a reply comes (loopback may drop under load).
    """
    for _attempt in range(5):
        c.sendto(payload, address)
        try:
            return c.recv(65535)
        except TimeoutError:
            continue
    raise AssertionError("no reply")


def test_udpSendsV2PerDatagram(proxy):
    """
    On UDP, proxy_protocol_v2 puts a DGRAM header (0x12) before every
    datagram to the target; the echoed reply comes back unchanged.
    """
    with UDPEchoServer() as echo:
        port = startEchoed(
            proxy,
            echo,
            "    client_address: proxy_protocol_v2\n",
            proto="udp",
        )
        with udpSocket(timeout=2.0) as c:
            header = encode(
                2, Addresses(c.getsockname(), ("127.0.0.1", port)), datagram=True
            )
            assert header[13] == 0x12
            for size in (1, 1000, 60000):
                payload = bytes([size % 251]) * size
                assert udpExchange(c, payload, ("127.0.0.1", port)) == header + payload
            # a burst of equal sizes: the engine sends such runs with GSO
            burst = [bytes([i]) * 1200 for i in range(40)]
            for payload in burst:
                c.sendto(payload, ("127.0.0.1", port))
            replies = set()
            try:
                while len(replies) < len(burst):
                    replies.add(c.recv(65535))
            except TimeoutError:
                pass
            assert replies and replies <= {header + p for p in burst}


def test_udpSendsV2WildcardIPv6(proxy):
    """
    On a wildcard listener the DGRAM header's destination is the address
    the client sent to, for IPv6 too (0x22).
    """
    with UDPEchoServer("::1") as echo:
        port = startEchoed(
            proxy,
            echo,
            "    client_address: proxy_protocol_v2\n",
            proto="udp",
            host="::1",
            wildcard=True,
        )
        with udpSocket("::1", 2.0) as c:
            header = encode(
                2, Addresses(c.getsockname()[:2], ("::1", port)), datagram=True
            )
            assert header[13] == 0x22
            assert udpExchange(c, b"q", ("::1", port)) == header + b"q"


def test_udpAcceptsHeaderPerDatagram(proxy):
    """
    On UDP, a listed source's v2 header is taken off every datagram, its
    client names the session (access line, and the header sent on), a
    datagram without one passes as it is, and one with a malformed header
    is dropped.
    """
    with UDPEchoServer() as echo:
        port = startEchoed(
            proxy,
            echo,
            "    client_address: proxy_protocol_v2\n"
            "    accept_proxy_protocol: [127.0.0.0/8]\n"
            "    udp_timeout: 1s\n",
            proto="udp",
        )
        lb = Addresses(("203.0.113.9", 5353), ("198.51.100.2", 53))
        incoming = encode(2, lb, datagram=True)
        outgoing = encode(2, lb, datagram=True)
        address = ("127.0.0.1", port)
        with udpSocket(timeout=2.0) as c:
            assert udpExchange(c, incoming + b"one", address) == outgoing + b"one"
            assert udpExchange(c, incoming + b"two", address) == outgoing + b"two"
            assert udpExchange(c, b"bare", address) == outgoing + b"bare"
            c.sendto(incoming[:14] + b"\xff\xff" + b"bad", address)
            assert udpExchange(c, incoming + b"three", address) == outgoing + b"three"
        # the malformed datagram's 3 bytes never counted nor came back
        proxy.waitFor(
            r"udp pp 203\.0\.113\.9:5353 -> 127\.0\.0\.1:\d+ [\d.]+s"
            r" in=15 out=127 ",
            timeout=15,
        )


def test_udpRefusesUnlistedHeader(proxy):
    """
    On UDP, a first datagram with a PROXY header from a source not listed
    opens no session and is counted as rejected; nothing reaches the
    target.
    """
    with UDPEchoServer() as echo:
        port = startEchoed(
            proxy,
            echo,
            "    accept_proxy_protocol: [10.0.0.0/8]\n",
            proto="udp",
        )
        header = encode(
            2, Addresses(("203.0.113.9", 1), ("198.51.100.2", 2)), datagram=True
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(header + b"x", ("127.0.0.1", port))
        proxy.waitFor(
            r"udp pp rejected 127\.0\.0\.1:\d+: PROXY header from a source"
            r" not in accept_proxy_protocol"
        )
        assert echo.sources == []


@pytest.fixture
def nginxProxyProtocol(tmp_path):
    """
    nginx on loopback as a real PROXY protocol receiver: a server
    `listen ... proxy_protocol` that answers with the client address and
    port it read from the header.
    """
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed (.ci/run installs it)")
    port = freePort()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"worker_processes 1; daemon off; pid {tmp_path}/nginx.pid;"
        f" error_log {tmp_path}/nginx.err;\n"
        "events { worker_connections 64; }\n"
        f"http {{ access_log off; client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};"
        f" fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};\n"
        f"  server {{ listen 127.0.0.1:{port} proxy_protocol;"
        ' location / { return 200 "$proxy_protocol_addr $proxy_protocol_port'
        ' $proxy_protocol_server_addr $proxy_protocol_server_port"; } } }\n'
    )
    process = subprocess.Popen([nginx, "-c", str(conf)], stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
        return True

    waitUntil(answers, what="nginx answering", interval=0.05)
    yield port
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("version", ["proxy_protocol_v1", "proxy_protocol_v2"])
def test_nginxReadsHeader(proxy, nginxProxyProtocol, version):
    """
    A real receiver, nginx with `listen ... proxy_protocol`, reads the
    header portproxy sends (v1 and v2) and sees the client's address and
    port and the listen address.
    """
    port = freePort()
    proxy.start(
        tcpMap(
            f"127.0.0.1:{port}",
            f"127.0.0.1:{nginxProxyProtocol}",
            f"    client_address: {version}\n",
        )
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as conn:
        cport = conn.getsockname()[1]
        conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = readAll(conn)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(f"127.0.0.1 {cport} 127.0.0.1 {port}".encode())


def test_reloadChangesWhatIsSent(proxy):
    """
    A reload that changes client_address applies to new connections, on
    the same listening socket.
    """
    with TCPEchoServer() as echo:
        port = startEchoed(proxy, echo, "    client_address: proxy_protocol_v1\n")
        got, own = send(port, b"a")
        assert got.startswith(b"PROXY TCP4 ")
        summary = proxy.reload(
            tcpMap(
                f"127.0.0.1:{port}",
                f"127.0.0.1:{echo.port}",
                "    client_address: proxy_protocol_v2\n",
            )
        )
        assert "changed 1" in summary
        got, own = send(port, b"b")
        assert got == encode(2, Addresses(own, ("127.0.0.1", port))) + b"b"
        proxy.reload(tcpMap(f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}"))
        assert send(port, b"c")[0] == b"c"
