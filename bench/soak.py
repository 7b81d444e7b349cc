#!/usr/bin/env python3
"""
A bounded soak of a real portproxy: load and faults for a while, the
proxy's memory and descriptors sampled throughout, and a verdict.

    python bench/soak.py                  # 60 s, compiled fast paths
    python bench/soak.py --seconds 300 --python

Load, all at once, through one `twistd -n portproxy` on loopback:

- churn: short TCP connections (connect, send, half-close, read the echo);
- streams: long TCP connections carrying a deterministic byte stream,
  every byte read back and compared;
- UDP: clients exchanging numbered datagrams with an echo target;
- a target that restarts (closed and reopened every few seconds);
- a refused target, whose clients must see a clean end of stream;
- file descriptor exhaustion (a low RLIMIT_NOFILE for a few seconds);
- a reload storm (SIGHUP ten times a second for a few seconds).

Every few seconds it prints the proxy's RSS and open descriptors and the
counts so far, then a verdict: PASS when no stream byte was lost or
corrupted, no UDP reply was corrupted, no refused client saw a reset, and
descriptors and RSS ended within bounds of their level after warm-up.
Exit status 0 on PASS, 1 on FAIL.  Loopback only; everything it started is
stopped by pid and its directory removed.  Run it from the project's venv.
"""

import argparse
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TWISTD, Ports
from processes import Processes

HOST = "127.0.0.1"


