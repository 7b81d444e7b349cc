"""
Helpers for end-to-end tests: free loopback ports, a real twistd running
portproxy on a map, and echo backends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.error import CannotListenError

import twistedproxy

REPO = Path(__file__).resolve().parent.parent

#: Where the code under test was imported from: the checkout, or the
#: installed package (whose compiled extensions a checkout may lack).
CODE = Path(twistedproxy.__file__).resolve().parent.parent

#: Generous: CI machines are slow and shared.
START_TIMEOUT = 30.0

#: twistd, as this interpreter runs it ('python -m twisted' is 'twist').
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


#: Ports L{freePort} handed out in this process, not handed out again.
_givenPorts: set[int] = set()


def _portsBelowEphemeral() -> range:
    """
    The ports L{freePort} picks from: those below the kernel's ephemeral
    range, which C{bind(port 0)} and every outgoing connection take their
    ports from, so that no backend bound to port 0 and no connection of
    this or another process on the machine takes a picked port before the
    proxy binds it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    return range(10000, max(ephemeral, 11000))


def freePort(proto: str = "tcp", host: str = "127.0.0.1") -> int:
    """
    A port that is free on C{host} for C{proto} (C{"tcp"}, C{"udp"} or
    C{"both"}), below the ephemeral range (L{_portsBelowEphemeral}) and not
    handed out before by this process.  Something else may still bind it
    before the proxy does: a test that binds a port itself uses
    L{onFreePort}, which tries again.
    """
    return freeRange(1, proto, host)


def freeRange(count: int, proto: str = "tcp", host: str = "127.0.0.1") -> int:
    """
    The first of C{count} consecutive ports free on C{host} for C{proto},
    picked as L{freePort} picks one.
    """
    protos = ["tcp", "udp"] if proto == "both" else [proto]
    ports = _portsBelowEphemeral()
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(ports.start, ports.stop - count)
        run = range(first, first + count)
        if _givenPorts.isdisjoint(run) and all(
            portFree(port, p, host) for port in run for p in protos
        ):
            _givenPorts.update(run)
            return first
    raise RuntimeError(f"no {count} free {proto} ports in a row on {host}")


def onFreePort(bind, proto: str = "tcp", host: str = "127.0.0.1", attempts: int = 5):
    """
    Call C{bind(port)} with a L{freePort} and return what it returns; when
    the port was taken meanwhile (C{EADDRINUSE}, also as Twisted's
    L{CannotListenError}), try again with another, up to C{attempts}
    times.
    """
    for _ in range(attempts - 1):
        try:
            return bind(freePort(proto, host))
        except (OSError, CannotListenError) as e:
            cause = e.socketError if isinstance(e, CannotListenError) else e
            if getattr(cause, "errno", None) != errno.EADDRINUSE:
                raise
    return bind(freePort(proto, host))


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


