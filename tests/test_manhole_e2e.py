"""
End-to-end tests of the SSH manhole (SPEC section 5): the real OpenSSH
client, with keys made by ssh-keygen, against a real twistd.
"""

import os
import re
import resource
import select
import socket
import stat
import subprocess
import time

import pytest
from support import TCPEchoServer, UDPEchoServer, freePort, roundTrip, trustedTmpPath  # noqa: F401 (this module's tmp_path)

#: Terminal control sequences the manhole draws its line editing with.
_CONTROL = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[A-Za-z]|\r")


def sshKeygen(path, *keyType):
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            *(keyType or ("-t", "ed25519")),
            "-N",
            "",
            "-C",
            path.name,
            "-f",
            str(path),
        ],
        check=True,
    )
    return path


@pytest.fixture
def keys(tmp_path):
    """
    An operator key listed in authorized_keys and a stranger's key that is
    not.
    """
    directory = tmp_path / "keys"
    directory.mkdir()
    operator = sshKeygen(directory / "operator")
    stranger = sshKeygen(directory / "stranger")
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes((directory / "operator.pub").read_bytes())
    authorized.chmod(0o644)
    return operator, stranger


def proxyMap(tmp_path, manholePort, *mappings):
    text = "mappings:\n"
    for name, proto, listen, target in mappings:
        text += f"  - name: {name}\n    proto: {proto}\n    listen: {listen}\n    target: {target}\n"
    text += (
        f"manhole:\n  listen: 127.0.0.1:{manholePort}\n"
        f"  authorized_keys: {tmp_path / 'authorized_keys'}\n"
        f"  host_key: {tmp_path / 'ssh_host_key'}\n"
    )
    return text


def sshCommand(tmp_path, key, port, *options):
    """
    OpenSSH client arguments that use only C{key}, no agent and no user
    configuration, and keep host keys in the test's own known_hosts.
    """
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-p",
        str(port),
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=accept-new",
        *options,
        "operator@127.0.0.1",
    ]


class ManholeSession:
    """
    An interactive C{ssh -tt} session driven through its stdin.
    """

    def __init__(self, argv):
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.raw = b""
        self.marks = 0
        self.read(r"help\(\) lists the helpers")

    @property
    def text(self):
        return _CONTROL.sub(b"", self.raw).decode("utf-8", "replace")

    def read(self, pattern, timeout=5.0):
        """
        Read output until C{pattern} matches its plain text from where the
        last read stopped; return that text.
        """
        start = len(self.text)
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        out = self.process.stdout
        while not regex.search(self.text, start):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{pattern!r} not seen; the session said:\n{self.text}"
                )
            if select.select([out], [], [], remaining)[0]:
                chunk = os.read(out.fileno(), 65536)
                if not chunk:
                    raise AssertionError(
                        f"session ended before {pattern!r}:\n{self.text}"
                    )
                self.raw += chunk
        return self.text[start:]

    def run(self, line, timeout=5.0):
        """
        Type C{line}, then a marker line, and return what was shown up to
        the marker's output.
        """
        self.marks += 1
        mark = 1000 + self.marks
        self.process.stdin.write(
            f"{line}\nprint('end', 1000 + {self.marks})\n".encode()
        )
        self.process.stdin.flush()
        return self.read(rf"end {mark}\n", timeout)

    def close(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.write(b"exit()\n")
                self.process.stdin.flush()
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


@pytest.fixture
def session(tmp_path, keys):
    """
    Opens manhole sessions with the operator's key; closes them after the
    test.
    """
    sessions = []

    def open(port):
        s = ManholeSession(sshCommand(tmp_path, keys[0], port, "-tt"))
        sessions.append(s)
        return s

    yield open
    for s in sessions:
        s.close()


def tableRow(text, first):
    """
    The table row of C{text} whose first column is C{first}, split.
    """
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_statusListsEveryMappingWithLiveCounters(proxy, tmp_path, keys, session):
    """
    status() lists every mapping's listeners with their listen addresses,
    targets and live counters; the host key was created with mode 0600.
    """
    with TCPEchoServer() as tcpEcho, UDPEchoServer() as udpEcho:
        manholePort, tcpPort, udpPort = freePort(), freePort(), freePort("udp")
        proxy.start(
            proxyMap(
                tmp_path,
                manholePort,
                ("echo", "tcp", f"127.0.0.1:{tcpPort}", f"127.0.0.1:{tcpEcho.port}"),
                ("dns", "udp", f"127.0.0.1:{udpPort}", f"127.0.0.1:{udpEcho.port}"),
            )
        )
        hostKey = tmp_path / "ssh_host_key"
        assert stat.S_IMODE(hostKey.stat().st_mode) == 0o600
        shell = session(manholePort)
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=5) as conn:
            assert roundTrip(conn, b"hello") == b"hello"
            out = shell.run("status()")
        assert tableRow(out, "NAME") == [
            "NAME",
            "PROTO",
            "LISTEN",
            "TARGET",
            "OPEN",
            "TOTAL",
            "REJ",
            "DRP",
            "IN",
            "OUT",
        ]
        assert tableRow(out, "echo") == [
            "echo",
            "tcp",
            f"127.0.0.1:{tcpPort}",
            f"127.0.0.1:{tcpEcho.port}",
            "1",
            "1",
            "0",
            "-",
            "5",
            "B",
            "5",
            "B",
        ]
        assert tableRow(out, "dns")[:8] == [
            "dns",
            "udp",
            f"127.0.0.1:{udpPort}",
            f"127.0.0.1:{udpEcho.port}",
            "0",
            "0",
            "0",
            "0",
        ]


