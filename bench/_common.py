"""
What the benchmark scripts of bench/ share: twistd as this interpreter
runs it, free loopback ports, and waiting until something listens.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

#: twistd, as this interpreter runs it ('python -m twisted' is 'twist').
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def portFree(port):
    """
    Whether C{port} can be bound on 127.0.0.1 for TCP (as servers bind:
    connections in TIME_WAIT do not count) and for UDP now.
    """
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


class Ports:
    """
    Hands out distinct loopback ports, each free for TCP and UDP when
    handed out (a fresh bind to port 0 can return the same port twice).
    """

    def __init__(self):
        self.next = 20000 + int.from_bytes(os.urandom(2), "big") % 30000

    def take(self):
        while True:
            port, self.next = self.next, self.next + 1
            if self.next > 64000:
                self.next = 20000
            if portFree(port):
                return port


def freeRange(count, first=None):
    """
    The first of C{count} consecutive ports free on 127.0.0.1 for TCP and
    UDP now (other benchmarks may hold some): C{first}, or the next
    multiple of C{count} above it, when given; else a random one.
    """
    for attempt in range(200):
        if first is None:
            base = 20000 + int.from_bytes(os.urandom(2), "big") % 30000
        else:
            base = first + attempt * count
        if base + count >= 65000:
            continue
        if all(portFree(port) for port in range(base, base + count)):
            return base
    raise SystemExit(f"no {count} free ports in a row")


def waitTCP(port, timeout=20.0):
    """
    Wait until something accepts on 127.0.0.1:C{port}; exit saying so
    after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def dockerProxyPath():
    """
    The docker-proxy to compare with: the one of $PEERS_DIR
    (C{~/.cache/portproxy-peers}, see ../shared/bench/install-peers), else
    the one on $PATH, else L{None}.
    """
    peers = os.environ.get("PEERS_DIR", os.path.expanduser("~/.cache/portproxy-peers"))
    candidate = os.path.join(peers, "docker-proxy")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("docker-proxy")


def startDockerProxy(procs, proto, port, target):
    """
    docker-proxy for C{proto} from 127.0.0.1:C{port} to 127.0.0.1:C{target},
    started once it says it is ready (C{0\\n} on its fd 3).
    """
    p = procs.start(
        [
            "sh",
            "-c",
            'exec "$0" "$@" 3>&1',
            dockerProxyPath(),
            "-proto",
            proto,
            "-host-ip",
            "127.0.0.1",
            "-host-port",
            str(port),
            "-container-ip",
            "127.0.0.1",
            "-container-port",
            str(target),
        ],
        stdout=subprocess.PIPE,
    )
    if p.stdout.read(2) != b"0\n":
        raise SystemExit("docker-proxy did not start")
    return p
