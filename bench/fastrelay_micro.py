#!/usr/bin/env python3
"""
Micro-benchmark of the compiled relay engine against docker-proxy.

A tiny Twisted front end (accept, connect, then hand both sockets to
L{twistedproxy.tcp.engine.TCPEngine}) runs in a subprocess next to
docker-proxy and, for reference, the same front end relaying in plain
Twisted (producer/consumer, no engine).  Each workload runs against the
backend directly and through each proxy in turn, rounds interleaved so
that the load of other processes on the machine hits all alike; the table
gives medians and the median of the per-round ratios to docker-proxy.
Loopback only.

Workloads:
  - tcp_bulk: iperf3, one TCP stream, Gbit/s (higher is better)
  - http_keepalive: wrk -t1 -c32 against nginx, req/s (higher is better)
  - tcp_pingpong: sockperf ping-pong TCP 64 B, p50 and p99 latency in us
    (lower is better)
  - idle: RSS growth per idle connection held open through the proxy, KiB
    (lower is better)

Run from the project root (the extension built: python setup.py build_ext
--inplace):

    python bench/fastrelay_micro.py                    # 3 rounds, 3 s each
    python bench/fastrelay_micro.py -r 5 -t 5 --pipe-size 1048576
    python bench/fastrelay_micro.py -w tcp_bulk --proxies engine,docker-proxy
    python bench/fastrelay_micro.py --idle 0           # skip the idle test
    python bench/fastrelay_micro.py --proxies docker-proxy,engine@0,engine@30

Needs iperf3, sockperf, and for http_keepalive wrk and nginx; docker-proxy
from ~/.cache/portproxy-peers (PEERS_DIR), see ../shared/bench/install-peers.
Every process it starts is stopped by pid at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _common import Ports, startDockerProxy, waitTCP
from peers import measureWork, pingPong, rssKiB
from processes import Processes

#: the ports this run listens on
ports = Ports()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = {
    # name: (unit, higher is better)
    "tcp_bulk": ("Gbit/s", True),
    "http_keepalive": ("req/s", True),
    "tcp_pingpong_p50": ("us", False),
    "tcp_pingpong_p99": ("us", False),
}
BACKEND_OF = {
    "tcp_bulk": "iperf",
    "http_keepalive": "http",
    "tcp_pingpong_p50": "sockperf",
    "tcp_pingpong_p99": "sockperf",
}


# -- the front end under test (runs in its own process) --------------------------


def runFront(
    listenPort: int, targetPort: int, mode: str, pipeSize: int, busyPoll: int
) -> None:
    """
    Accept on 127.0.0.1:listenPort, connect each client to
    127.0.0.1:targetPort, and relay: through the engine (mode "engine") or
    in Twisted (mode "twisted").  Prints "ready" once listening.
    """
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from twistedproxy.tcp.engine import CompiledTCPEngine, TCPEngine
    from twistedproxy.tcp.relay import HandedOff

    relay = None
    if mode.startswith("engine"):
        relay = TCPEngine(
            reactor, CompiledTCPEngine(pipeSize=pipeSize, busyPoll=busyPoll)
        )
    flowIds = iter(range(1, 1 << 62))

    class TargetSide(Protocol):
        def __init__(self, client):
            self.client = client

        def connectionMade(self):
            client = self.client
            client.target = self
            clientTransport = client.transport
            for t in (clientTransport, self.transport):
                t.setTcpNoDelay(True)
            if relay is not None and relay.adopt(
                clientTransport, self.transport, client.flowId, 0, flowEnded
            ):
                # Nothing of the Twisted side stays alive for the flow: the
                # engine holds it, and flowEnded is all the reactor keeps.
                client.target = self.client = None
                return
            clientTransport.registerProducer(self.transport, True)
            self.transport.registerProducer(clientTransport, True)
            clientTransport.resumeProducing()

        def dataReceived(self, data):
            self.client.transport.write(data)

        def connectionLost(self, reason):
            if not reason.check(HandedOff):
                self.client.transport.loseConnection()

    class ClientSide(Protocol):
        target = None

        def connectionMade(self):
            self.flowId = next(flowIds)
            self.transport.pauseProducing()
            factory = ClientFactory()
            factory.buildProtocol = lambda addr: TargetSide(self)
            factory.clientConnectionFailed = lambda c, r: (
                self.transport.loseConnection()
            )
            reactor.connectTCP("127.0.0.1", targetPort, factory)

        def dataReceived(self, data):
            self.target.transport.write(data)

        def connectionLost(self, reason):
            if not reason.check(HandedOff) and self.target is not None:
                self.target.transport.loseConnection()

    def flowEnded(bytesIn, bytesOut, reason):
        pass

    factory = Factory()
    factory.protocol = ClientSide
    factory.noisy = False
    reactor.listenTCP(listenPort, factory, backlog=4096, interface="127.0.0.1")
    if relay is not None:
        reactor.addSystemEventTrigger("before", "shutdown", relay.stop)
    print("ready", flush=True)
    reactor.run()


# -- the harness -----------------------------------------------------------------


def startFront(procs, listen, target, mode, pipeSize, busyPoll):
    p = procs.start(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--front",
            str(listen),
            str(target),
            mode,
            str(pipeSize),
            str(busyPoll),
        ],
        stdout=subprocess.PIPE,
        stderr=None,
    )
    if p.stdout.readline().strip() != b"ready":
        sys.exit(f"{mode} front end failed to start")
    return p


def startProxy(procs, name, listen, target, pipeSize, busyPoll):
    if name == "docker-proxy":
        return startDockerProxy(procs, "tcp", listen, target)
    if name.startswith("engine@"):
        busyPoll = int(name.split("@")[1])
    return startFront(procs, listen, target, name, pipeSize, busyPoll)


def measure(workload, port, seconds):
    """
    One measurement against 127.0.0.1:C{port}: the figure of
    L{peers.measureWork} (Gbit/s, requests a second), or for
    C{tcp_pingpong} the median and 99th percentile round trip in us;
    L{None} when it failed.
    """
    if workload != "tcp_pingpong":
        return measureWork(workload, port, seconds)[0]
    out = pingPong(workload, port, seconds)
    found = [
        re.search(rf"percentile {pct} =\s+([\d.]+)", out)
        for pct in ("50.000", "99.000")
    ]
    if not all(found):
        return None
    return tuple(float(m.group(1)) for m in found)


def startBackends(procs, tmp, workloads):
    port = {}
    backends = {BACKEND_OF[w] for w in workloads}
    if "iperf" in backends:
        port["iperf"] = ports.take()
        procs.start(["iperf3", "-s", "-p", str(port["iperf"])])
    if "sockperf" in backends:
        port["sockperf"] = ports.take()
        procs.start(
            [
                "sockperf",
                "server",
                "--tcp",
                "-i",
                "127.0.0.1",
                "-p",
                str(port["sockperf"]),
            ]
        )
    if "http" in backends:
        port["http"] = ports.take()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err; events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port["http"]}; location / {{ return 200 "hello\\n"; }} }} }}
""")
        procs.start(["nginx", "-c", conf])
    for p in port.values():
        waitTCP(p)
    return port