def test_connectionsShowsAConnectionThatKillCloses(proxy, tmp_path, keys, session):
    """
    connections() shows an open TCP connection with its client address,
    and kill(id) closes it.
    """
    with TCPEchoServer() as echo:
        manholePort, tcpPort = freePort(), freePort()
        proxy.start(
            proxyMap(
                tmp_path,
                manholePort,
                ("echo", "tcp", f"127.0.0.1:{tcpPort}", f"127.0.0.1:{echo.port}"),
            )
        )
        shell = session(manholePort)
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=5) as conn:
            assert roundTrip(conn, b"ping") == b"ping"
            client = f"127.0.0.1:{conn.getsockname()[1]}"
            out = shell.run("connections()")
            row = next(line.split() for line in out.splitlines() if client in line)
            flowId, mapping, proto, shownClient, target = row[:5]
            assert (mapping, proto, shownClient, target) == (
                "echo",
                "tcp",
                client,
                f"127.0.0.1:{echo.port}",
            )
            assert row[6:] == ["4", "B", "4", "B"]

            out = shell.run(f"kill({flowId})")
            assert f"closed {flowId}: tcp echo {client} -> 127.0.0.1:{echo.port}" in out
            try:
                assert conn.recv(100) == b""
            except ConnectionResetError:
                pass
            # The engine reports the end in its own time: the access line
            # says it has, and the flow has left the table by then.
            assert "killed from the manhole" in proxy.waitFor(
                r"[^\n]*killed from the manhole"
            ).group(0)
            out = shell.run("connections()")
            assert "no open connections or sessions" in out


def test_disableAndEnable(proxy, tmp_path, keys, session):
    """
    disable(name) makes new connections to the mapping fail while the
    proxy keeps its socket, and enable(name) makes them work again.
    """
    with TCPEchoServer() as echo:
        manholePort, tcpPort = freePort(), freePort()
        proxy.start(
            proxyMap(
                tmp_path,
                manholePort,
                ("echo", "tcp", f"127.0.0.1:{tcpPort}", f"127.0.0.1:{echo.port}"),
            )
        )
        shell = session(manholePort)
        assert "echo: disabled" in shell.run("disable('echo')")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", tcpPort), timeout=5)
        # The socket stays the proxy's: nobody else can take the port.
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", tcpPort))
        assert "disabled (not accepting): echo" in shell.run("status()")
        assert "echo: enabled" in shell.run("enable('echo')")
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=5) as conn:
            assert roundTrip(conn, b"again") == b"again"
        assert "no mapping named 'ech' (mappings: echo)" in shell.run("disable('ech')")