def proxyEnvironment(fastPath: bool = True) -> dict:
    """
    The environment for a twistd subprocess: the code the tests imported
    first on the path, so that the proxy runs exactly that code, with or
    without its compiled fast paths.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(CODE), env.get("PYTHONPATH", "")] if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["PORTPROXY_FASTPATH"] = "1" if fastPath else "0"
    return env


class ProxyProcess:
    """
    C{twistd -n portproxy -c map.yaml} in a work directory of its own.

    @ivar fastPath: whether the proxy may use its compiled fast paths.
    """

    def __init__(
        self, workdir: Path, fastPath: bool = True, prefix: tuple = ()
    ) -> None:
        self.workdir = Path(workdir)
        self.fastPath = fastPath
        #: what twistd runs under (C{ip netns exec NS}), if anything
        self.prefix = tuple(prefix)
        self.mapPath = self.workdir / "map.yaml"
        self.logPath = self.workdir / "proxy.log"
        self.process: subprocess.Popen | None = None
        #: more environment for twistd, over L{proxyEnvironment}'s
        self.environment: dict[str, str] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def writeMap(self, mapText: str) -> None:
        # Write then rename, so a reload never reads half a file.
        partial = self.mapPath.with_suffix(".partial")
        partial.write_text(mapText)
        partial.replace(self.mapPath)

    def spawn(self, mapText: str, *extraArgs: str) -> subprocess.Popen:
        """
        Start twistd on C{mapText} without waiting for it.
        """
        self.writeMap(mapText)
        argv = [*self.prefix, *TWISTD, "-n", "--pidfile=", *extraArgs]
        argv += ["portproxy", "-c", str(self.mapPath)]
        # The child keeps its own descriptor of the log.
        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=proxyEnvironment(self.fastPath) | self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.process

    def start(self, mapText: str, *extraArgs: str) -> ProxyProcess:
        """
        Start twistd on C{mapText} and wait until it has started every
        listener.
        """
        self.spawn(mapText, *extraArgs)
        self.waitFor(r"portproxy started", timeout=START_TIMEOUT)
        return self

    def output(self) -> str:
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def waitFor(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match:
        """
        Wait until the log, from offset C{since}, matches C{pattern}.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output(), since)
            if match:
                return match
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited ({self.process.returncode}) before "
                    f"{pattern!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not logged in {timeout}s:\n{self.output()}"
                )
            time.sleep(0.02)

    def reload(self, mapText: str | None = None, timeout: float = 20.0) -> str:
        """
        Write C{mapText} (when given), send SIGHUP and return the reload's
        summary line.
        """
        if mapText is not None:
            self.writeMap(mapText)
        since = len(self.output())
        os.kill(self.pid, signal.SIGHUP)
        match = self.waitFor(r"reload of [^\n]*", timeout=timeout, since=since)
        return match.group(0)

    def stop(self) -> int | None:
        """
        SIGTERM, and the exit status.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def readAll(conn: socket.socket) -> bytes:
    """
    Everything C{conn} receives until end of stream.
    """
    chunks = []
    while chunk := conn.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """
    Connect, send C{payload}, half-close, and read everything until end of
    stream.
    """
    with socket.create_connection((host, port), timeout=10.0) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        return readAll(conn)


def roundTrip(conn: socket.socket, payload: bytes) -> bytes:
    """
    Send C{payload} on C{conn} and read as many bytes back.
    """
    conn.sendall(payload)
    data = b""
    while len(data) < len(payload):
        chunk = conn.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    return data


def turnedAway(
    port: int, source: str = "127.0.0.1", seconds: float = 2.0, host: str = "127.0.0.1"
) -> str:
    """
    How the proxy ends a new connection to C{host}:C{port} from C{source}
    that sends a byte at once, then reads: C{"end of stream"} (a clean
    close, C{recv} returns C{b""}), C{"reset"} (C{ConnectionResetError},
    also one that beat C{connect()}'s return), C{"served"} (bytes came
    back) or C{"open"} (nothing within C{seconds}).
    """
    conn = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    with conn:
        conn.settimeout(seconds)
        try:
            conn.bind((source, 0))
            conn.connect((host, port))
            conn.sendall(b"x")
            data = conn.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            # EPIPE: the send came after a reset had already ended it.
            return "reset"
        except TimeoutError:
            return "open"
    return "served" if data else "end of stream"


def rssKiB(pid: int) -> int:
    """
    Resident memory of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class TCPEchoServer:
    """
    A threaded TCP echo server on loopback, for a target.  C{accepted}
    counts connections.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(512)
        self.port = self.socket.getsockname()[1]
        self.accepted = 0
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stopped = True
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()

    def __enter__(self) -> TCPEchoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UDPEchoServer:
    """
    A threaded UDP echo server on loopback, for a target.  C{sources}
    records the source address of every datagram.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.sources: list = []
        self._stopped = False
        threading.Thread(target=self._echo, daemon=True).start()

    def _echo(self) -> None:
        while not self._stopped:
            try:
                data, source = self.socket.recvfrom(65535)
            except OSError:
                return
            if source is None:  # shut down by close()
                return
            self.sources.append(source)
            try:
                self.socket.sendto(data, source)
            except OSError:
                pass

    def close(self) -> None:
        self._stopped = True
        try:
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked recvfrom
        except OSError:
            pass
        self.socket.close()

    def __enter__(self) -> UDPEchoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The Docker shim of the code under test (built next to it by setup.py).
SHIM = CODE / "twistedproxy" / "portproxy-docker-proxy"