class Counts:
    """
    Thread-safe named counters.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.values = {}

    def add(self, name, n=1):
        with self._lock:
            self.values[name] = self.values.get(name, 0) + n

    def __getitem__(self, name):
        return self.values.get(name, 0)


class EchoServer:
    """
    A threaded TCP echo target; L{restart} closes it (and its connections)
    and listens again on the same port.
    """

    def __init__(self, port=0):
        self.port = port
        self._conns = set()
        self._lock = threading.Lock()
        self.listen()

    def listen(self):
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((HOST, self.port))
        self.socket.listen(1024)
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.socket,), daemon=True).start()

    def _accept(self, listening):
        while True:
            try:
                conn, _ = listening.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self):
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restart(self, downFor):
        self.close()
        time.sleep(downFor)
        self.listen()


class UDPEcho:
    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((HOST, 0))
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self._echo, daemon=True).start()

    def _echo(self):
        while True:
            try:
                data, source = self.socket.recvfrom(65535)
                self.socket.sendto(data, source)
            except OSError:
                return

    def close(self):
        self.socket.close()


def streamBytes(seed, offset, n):
    """
    C{n} bytes of stream C{seed} from C{offset}: SHA-256 blocks of a counter.
    """
    out = bytearray()
    block, skip = divmod(offset, 32)
    while len(out) < n + skip:
        out += hashlib.sha256(b"%d:%d" % (seed, block)).digest()
        block += 1
    return bytes(out[skip : skip + n])


def churn(port, stop, counts):
    while not stop.is_set():
        payload = os.urandom(64)
        try:
            with socket.create_connection((HOST, port), timeout=5) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
            if data == payload:
                counts.add("churn ok")
            elif payload.startswith(data):
                counts.add("churn cut")  # fd exhaustion or a restart
            else:
                counts.add("churn corrupted")
        except OSError:
            counts.add("churn refused")


def stream(port, seed, stop, counts, chunk=65536):
    """
    One long connection: write the stream, read it back, compare.
    """
    sent = received = 0
    try:
        with socket.create_connection((HOST, port), timeout=10) as conn:
            while not stop.is_set():
                conn.sendall(streamBytes(seed, sent, chunk))
                sent += chunk
                while received < sent:
                    data = conn.recv(min(1 << 20, sent - received))
                    if not data:
                        raise ConnectionError("stream ended early")
                    if data != streamBytes(seed, received, len(data)):
                        counts.add("stream bytes corrupted", len(data))
                    received += len(data)
                    counts.add("stream bytes", len(data))
    except OSError:
        counts.add("stream bytes lost", sent - received)
        counts.add("stream broken")


def flaky(port, stop, counts):
    while not stop.is_set():
        try:
            with socket.create_connection((HOST, port), timeout=5) as conn:
                conn.sendall(b"ping")
                conn.shutdown(socket.SHUT_WR)
                data = conn.recv(10)
            counts.add(
                "restarting target ok"
                if data == b"ping"
                else "restarting target closed"
            )
        except OSError:
            counts.add("restarting target reset")
        time.sleep(0.01)


#: Set while the proxy is out of descriptors (and a second after): then it
#: sheds new clients at accept, closing them at once, a reset when they had
#: written already; that is not the refused target's way of ending them.
outOfDescriptors = threading.Event()


def refused(port, stop, counts):
    while not stop.is_set():
        try:
            with socket.create_connection((HOST, port), timeout=5) as conn:
                conn.sendall(b"request before the target failed")
                data = conn.recv(10)
            counts.add(
                "refused target: clean end" if data == b"" else "refused target: data"
            )
        except ConnectionResetError:
            if outOfDescriptors.is_set():
                counts.add("refused target: shed, out of fds")
            else:
                counts.add("refused target: reset")
        except OSError:
            counts.add("refused target: connect failed")
        time.sleep(0.02)


def udpClient(port, stop, counts):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as skt:
        skt.settimeout(1.0)
        n = 0
        while not stop.is_set():
            payload = b"%d:" % n + os.urandom(200)
            n += 1
            skt.sendto(payload, (HOST, port))
            counts.add("udp sent")
            try:
                while True:
                    data = skt.recv(65535)
                    if data == payload:
                        counts.add("udp echoed")
                        break
                    if data.split(b":")[0] == payload.split(b":")[0]:
                        counts.add("udp corrupted")
                        break
                    # A late echo of an earlier datagram: skip it.
            except TimeoutError:
                counts.add("udp lost")


def proxyStats(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="load duration (default 60)"
    )
    parser.add_argument("--python", action="store_true", help="PORTPROXY_FASTPATH=0")
    parser.add_argument(
        "--sample", type=float, default=5.0, help="seconds between samples"
    )
    parser.add_argument("--churners", type=int, default=4)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--udp-clients", type=int, default=8)
    parser.add_argument("--fd-slack", type=int, default=16, help="allowed fd growth")
    parser.add_argument(
        "--rss-slack", type=int, default=16, help="allowed RSS growth, MiB"
    )
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="portproxy-soak-")
    processes = Processes()
    echo, restarting, udpEcho = EchoServer(), EchoServer(), UDPEcho()
    free = Ports()
    ports = {
        name: free.take() for name in ("churn", "stream", "flaky", "refused", "udp")
    }
    deadPort = free.take()
    mapPath = os.path.join(workdir, "map.yaml")
    with open(mapPath, "w") as f:
        f.write(
            "mappings:\n"
            f"  - {{name: churn, listen: '{HOST}:{ports['churn']}', target: '{HOST}:{echo.port}'}}\n"
            f"  - {{name: stream, listen: '{HOST}:{ports['stream']}', target: '{HOST}:{echo.port}'}}\n"
            f"  - {{name: flaky, listen: '{HOST}:{ports['flaky']}', target: '{HOST}:{restarting.port}'}}\n"
            f"  - {{name: refused, listen: '{HOST}:{ports['refused']}', target: 'localhost:{deadPort}'}}\n"
            f"  - {{name: udp, proto: udp, listen: '{HOST}:{ports['udp']}', target: '{HOST}:{udpEcho.port}'}}\n"
        )
    logPath = os.path.join(workdir, "proxy.log")
    env = dict(os.environ, PORTPROXY_FASTPATH="0" if args.python else "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(logPath, "wb") as log:
        proxy = processes.start(
            [*TWISTD, "-n", "--pidfile=", "portproxy", "-c", mapPath],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stop = threading.Event()
    counts = Counts()
    try:
        deadline = time.monotonic() + 30
        while "portproxy started" not in Path(logPath).read_text():
            if proxy.poll() is not None or time.monotonic() > deadline:
                sys.exit("portproxy did not start:\n" + Path(logPath).read_text())
            time.sleep(0.05)
        pid = proxy.pid
        workers = (
            [
                threading.Thread(target=churn, args=(ports["churn"], stop, counts))
                for _ in range(args.churners)
            ]
            + [
                threading.Thread(target=stream, args=(ports["stream"], i, stop, counts))
                for i in range(args.streams)
            ]
            + [
                threading.Thread(target=udpClient, args=(ports["udp"], stop, counts))
                for _ in range(args.udp_clients)
            ]
            + [threading.Thread(target=flaky, args=(ports["flaky"], stop, counts))]
            + [threading.Thread(target=refused, args=(ports["refused"], stop, counts))]
        )
        for worker in workers:
            worker.daemon = True
            worker.start()

        # Faults, as fractions of the run: fd exhaustion, then a reload storm.
        exhaustion = (0.35 * args.seconds, 0.35 * args.seconds + 5)
        storm = (0.6 * args.seconds, 0.6 * args.seconds + 5)
        softLimit = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        started = time.monotonic()
        nextSample = nextRestart = 0.0
        lowered = False
        reloads = restarts = 0
        samples = []
        print(
            f"soak of pid {pid} for {args.seconds:g}s ({'python' if args.python else 'fast'} paths)"
        )
        print(
            f"{'t s':>6} {'RSS MiB':>8} {'fds':>5} {'churn ok':>9} {'stream MB':>10} "
            f"{'udp echoed':>10} {'reloads':>7} {'restarts':>8}  phase"
        )
        while (now := time.monotonic() - started) < args.seconds:
            phase = "load"
            if exhaustion[0] <= now < exhaustion[1]:
                phase = "fd exhaustion"
                if not lowered:
                    outOfDescriptors.set()
                    inUse = proxyStats(pid)[1]
                    resource.prlimit(
                        pid, resource.RLIMIT_NOFILE, (inUse + 2, softLimit[1])
                    )
                    lowered = True
            elif lowered:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, softLimit)
                lowered = False
                threading.Timer(1.0, outOfDescriptors.clear).start()
            if storm[0] <= now < storm[1]:
                phase = "reload storm"
                os.kill(pid, signal.SIGHUP)
                reloads += 1
            if now >= nextRestart:
                threading.Thread(
                    target=restarting.restart, args=(0.5,), daemon=True
                ).start()
                restarts += 1
                nextRestart = now + 5
            if now >= nextSample:
                rss, fds = proxyStats(pid)
                samples.append((now, rss, fds))
                print(
                    f"{now:6.0f} {rss / 1024:8.1f} {fds:5d} {counts['churn ok']:9d} "
                    f"{counts['stream bytes'] / 1e6:10.1f} {counts['udp echoed']:10d} "
                    f"{reloads:7d} {restarts:8d}  {phase}",
                    flush=True,
                )
                nextSample = now + args.sample
            time.sleep(0.1)
        if lowered:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, softLimit)
        stop.set()
        for worker in workers:
            worker.join(10)
        # Let connections that just ended be closed, then the last sample.
        time.sleep(2)
        rss, fds = proxyStats(pid)
        samples.append((time.monotonic() - started, rss, fds))
        print(f"{samples[-1][0]:6.0f} {rss / 1024:8.1f} {fds:5d}  (clients stopped)")
        alive = proxy.poll() is None
    finally:
        stop.set()
        processes.stopAll()
        echo.close()
        restarting.close()
        udpEcho.close()

    # Warm-up: the first third of the samples; the bound is against its peak.
    warm = samples[1 : max(2, len(samples) // 3)]
    fdBase = max(s[2] for s in warm)
    rssBase = max(s[1] for s in warm)
    checks = [
        ("proxy alive at the end", alive),
        ("stream bytes lost = 0", counts["stream bytes lost"] == 0),
        ("stream bytes corrupted = 0", counts["stream bytes corrupted"] == 0),
        ("churn corrupted = 0", counts["churn corrupted"] == 0),
        ("udp corrupted = 0", counts["udp corrupted"] == 0),
        ("refused target: no reset", counts["refused target: reset"] == 0),
        (
            f"fds at the end {fds} <= warm-up peak {fdBase} + {args.fd_slack}",
            fds <= fdBase + args.fd_slack,
        ),
        (
            f"RSS at the end {rss / 1024:.1f} MiB <= warm-up peak {rssBase / 1024:.1f} + {args.rss_slack} MiB",
            rss <= rssBase + args.rss_slack * 1024,
        ),
    ]
    print()
    for name in sorted(counts.values):
        print(f"  {name:28} {counts[name]}")
    print(f"  {'reloads (SIGHUP)':28} {reloads}")
    print(f"  {'target restarts':28} {restarts}")
    print()
    for name, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    verdict = all(ok for _, ok in checks)
    print("\nverdict:", "PASS" if verdict else "FAIL")
    if not verdict:
        print("proxy log kept in", logPath)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