def test_reloadPrintsItsSummary(proxy, tmp_path, keys, session):
    """
    reload() applies the edited map file and prints the same summary line
    that SIGHUP logs; an exception typed in the shell leaves the proxy
    serving.
    """
    with TCPEchoServer() as echo:
        manholePort, firstPort, addedPort = freePort(), freePort(), freePort()
        first = ("echo", "tcp", f"127.0.0.1:{firstPort}", f"127.0.0.1:{echo.port}")
        proxy.start(proxyMap(tmp_path, manholePort, first))
        shell = session(manholePort)
        assert "ZeroDivisionError" in shell.run("1/0")
        proxy.writeMap(
            proxyMap(
                tmp_path,
                manholePort,
                first,
                ("added", "tcp", f"127.0.0.1:{addedPort}", f"127.0.0.1:{echo.port}"),
            )
        )
        shell.process.stdin.write(b"reload()\n")
        shell.process.stdin.flush()
        summary = f"reload of {proxy.mapPath}: added 1, removed 0, changed 0, unchanged 1, failed 0"
        shell.read(re.escape(summary))
        assert summary in proxy.output()
        with socket.create_connection(("127.0.0.1", addedPort), timeout=5) as conn:
            assert roundTrip(conn, b"new") == b"new"


def test_strangersAndPasswordsAreRefused(proxy, tmp_path, keys):
    """
    A key not in authorized_keys is refused, and so is a password (the
    server offers public keys only).
    """
    manholePort = freePort()
    proxy.start(proxyMap(tmp_path, manholePort))
    operator, stranger = keys
    stray = subprocess.run(
        sshCommand(tmp_path, stranger, manholePort, "-T"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
    )
    assert stray.returncode == 255
    assert b"Permission denied (publickey)" in stray.stderr
    password = subprocess.run(
        sshCommand(
            tmp_path,
            operator,
            manholePort,
            "-T",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
    )
    assert password.returncode == 255
    assert b"Permission denied (publickey)" in password.stderr
    assert "manhole: refused key" in proxy.output()


def test_rsaKeysLogIn(proxy, tmp_path, keys):
    """
    An RSA operator key logs in with OpenSSH's defaults (rsa-sha2
    signatures, which the server announces in server-sig-algs).
    """
    manholePort = freePort()
    proxy.start(proxyMap(tmp_path, manholePort))
    rsaKey = sshKeygen(tmp_path / "keys" / "rsa", "-t", "rsa", "-b", "2048")
    with open(tmp_path / "authorized_keys", "ab") as authorized:
        authorized.write((tmp_path / "keys" / "rsa.pub").read_bytes())
    assert "failed 0" in proxy.reload()
    logged = subprocess.run(
        sshCommand(tmp_path, rsaKey, manholePort, "-tt"),
        input=b"exit()\n",
        capture_output=True,
        timeout=10,
    )
    assert b"help() lists the helpers" in logged.stdout, logged.stderr


def test_hostKeyIsKeptAcrossRestarts(proxy, tmp_path, keys, session):
    """
    The host key file exists after the first start and keeps its
    fingerprint after a restart, so a client that pinned it connects with
    strict host key checking.
    """
    manholePort = freePort()
    mapText = proxyMap(tmp_path, manholePort)
    proxy.start(mapText)
    hostKey = tmp_path / "ssh_host_key"

    def fingerprint():
        listed = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(hostKey)], capture_output=True, check=True
        )
        return listed.stdout.split()[1]

    first = fingerprint()
    session(manholePort).close()
    assert (tmp_path / "known_hosts").read_text().strip()
    assert proxy.stop() is not None

    proxy.start(mapText)
    assert fingerprint() == first
    pinned = subprocess.run(
        sshCommand(
            tmp_path, keys[0], manholePort, "-tt", "-o", "StrictHostKeyChecking=yes"
        ),
        input=b"exit()\n",
        capture_output=True,
        timeout=10,
    )
    assert b"help() lists the helpers" in pinned.stdout, pinned.stderr


