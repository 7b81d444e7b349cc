#!/usr/bin/env python3
"""
The kernel's socket redirection (eBPF sockmap) against HAProxy, nginx
stream and portproxy: an experiment (docs/PERFORMANCE.md, "The kernel's
socket redirection (eBPF sockmap), tried").

    python bench/sockmap.py                     # http_keepalive, http_close: 3 rounds of 3 s
    python bench/sockmap.py -r 5 -w http_keepalive
    python bench/sockmap.py --check             # FIN ordering, backpressure, byte counts

Needs root (the relay loads a BPF program), gcc, wrk, nginx and haproxy
(`../shared/bench/install-peers`).  It compiles bench/sockmap.c, starts
nginx answering "hello" on loopback, HAProxy, nginx stream and portproxy
in front of it (as bench/peers.py does), and three sockmap relays: plain,
and "sockmap+count" (its verdict program also counts bytes per flow, and
the relay writes an access line per connection), "sockmap-verdict".  Then it runs wrk
(-t1 -c32) through each in turn, round after round (every other round in
reverse order), and prints, per relay: the median rate, the median
per-round ratio to the best of HAProxy and nginx, and CPU per request in
microseconds: the whole machine's (from /proc/stat: every process,
softirq and kworker, other sessions included; and of it, softirq), the
sum of wrk's, the backend's, the relay's and the kernel workers' (kworker
threads, where the redirect to a socket's egress runs), the relay's own,
and the kworkers'; and the machine's context switches per request.
"sockmap-verdict" is the plain relay with its program attached as
BPF_SK_SKB_VERDICT instead of BPF_SK_SKB_STREAM_VERDICT.

--check runs the correctness experiments instead: (a) a client sends N
bytes then shuts its write side down at once, the target counts what it
got before EOF and answers with that count and N bytes, then shuts down;
for sizes 1 B .. 4 MB, many times each, through the relay shutting the
target down as soon as it sees the client's EOF, and through the relay
with the "drain" option (it waits until the target's socket has every
byte first), with byte counting on; (b) a target that never reads: how
much a client can send through the relay, and what the machine's memory
does, against the same client connected directly; (c) the access lines'
byte counts against what was sent.
"""

import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import peers
from _common import Ports, waitTCP
from processes import Processes

HERE = os.path.dirname(os.path.abspath(__file__))
#: The relays of the speed comparison, each with the drain option (without
#: it, bytes are lost at the end of a direction: --check).
RELAYS = {
    "sockmap": ["drain"],
    "sockmap+count": ["drain", "count"],
    "sockmap-verdict": ["drain", "verdict"],
}
OTHERS = ("haproxy", "nginx")


def build(tmp):
    """
    bench/sockmap.c compiled into C{tmp}: its path.
    """
    binary = os.path.join(tmp, "sockmap")
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-pthread",
            "-o",
            binary,
            os.path.join(HERE, "sockmap.c"),
        ],
        check=True,
    )
    return binary


def startRelay(procs, binary, port, target, options, out=subprocess.DEVNULL):
    """
    The sockmap relay from 127.0.0.1:C{port} to 127.0.0.1:C{target}, once
    it listens.
    """
    process = procs.start(
        [binary, str(port), str(target), *options], stdout=out, stderr=None
    )
    waitTCP(port)
    return process