class Shim:
    """
    The Docker shim, started as dockerd starts its userland proxy: its
    report pipe on descriptor 3 and, with C{listenSocket}, that socket on
    descriptor 4 and C{-use-listen-fd}.

    @ivar report: what the shim wrote on descriptor 3 (after L{wait}).
    """

    def __init__(
        self,
        control: str,
        proto: str,
        hostIP: str,
        hostPort: int,
        containerIP: str,
        containerPort: int,
        listenSocket: socket.socket | None = None,
    ) -> None:
        argv = [
            str(SHIM),
            "-proto",
            proto,
            "-host-ip",
            hostIP,
            "-host-port",
            str(hostPort),
            "-container-ip",
            containerIP,
            "-container-port",
            str(containerPort),
        ]
        if listenSocket is not None:
            argv.append("-use-listen-fd")
        readEnd, writeEnd = os.pipe()
        passed = [writeEnd] + (
            [listenSocket.fileno()] if listenSocket is not None else []
        )

        def descriptors() -> None:
            # Where dockerd puts them: 3 the pipe, 4 the socket.  The
            # copies dup() makes close at exec; dup2's targets stay.
            moved = [os.dup(fd) for fd in passed]
            for target, fd in enumerate(moved, start=3):
                os.dup2(fd, target)

        env = dict(os.environ, PORTPROXY_CONTROL=control)
        self.process = subprocess.Popen(
            argv,
            env=env,
            preexec_fn=descriptors,
            close_fds=False,
            stderr=subprocess.DEVNULL,
        )
        os.close(writeEnd)
        with os.fdopen(readEnd, "rb") as pipe:
            self.report = pipe.read().decode()

    @property
    def ok(self) -> bool:
        return self.report == "0\n"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """
        Send C{sig} and return the exit status.
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def waitUntil(
    condition,
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
):
    """
    Poll C{condition} every C{interval} seconds until it returns something
    true, and return that; fail saying C{what} was awaited after
    C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout}s")
        time.sleep(interval)
    return result


@contextlib.contextmanager
def unansweringTarget():
    """
    A loopback (host, port) whose connects never complete, while the
    context lasts: Linux queues one connection on a C{listen(0)} socket
    and drops later SYNs while the queue is full, so once three fillers
    are under way (the first queued) a connect hangs until its timeout.
    """
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)
        # the first is in the queue once its handshake is done
        waitUntil(
            lambda: select.select([], [fillers[0]], [], 0)[1], what="the queue full"
        )
        yield full.getsockname()
    finally:
        for filler in fillers:
            filler.close()
        full.close()


def queueEmpty(skt: socket.socket) -> bool:
    """
    Whether every datagram sent to C{skt} was read from it.
    """
    waiting = fcntl.ioctl(skt, termios.FIONREAD, b"\0\0\0\0")
    # FIONREAD gives the next datagram's size: an empty one says 0 too
    return (
        struct.unpack("i", waiting)[0] == 0 and not select.select([skt], [], [], 0)[0]
    )


def portFree(port: int, proto: str = "tcp", host: str = "127.0.0.1") -> bool:
    """
    Whether C{port} can be bound on C{host} for C{proto} now.
    """
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        if proto == "tcp":
            # As servers bind: connections in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


#: Where tests keep manhole key files: the manhole trusts a key file only
#: when no directory above it is writable by others (so not under /tmp).
TRUSTED_BASE = "/run"


def trustedDirectory() -> Path:
    """
    A new empty directory, mode 0700, that the manhole's strict key-file
    checks trust: root-owned parents, none writable by group or others.
    """
    import tempfile

    return Path(tempfile.mkdtemp(prefix="portproxy-test-", dir=TRUSTED_BASE))


@pytest.fixture(name="tmp_path")
def trustedTmpPath():
    """
    Imported by a test module, its C{tmp_path}: a L{trustedDirectory}
    (pytest's own is under the world-writable /tmp, which the manhole
    refuses), removed after the test.
    """
    import shutil

    path = trustedDirectory()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def threadCount() -> int:
    """
    The threads this process runs now.
    """
    return len(os.listdir("/proc/self/task"))


def threadsBackTo(count: int) -> bool:
    """
    Wait until this process runs C{count} threads again (a joined thread
    can still be listed in C{/proc} for a moment after C{pthread_join}
    returns); C{True}, or fail.
    """
    return waitUntil(
        lambda: threadCount() == count, timeout=5, what=f"{count} threads left"
    )


def threadNames(pid: int, prefix: str) -> list[str]:
    """
    The sorted names of process C{pid}'s threads that start with C{prefix}
    (an engine's: C{tcprelay}, C{tlsengine}).
    """
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith(prefix):
            names.append(name)
    return sorted(names)