def test_reloadRemovesAndAddsTheManhole(proxy, tmp_path, keys, session):
    """
    A reload without the manhole section closes open sessions and the
    port; a reload with it again serves the same host key, and picks up a
    key newly added to authorized_keys.
    """
    manholePort = freePort()
    withManhole = proxyMap(tmp_path, manholePort)
    proxy.start(withManhole)
    shell = session(manholePort)
    summary = proxy.reload("mappings: []\n")
    assert "failed 0" in summary
    shell.process.wait(5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", manholePort), timeout=5)

    _operator, stranger = keys
    with open(tmp_path / "authorized_keys", "ab") as authorized:
        authorized.write((tmp_path / "keys" / "stranger.pub").read_bytes())
    assert "failed 0" in proxy.reload(withManhole)
    pinned = subprocess.run(
        sshCommand(
            tmp_path, stranger, manholePort, "-tt", "-o", "StrictHostKeyChecking=yes"
        ),
        input=b"exit()\n",
        capture_output=True,
        timeout=10,
    )
    assert b"help() lists the helpers" in pinned.stdout, pinned.stderr


def test_udpSessionsShownDisabledAndKilled(proxy, tmp_path, keys, session):
    """
    A UDP session shows in connections() with its byte counts; while the
    mapping is disabled a new client is rejected and counted and the open
    session still forwards; a new client's datagram that gets no socket is
    counted as dropped; kill(id) ends the session with its access line.
    """
    with UDPEchoServer() as echo:
        manholePort, udpPort = freePort(), freePort("udp")
        proxy.start(
            proxyMap(
                tmp_path,
                manholePort,
                ("dns", "udp", f"127.0.0.1:{udpPort}", f"127.0.0.1:{echo.port}"),
            )
        )
        shell = session(manholePort)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as old,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as new,
        ):
            for c in (old, new):
                c.bind(("127.0.0.1", 0))
                c.settimeout(0.5)
            old.sendto(b"hello", ("127.0.0.1", udpPort))
            assert old.recv(100) == b"hello"
            client = f"127.0.0.1:{old.getsockname()[1]}"
            out = shell.run("connections()")
            row = next(line.split() for line in out.splitlines() if client in line)
            flowId = row[0]
            assert row[1:5] == ["dns", "udp", client, f"127.0.0.1:{echo.port}"]
            assert row[6:] == ["5", "B", "5", "B"]

            assert "dns: disabled" in shell.run("disable('dns')")
            new.sendto(b"turned away", ("127.0.0.1", udpPort))
            with pytest.raises(socket.timeout):
                new.recv(100)
            old.sendto(b"still", ("127.0.0.1", udpPort))
            assert old.recv(100) == b"still"
            assert tableRow(shell.run("status()"), "dns")[4:8] == ["1", "1", "1", "0"]
            assert "dns: enabled" in shell.run("enable('dns')")

            # No descriptor to spare for a session socket for a while.
            soft, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (0, hard))
            try:
                new.sendto(b"no room", ("127.0.0.1", udpPort))
                proxy.waitFor(
                    r"udp dns dropped a datagram from [^\n]*out of file descriptors"
                )
            finally:
                resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert tableRow(shell.run("status()"), "dns")[4:8] == ["1", "1", "1", "1"]

            out = shell.run(f"kill({flowId})")
            assert f"closed {flowId}: udp dns {client} -> 127.0.0.1:{echo.port}" in out
            line = proxy.waitFor(r"udp dns [^\n]*killed from the manhole").group(0)
            assert "in=10 out=10" in line


def test_connectionsShowsTheProxyHeadersClient(proxy, tmp_path, keys, session):
    """
    Behind a load balancer (accept_proxy_protocol), connections() shows
    the client named by the PROXY header, not the balancer.
    """
    from twistedproxy.proxyprotocol import Addresses, encode

    with TCPEchoServer() as echo:
        manholePort, tcpPort = freePort(), freePort()
        text = proxyMap(
            tmp_path,
            manholePort,
            ("lb", "tcp", f"127.0.0.1:{tcpPort}", f"127.0.0.1:{echo.port}"),
        )
        text = text.replace(
            "manhole:", "    accept_proxy_protocol: [127.0.0.0/8]\nmanhole:"
        )
        proxy.start(text)
        shell = session(manholePort)
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=5) as conn:
            conn.sendall(
                encode(1, Addresses(("203.0.113.50", 40000), ("198.51.100.1", 443)))
            )
            assert roundTrip(conn, b"ping") == b"ping"
            out = shell.run("connections()")
            row = next(line.split() for line in out.splitlines() if " lb " in line)
            assert row[1:5] == [
                "lb",
                "tcp",
                "203.0.113.50:40000",
                f"127.0.0.1:{echo.port}",
            ]


