"""
End-to-end test of the systemd integration: a real twistd started as
systemd starts a socket-activated C{Type=notify} service (listening sockets
from descriptor 3 on with C{LISTEN_FDS}, C{LISTEN_PID} and
C{LISTEN_FDNAMES}; C{NOTIFY_SOCKET} and C{WATCHDOG_USEC}), against a notify
socket the test binds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from support import (
    START_TIMEOUT,
    TWISTD,
    TCPEchoServer,
    UDPEchoServer,
    freePort,
    proxyEnvironment,
    roundTrip,
)

#: Sets LISTEN_PID to its own pid, as systemd does for the process it
#: starts, then becomes twistd (same pid).
ACTIVATED = [
    TWISTD[0],
    "-c",
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.executable, [sys.executable, '-c', "
    "'from twisted.scripts.twistd import run; run()'] + sys.argv[1:])",
]


class NotifySocket:
    """
    The notify socket systemd would listen on.
    """

    def __init__(self, path) -> None:
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.notices: list[dict] = []

    def waitFor(self, key: str, timeout: float = 20.0) -> dict:
        """
        The next notice with C{key}, skipping WATCHDOG=1 (counted in
        C{watchdogs}); every notice is kept in C{notices}.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.socket.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(f"no {key} notice; got {self.notices}") from None
            notice = dict(line.split("=", 1) for line in data.split("\n"))
            self.notices.append(notice)
            if key in notice:
                return notice

    def close(self) -> None:
        self.socket.close()


def startActivated(
    proxy, mapText: str, sockets: list[socket.socket], names: str, env: dict
):
    """
    Start twistd on C{mapText} with C{sockets} as descriptors 3, 4, ... as
    systemd passes them.
    """
    proxy.writeMap(mapText)
    sources = [s.fileno() for s in sockets]

    def passSockets() -> None:
        copies = [os.dup(fd) for fd in sources]
        for index, fd in enumerate(copies):
            os.dup2(fd, 3 + index)

    environment = proxyEnvironment(proxy.fastPath)
    environment.update(env, LISTEN_FDS=str(len(sockets)), LISTEN_FDNAMES=names)
    with open(proxy.logPath, "wb") as log:
        proxy.process = subprocess.Popen(
            [*ACTIVATED, "-n", "--pidfile=", "portproxy", "-c", str(proxy.mapPath)],
            cwd=proxy.workdir,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=passSockets,
            pass_fds=tuple(range(3, 3 + len(sockets))),
        )
    proxy.waitFor("portproxy started", timeout=START_TIMEOUT)


def test_socketActivatedNotifyService(proxy, tmp_path) -> None:
    """
    Listeners take the sockets systemd passed (matched by address, one
    also by name), serve TCP and UDP through them on both paths, keep them
    open when a reload removes their mappings (clients wait in the
    kernel's queue) and serve again when a reload brings them back; the
    notify socket sees READY=1 with the listener count, RELOADING=1 with
    MONOTONIC_USEC and READY=1 around each reload, WATCHDOG=1 at half the
    interval, and STOPPING=1.
    """
    notify = NotifySocket(tmp_path / "notify")
    tcpSocket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcpSocket.bind(("127.0.0.1", 0))
    tcpSocket.listen(16)
    udpSocket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udpSocket.bind(("127.0.0.1", 0))
    tcpPort, udpPort = tcpSocket.getsockname()[1], udpSocket.getsockname()[1]
    plain = freePort()
    with TCPEchoServer() as echo, UDPEchoServer() as udpEcho:
        activated = f"""
  - name: web
    listen: 127.0.0.1:{tcpPort}
    target: 127.0.0.1:{echo.port}
  - name: dns
    proto: udp
    listen: 127.0.0.1:{udpPort}
    target: 127.0.0.1:{udpEcho.port}
"""
        rest = f"""
  - name: plain
    listen: 127.0.0.1:{plain}
    target: 127.0.0.1:{echo.port}
"""
        startActivated(
            proxy,
            "mappings:" + activated + rest,
            [tcpSocket, udpSocket],
            "web:portproxy-dns.socket",
            {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "600000"},
        )
        # The proxy has them; the test's copies go, so what keeps the
        # sockets open from now on is the proxy.
        tcpSocket.close()
        udpSocket.close()
        ready = notify.waitFor("READY")
        assert ready["STATUS"] == "3 listeners, 0 open"
        assert "cannot listen" not in proxy.output()

        def served() -> None:
            with socket.create_connection(("127.0.0.1", tcpPort), timeout=10) as conn:
                assert (
                    roundTrip(conn, b"through systemd's socket")
                    == b"through systemd's socket"
                )
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                client.sendto(b"datagram", ("127.0.0.1", udpPort))
                assert client.recv(100) == b"datagram"

        served()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        summary = proxy.reload("mappings:" + rest)
        assert "removed 2" in summary
        reloading = notify.waitFor("RELOADING")
        assert (
            before
            <= int(reloading["MONOTONIC_USEC"])
            <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
        assert notify.waitFor("READY")["STATUS"].startswith(
            "1 listeners, 0 open; reload of "
        )

        # Removed, yet open: a client's connect is queued by the kernel, a
        # datagram waits in the socket, and both are served once a reload
        # adds the mappings again.
        waiting = socket.create_connection(("127.0.0.1", tcpPort), timeout=10)
        waiting.sendall(b"queued")
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(10)
        client.sendto(b"held", ("127.0.0.1", udpPort))
        assert "added 2" in proxy.reload("mappings:" + activated + rest)
        assert waiting.recv(100) == b"queued"
        assert client.recv(100) == b"held"
        waiting.close()
        client.close()
        served()

        watchdogs = sum(1 for n in notify.notices if "WATCHDOG" in n)
        # lets time pass for the watchdog pings, read from the socket with
        # the STOPPING notice below
        time.sleep(1.0)
        proxy.process.send_signal(signal.SIGTERM)
        assert notify.waitFor("STOPPING")["STOPPING"] == "1"
        proxy.stop()
    assert sum(1 for n in notify.notices if "WATCHDOG" in n) >= watchdogs + 2
    notify.close()