def benchWorkloads(procs, tmp, names, workloads, rounds, seconds, pipeSize, busyPoll):
    backends = startBackends(procs, tmp, workloads)
    fronts = {"direct": dict(backends)}
    for name in names:
        fronts[name] = {}
        for key, target in backends.items():
            listen = ports.take()
            startProxy(procs, name, listen, target, pipeSize, busyPoll)
            fronts[name][key] = listen
    order = ["direct", *names]
    results = {w: {name: [] for name in order} for w in workloads}
    for r in range(rounds):
        for w in workloads:
            for name in order:
                port = fronts[name][BACKEND_OF[w]]
                if w.startswith("tcp_pingpong"):
                    if w.endswith("p99"):
                        continue  # measured with p50
                    v = measure("tcp_pingpong", port, seconds) or (None, None)
                    results["tcp_pingpong_p50"][name].append(v[0])
                    if "tcp_pingpong_p99" in results:
                        results["tcp_pingpong_p99"][name].append(v[1])
                    shown = v
                else:
                    v = measure(w, port, seconds)
                    results[w][name].append(v)
                    shown = v if v is None else round(v, 2)
                print(f"  round {r + 1} {w:18s} {name:13s} {shown}", file=sys.stderr)
    return results


def idleTest(procs, names, n, pipeSize, busyPoll):
    """
    RSS growth per idle connection held open through each proxy.
    """
    hold = socket.socket()
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.bind(("127.0.0.1", 0))
    hold.listen(4096)
    accepted = []
    stop = threading.Event()

    def acceptor():
        hold.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hold.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=acceptor, daemon=True)
    thread.start()
    out = {}
    for name in names:
        front = ports.take()
        p = startProxy(procs, name, front, hold.getsockname()[1], pipeSize, busyPoll)
        time.sleep(0.5)
        before = rssKiB(p.pid)
        conns = []
        for _ in range(n):
            try:
                conns.append(socket.create_connection(("127.0.0.1", front), timeout=5))
            except OSError:
                break
        time.sleep(2)
        after = rssKiB(p.pid)
        out[name] = round((after - before) / max(1, len(conns)), 2)
        print(
            f"  idle {name:13s} {len(conns)} connections, {out[name]} KiB each",
            file=sys.stderr,
        )
        for c in conns:
            c.close()
        procs.stop(p)
    stop.set()
    thread.join()
    for c in accepted:
        c.close()
    hold.close()
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--front":
        listen, target, mode, pipeSize, busyPoll = sys.argv[2:7]
        runFront(int(listen), int(target), mode, int(pipeSize), int(busyPoll))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workloads", default=",".join(WORKLOADS))
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-t", "--seconds", type=int, default=3)
    ap.add_argument(
        "--proxies",
        default="docker-proxy,engine,twisted",
        help="comma list of docker-proxy, engine, twisted; engine@N is the "
        "engine with N microseconds of busy-poll",
    )
    ap.add_argument(
        "--pipe-size",
        type=int,
        default=0,
        help="engine pipe size in bytes (0: the engine's default)",
    )
    ap.add_argument(
        "--busy-poll",
        type=int,
        default=-1,
        help="engine busy-poll after traffic, microseconds (-1: the engine's default)",
    )
    ap.add_argument(
        "--idle",
        type=int,
        default=2000,
        help="idle connections for the memory test; 0 skips it",
    )
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    from twistedproxy.tcp import _engine

    pipeSize = a.pipe_size or _engine.DEFAULT_PIPE_SIZE
    busyPoll = _engine.DEFAULT_BUSY_POLL_US if a.busy_poll < 0 else a.busy_poll
    names = a.proxies.split(",")
    workloads = [w for w in a.workloads.split(",") if w]
    if "http_keepalive" in workloads and not (
        shutil.which("wrk") and shutil.which("nginx")
    ):
        workloads.remove("http_keepalive")
    procs = Processes()
    report = {
        "pipe_size": pipeSize,
        "busy_poll_us": busyPoll,
        "rounds": a.rounds,
        "seconds": a.seconds,
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = benchWorkloads(
                procs, tmp, names, workloads, a.rounds, a.seconds, pipeSize, busyPoll
            )
            procs.stopAll()
            report["workloads"] = {}
            print(
                f"\nengine pipe size {pipeSize}, busy-poll {busyPoll} us, "
                f"{a.rounds} rounds of {a.seconds} s, medians\n"
            )
            others = [n for n in names if n != "docker-proxy"]
            header = ["workload", "unit", "direct", *names]
            header += [f"{n} / docker-proxy" for n in others if "docker-proxy" in names]
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for w in workloads:
                unit, higher = WORKLOADS[w]
                row = results[w]
                med = {
                    k: (
                        statistics.median([x for x in v if x is not None])
                        if any(x is not None for x in v)
                        else None
                    )
                    for k, v in row.items()
                }
                ratios = {}
                if "docker-proxy" in names:
                    for n in others:
                        pairs = [
                            p / d
                            for p, d in zip(row[n], row["docker-proxy"], strict=True)
                            if p and d
                        ]
                        ratios[n] = statistics.median(pairs) if pairs else None
                cells = [w, unit] + [
                    f"{med[k]:.4g}" if med[k] is not None else "-"
                    for k in ["direct", *names]
                ]
                cells += [f"{ratios[n]:.2f}" if ratios.get(n) else "-" for n in ratios]
                print("| " + " | ".join(cells) + " |")
                report["workloads"][w] = {
                    "raw": row,
                    "median": med,
                    "ratio_vs_docker_proxy": ratios,
                    "higher_is_better": higher,
                }
            if a.idle:
                idle = idleTest(procs, names, a.idle, pipeSize, busyPoll)
                report["idle_kib_per_connection"] = idle
                line = ", ".join(f"{k} {v} KiB" for k, v in idle.items())
                if idle.get("docker-proxy"):
                    line += "; " + ", ".join(
                        f"{k}/docker-proxy {idle[k] / idle['docker-proxy']:.2f}"
                        for k in others
                        if k in idle
                    )
                print(f"\nidle RSS per connection ({a.idle} connections): {line}")
    finally:
        procs.stopAll()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