def test_blockUnblockAndBlocked(proxy, tmp_path, keys, session):
    """
    block(cidr) resets new TCP connections and drops UDP datagrams from the
    network at once, leaving open connections until kill=True; blocked()
    lists the block and the refusals, the blocks survive a reload, and
    unblock(cidr) lets the network in again.
    """
    with TCPEchoServer() as tcpEcho, UDPEchoServer() as udpEcho:
        manholePort, tcpPort, udpPort = freePort(), freePort(), freePort("udp")
        text = proxyMap(
            tmp_path,
            manholePort,
            ("echo", "tcp", f"127.0.0.1:{tcpPort}", f"127.0.0.1:{tcpEcho.port}"),
            ("dns", "udp", f"127.0.0.1:{udpPort}", f"127.0.0.1:{udpEcho.port}"),
        )
        proxy.start(text)
        shell = session(manholePort)

        def client(source):
            conn = socket.socket()
            conn.settimeout(5)
            conn.bind((source, 0))
            conn.connect(("127.0.0.1", tcpPort))
            return conn

        with client("127.0.0.2") as open_:
            assert roundTrip(open_, b"open") == b"open"
            out = shell.run("block('127.0.0.2/31')")
            assert "blocked 127.0.0.2/31 on every listener" in out
            # The reset may come before connect() returns.
            with pytest.raises(ConnectionResetError), client("127.0.0.3") as refused:
                refused.sendall(b"x")
                refused.recv(1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind(("127.0.0.2", 0))
                udp.settimeout(0.5)
                udp.sendto(b"dropped", ("127.0.0.1", udpPort))
                with pytest.raises(socket.timeout):
                    udp.recvfrom(100)
            with client("127.0.0.4") as other:
                assert roundTrip(other, b"other") == b"other"
            assert roundTrip(open_, b"still") == b"still"
            # The summary comes once the map has loaded, off the reactor.
            shell.process.stdin.write(b"reload()\n")
            shell.process.stdin.flush()
            assert "changed 0" in shell.read(r"reload of [^\n]*changed 0[^\n]*\n")
            out = shell.run("blocked()")
            assert "blocked from the manhole: 127.0.0.2/31" in out
            assert "refused since start: blocked 2" in out
            assert tableRow(shell.run("status()"), "dns")[6] == "1"
            out = shell.run("block('127.0.0.2/31', kill=True)")
            assert "closed 1 open connections or sessions of 127.0.0.2/31" in out
            try:
                assert open_.recv(10) == b""
            except ConnectionResetError:
                pass
        assert "unblocked 127.0.0.2/31" in shell.run("unblock('127.0.0.2/31')")
        with client("127.0.0.3") as again:
            assert roundTrip(again, b"again") == b"again"


def test_preAuthenticationLimits(proxy, tmp_path, keys, session):
    """
    Raw TCP connections that never authenticate are closed after
    login_grace_time (silent ones and ones that sent their SSH version
    alike); while max_startups of them are open a further one is closed at
    once; an operator who logs in is not cut by the grace time.
    """
    manholePort = freePort()
    proxy.start(
        proxyMap(tmp_path, manholePort) + "  login_grace_time: 2s\n  max_startups: 3\n"
    )
    shell = session(manholePort)
    waiting = [
        socket.create_connection(("127.0.0.1", manholePort), timeout=10)
        for _ in range(3)
    ]
    waiting[0].sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", manholePort), timeout=10) as extra:
            assert extra.recv(100) == b""
        assert time.monotonic() - started < 1
        proxy.waitFor(
            r"closed a connection from 127\.0\.0\.1: 3 connections have not authenticated"
        )
        for conn in waiting:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            # Only the server's version line (and key exchange) came.
            assert data == b"" or data.startswith(b"SSH-2.0-")
        assert 1.5 < time.monotonic() - started < 6
        proxy.waitFor(r"not authenticated within login_grace_time 2s")
    finally:
        for conn in waiting:
            conn.close()
    assert "\n2\n" in shell.run("1+1")


def test_loginLogsOnlyPortproxyLines(proxy, tmp_path, keys):
    """
    A manhole login, even without a terminal (ssh -T), writes one line when
    the operator logs in and one when they log out, each with the key's
    fingerprint, and none of Twisted's key-exchange or channel chatter.
    """
    manholePort = freePort()
    proxy.start(proxyMap(tmp_path, manholePort))
    since = len(proxy.output())
    operator, _stranger = keys
    result = subprocess.run(
        sshCommand(tmp_path, operator, manholePort, "-T"),
        input=b"print(6 * 7)\n",
        capture_output=True,
        timeout=20,
    )
    assert b"42" in result.stdout, result
    proxy.waitFor(r"logged out", since=since)
    lines = proxy.output()[since:].splitlines()
    assert all("[portproxy#" in line for line in lines), lines
    assert len(lines) == 2, lines
    assert "manhole: user operator logged in with key SHA256:" in lines[0]
    assert "manhole: user operator logged out (key SHA256:" in lines[1]