def machineBusy():
    """
    From /proc/stat: CPU seconds the whole machine has spent not idle so
    far, those of them in softirq (charged to whichever task was running
    as well), and the context switches.
    """
    with open("/proc/stat") as f:
        stat = f.read()
    fields = [int(v) for v in stat.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    switches = int(re.search(r"^ctxt (\d+)", stat, re.M).group(1))
    return (sum(fields[:8]) - idle) / tick, fields[6] / tick, switches


def kworkerCPU():
    """
    CPU seconds so far of every kernel worker thread (kworker/...).
    """
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue
        if head.partition("(")[2].startswith("kworker"):
            total += sum(int(v) for v in rest.split()[11:13])
    return total / os.sysconf("SC_CLK_TCK")


def childrenCPU():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def speed(a):
    """
    The speed comparison: rounds of wrk through every relay.
    """
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="sockmap-")
    try:
        binary = build(tmp)
        ports = Ports()
        backend = {"http": ports.take()}
        peers.startHTTP(procs, tmp, [f"127.0.0.1:{backend['http']}"])
        backendPid = procs.started[-1].pid
        waitTCP(backend["http"])
        fronts = {
            name: ports["http"]
            for name, ports in peers.startPeers(
                procs, ports, tmp, backend, set(OTHERS)
            ).items()
        }
        for name, options in RELAYS.items():
            fronts[name] = ports.take()
            with open(os.path.join(tmp, f"{name}.log"), "w") as log:
                process = startRelay(
                    procs, binary, fronts[name], backend["http"], options, log
                )
            peers.PIDS[name] = [process.pid]
        names = list(fronts)
        print(f"load average before: {os.getloadavg()}", flush=True)
        results = {}
        for r in range(a.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for workload in a.workloads.split(","):
                for name in order:
                    before = measureCPU(name, backendPid)
                    rate, count = peers.measureWork(workload, fronts[name], a.seconds)
                    after = measureCPU(name, backendPid)
                    cpu = {
                        k: after[k] - before[k] for k in after if after[k] is not None
                    }
                    results.setdefault((workload, name), []).append((rate, count, cpu))
                    print(
                        f"round {r + 1} {workload} {name}: {rate} "
                        + " ".join(f"{k}={v / count * 1e6:.1f}" for k, v in cpu.items())
                        if count
                        else f"round {r + 1} {workload} {name}: failed",
                        flush=True,
                    )
        print(f"load average after: {os.getloadavg()}")
        printTable(a, results, names)
    finally:
        procs.stopAll()
        shutil.rmtree(tmp, ignore_errors=True)


def measureCPU(name, backendPid):
    """
    CPU seconds so far of the machine, of wrk (this process's waited
    children), the HTTP backend, relay C{name} and the kworkers.
    """
    machine, softirq, switches = machineBusy()
    return {
        "machine": machine,
        "softirq": softirq,
        "switches": switches / 1e6,
        "wrk": childrenCPU(),
        "backend": peers.treeCPU(backendPid),
        "relay": peers.peerCPU(name),
        "kworker": kworkerCPU(),
    }


def perRequest(rows, *keys):
    """
    The median over rounds C{rows} of the CPU of C{keys} per request, in
    microseconds.
    """
    values = [
        sum(cpu.get(k, 0) for k in keys) / count * 1e6
        for _, count, cpu in rows
        if count and any(k in cpu for k in keys)
    ]
    return f"{statistics.median(values):.1f}" if values else "-"


def printTable(a, results, names):
    print(
        f"\n{a.rounds} rounds of {a.seconds} s, wrk -t1 -c32; medians; ratio: median of"
        " per-round ratios to the best of HAProxy and nginx; CPU: µs per request"
        " (per connection for http_close); context switches (whole machine) per"
        " request\n"
    )
    print(
        "| workload | relay | rate | / best peer | machine CPU | softirq"
        " | wrk+backend+relay+kworker | relay | kworker | context switches |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in a.workloads.split(","):
        for name in names:
            rows = results.get((workload, name), [])
            rates = [rate for rate, _, _ in rows if rate]
            ratios = []
            for r, (rate, _, _) in enumerate(rows):
                best = [
                    results[(workload, peer)][r][0]
                    for peer in OTHERS
                    if (workload, peer) in results and results[(workload, peer)][r][0]
                ]
                if rate and best:
                    ratios.append(rate / max(best))

            print(
                f"| {workload} | {name} | {statistics.median(rates) if rates else 0:.0f} |"
                f" {statistics.median(ratios) if ratios else 0:.2f} |"
                f" {perRequest(rows, 'machine')} | {perRequest(rows, 'softirq')} |"
                f" {perRequest(rows, 'wrk', 'backend', 'relay', 'kworker')} |"
                f" {perRequest(rows, 'relay')} | {perRequest(rows, 'kworker')} |"
                f" {perRequest(rows, 'switches')} |"
            )


# --- correctness ---------------------------------------------------------


def pattern(size):
    """
    C{size} bytes that show a lost or reordered stretch.
    """
    block = bytes(range(251)) * 10
    return (block * (size // len(block) + 1))[:size]


class CountingTarget:
    """
    A target that reads each connection to EOF, then answers with the
    count of bytes it got (8 bytes), whether they were the pattern, and as
    many pattern bytes, then shuts down and closes.
    """

    def __init__(self, port):
        self.server = socket.create_server(("127.0.0.1", port), backlog=128)
        threading.Thread(target=self.acceptLoop, daemon=True).start()

    def acceptLoop(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        with conn:
            conn.settimeout(20)
            got = bytearray()
            try:
                while data := conn.recv(1 << 20):
                    got += data
                ok = bytes(got) == pattern(len(got))
                conn.sendall(struct.pack("!QB", len(got), ok) + pattern(len(got)))
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def exchange(port, size, pause):
    """
    One trial of (a) through 127.0.0.1:C{port}, the client sending
    C{pause} seconds after its connection is established: its local port
    and a problem, or None.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
        local = c.getsockname()[1]
        time.sleep(pause)
        c.sendall(pattern(size))
        c.shutdown(socket.SHUT_WR)
        reply = bytearray()
        try:
            while data := c.recv(1 << 20):
                reply += data
        except OSError as e:
            return local, f"client: {e}"
    if len(reply) < 9:
        return local, f"target answered {len(reply)} bytes"
    got, ok = struct.unpack("!QB", reply[:9])
    if got != size:
        return local, f"target got {got} of {size} bytes before EOF"
    if not ok:
        return local, "target got other bytes"
    if bytes(reply[9:]) != pattern(size):
        return local, f"client got {len(reply) - 9} of {size} bytes back before EOF"
    return local, None


SIZES = (1, 100, 1460, 16384, 65536, 262144, 1048576, 4194304)


def finOrdering(a, procs, tmp, binary, ports):
    """
    (a) and (c): trials of L{exchange} through the relay without and with
    its drain option, the client sending at once or 10 ms after it
    connected (by then the relay has put the pair in the map); per size,
    how many came through intact, of those the kernel relayed and of
    those it could not take (their client's FIN came before the insertion:
    relayed in user space), and the access lines' counts against the
    sizes.
    """
    target = ports.take()
    CountingTarget(target)
    for mode in (["count"], ["count", "drain"]):
        port = ports.take()
        logPath = os.path.join(tmp, f"access-{'-'.join(mode)}.log")
        with open(logPath, "w") as log:
            relay = startRelay(procs, binary, port, target, mode, log)
        trials = []
        for size in SIZES:
            for i in range(a.trials if size <= 65536 else max(a.trials // 5, 4)):
                pause = 0.01 if i % 2 else 0.0
                trials.append((size, pause, *exchange(port, size, pause)))
        time.sleep(0.5)
        procs.stop(relay)
        with open(logPath) as log:
            accessLog = log.read()
        lines = {
            int(port): (int(up), int(down), bool(user))
            for port, up, down, user in re.findall(
                r"flow (\d+)->\d+: (\d+) bytes up, (\d+) down( \(user space\))?",
                accessLog,
            )
        }
        print(
            f"\n(a) FIN ordering, relay options {' '.join(mode)}:"
            " intact / trials, by who relayed (kernel: sockmap; user: fallback)"
        )
        print("| size B | sent | kernel | user | problems |")
        print("|---|---|---|---|---|")
        counted = 0
        for size in SIZES:
            for pause in (0.0, 0.01):
                tally, problems = {}, {}
                for s, p, local, problem in trials:
                    if (s, p) != (size, pause):
                        continue
                    up, down, user = lines.get(local, (None, None, None))
                    path = "?" if user is None else "user" if user else "kernel"
                    intact, total = tally.get(path, (0, 0))
                    tally[path] = (intact + (problem is None), total + 1)
                    if problem:
                        problems[problem] = problems.get(problem, 0) + 1
                    counted += up == size and down == size + 9
                cell = {k: f"{i}/{n}" for k, (i, n) in tally.items()}
                print(
                    f"| {size} | {'at once' if pause == 0 else 'after 10 ms'} |"
                    f" {cell.get('kernel', '-')} | {cell.get('user', '-')} |"
                    f" {'; '.join(f'{n}x {p}' for p, n in sorted(problems.items())) or '-'}"
                    + (f" ({cell['?']} without an access line)" if "?" in cell else "")
                    + " |"
                )
        print(
            f"(c) access lines: {counted} of {len(trials)} trials counted exactly"
            " (up = the size sent, down = the size + the 9-byte answer head)"
        )


def meminfo():
    with open("/proc/meminfo") as f:
        return {
            k: int(v.split()[0])
            for k, v in (line.split(":", 1) for line in f)
            if k in ("MemAvailable", "Slab", "SUnreclaim")
        }


def stuffing(port, seconds, cap):
    """
    Send as fast as the kernel takes it to 127.0.0.1:C{port} for
    C{seconds} or until C{cap} bytes: samples of (time, bytes taken,
    MemAvailable kB).
    """
    c = socket.create_connection(("127.0.0.1", port))
    c.setblocking(False)
    chunk = b"x" * (1 << 16)
    taken, start, samples, nextSample = 0, time.monotonic(), [], 0.0
    base = meminfo()["MemAvailable"]
    while True:
        now = time.monotonic() - start
        if now >= nextSample:
            samples.append((now, taken, base - meminfo()["MemAvailable"]))
            nextSample += 0.5
        if now > seconds or taken >= cap:
            break
        try:
            taken += c.send(chunk)
        except BlockingIOError:
            time.sleep(0.005)
    samples.append((time.monotonic() - start, taken, base - meminfo()["MemAvailable"]))
    return c, samples


def backpressure(a, procs, binary, ports):
    target = ports.take()
    server = socket.create_server(("127.0.0.1", target), backlog=16)
    held = []

    def hold():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    port = ports.take()
    relay = startRelay(procs, binary, port, target, [])
    for name, through in (("direct", target), ("sockmap", port)):
        before = meminfo()
        c, samples = stuffing(through, a.stuff_seconds, a.stuff_cap << 20)
        after = meminfo()
        ss = subprocess.run(
            ["ss", "-tmni", f"( sport = :{port} or dport = :{target} )"],
            capture_output=True,
            text=True,
        ).stdout
        print(f"\n(b) a target that never reads, the client connected {name}:")
        for t, taken, used in samples[:: max(len(samples) // 8, 1)] + samples[-1:]:
            print(
                f"  {t:5.1f} s: client sent {taken / 2**20:8.1f} MiB, MemAvailable -{used / 1024:7.1f} MiB"
            )
        print(
            f"  Slab {before['Slab']} -> {after['Slab']} kB,"
            f" SUnreclaim {before['SUnreclaim']} -> {after['SUnreclaim']} kB"
        )
        print("  ss -tmni:\n" + "\n".join("    " + line for line in ss.splitlines()))
        c.close()
        for conn in held:
            conn.close()
        held.clear()
        # What the kernel gives back once both ends are closed (the relay
        # closes its pair when the target's end comes); it takes seconds.
        waited = 0
        for at in (1, 5, 10, 20):
            time.sleep(at - waited)
            waited = at
            back = meminfo()["MemAvailable"] - before["MemAvailable"]
            print(
                f"  {at:2d} s after both closed: MemAvailable {back:+d} kB against before"
            )
    procs.stop(relay)
    server.close()


def check(a):
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="sockmap-")
    try:
        binary = build(tmp)
        ports = Ports()
        if "a" in a.parts:
            finOrdering(a, procs, tmp, binary, ports)
        if "b" in a.parts:
            backpressure(a, procs, binary, ports)
    finally:
        procs.stopAll()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-w", "--workloads", default="http_keepalive,http_close")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-s", "--seconds", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="the correctness experiments")
    ap.add_argument(
        "--parts",
        default="ab",
        help="--check: a (FIN ordering and counts), b (backpressure)",
    )
    ap.add_argument(
        "--trials", type=int, default=50, help="(a): trials per size up to 64 KiB"
    )
    ap.add_argument(
        "--stuff-seconds", type=float, default=8.0, help="(b): how long to send"
    )
    ap.add_argument(
        "--stuff-cap", type=int, default=1024, help="(b): MiB to send at most"
    )
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("sockmap.py: the relay loads a BPF program: run it as root")
    check(a) if a.check else speed(a)


if __name__ == "__main__":
    main()
