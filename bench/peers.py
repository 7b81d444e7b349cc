#!/usr/bin/env python3
"""
portproxy side by side with the other port proxies installed here.

    python bench/peers.py                       # every workload, 3 rounds of 3 s
    python bench/peers.py -w tcp_bulk,udp_pingpong -r 5
    python bench/peers.py --peers docker-proxy,haproxy,nginx,portproxy-python
    python bench/peers.py -w tcp_bulk,tcp_bulk8 --engine-threads 1,2
    PORTPROXY_FASTPATH=0 python bench/peers.py  # portproxy without its compiled paths
    python bench/peers.py -w http_close,http_keepalive --peers none --access

It starts, on loopback only, the backends (iperf3, sockperf, and nginx as
an HTTP server), then one forwarder per peer for each backend — portproxy
(one twistd for everything), docker-proxy (one process per port and
protocol, as Docker runs it), socat, HAProxy and nginx `stream`, whichever
are installed — and runs each workload through each of them in turn,
round after round (every other round in reverse order), so that machine
drift, and the TIME_WAIT sockets a run leaves behind, hit all alike.

It prints two tables (three with --machine).  The first: medians, portproxy's ratio to
docker-proxy, and each portproxy column's ratio to the best peer (the
best of docker-proxy, socat, HAProxy and nginx in the same round; all
ratios are medians of per-round ratios).  The second: CPU seconds per unit
of work (GB received for the bulk workloads, 10,000 requests, connections
or round trips for the others) of every proxy, counted from
/proc/<pid>/stat over all its threads and all its processes (nginx's
workers, socat's forks, each docker-proxy), and each portproxy column's
ratio to the most frugal peer.  With --machine, the third: per unit
of work, the whole machine's busy CPU (/proc/stat: load tool, backend,
proxy, kernel threads), each proxy's CPU and its system part, and the
bound that puts on portproxy's rate (see printMachineTable).  Then the
footprint against docker-proxy:
resident memory per idle TCP connection (--idle N connections held open),
and the memory and start-up time of N TCP + N UDP listeners (--scale N:
one portproxy against two docker-proxy processes a port, 100 ports
measured and the rest scaled).

Columns of portproxy: "portproxy" (compiled paths, where built);
"portproxy-python" (PORTPROXY_FASTPATH=0), when --peers names it;
"portproxy-nospin" (the TCP and UDP engines built with busyPoll=0), likewise;
"portproxy-tN" for the second and later counts of --engine-threads, each
started with PORTPROXY_ENGINE_THREADS=N (and "portproxy" with the first).
The engines of this tree run one thread and do not read that variable
yet, so until they do those columns are an A/A control.  tcp_bulk8 (8
parallel iperf3 streams) is the workload for that comparison; it runs
only when named with -w.  --access adds a second portproxy,
"portproxy+access", with a 1,000-entry deny list and every per-client
limit on (none of which refuses the benchmark's own 127.0.0.1 clients),
run in the same rounds, and a column of its ratio to the plain portproxy.
Run it from the project's root in its venv, so that `twistd` is this
checkout's.  `../shared/bench/install-peers` (root) installs the load
tools and the peers; docker-proxy is looked for in $PEERS_DIR (default
~/.cache/portproxy-peers) and on PATH.
"""

import argparse
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

from _common import TWISTD, Ports, dockerProxyPath, startDockerProxy, waitTCP
from processes import Processes

# workload: (unit, higher is better, backend, protocol through the proxy)
WORKLOADS = {
    "tcp_bulk": ("Gbit/s", True, "iperf", "tcp"),
    "tcp_bulk8": ("Gbit/s", True, "iperf", "tcp"),
    "udp_bulk": ("Gbit/s", True, "iperf", "udp"),
    "http_keepalive": ("req/s", True, "http", "tcp"),
    "http_close": ("conn/s", True, "http", "tcp"),
    "tcp_pingpong": ("us p50", False, "sockperf_tcp", "tcp"),
    "udp_pingpong": ("us p50", False, "sockperf_udp", "udp"),
}
#: twistd with the TCP and UDP engines' busy-poll off
#: (busyPoll=0): the "portproxy-nospin" column, to see what the busy-poll
#: costs and buys.
TWISTD_NOSPIN = [
    sys.executable,
    "-c",
    "import functools, twistedproxy.tcp.engine as f, twistedproxy.udp.engine as u;"
    " f.CompiledTCPEngine = functools.partial(f.CompiledTCPEngine, busyPoll=0);"
    " u.CompiledUDPEngine = functools.partial(u.CompiledUDPEngine, busyPoll=0);"
    " from twisted.scripts.twistd import run; run()",
]


def nginxStreamHead(tmp, workers=1):
    """
    The start of an nginx configuration with the stream module and
    C{workers} worker processes for a run whose files are in C{tmp}, up to
    the opening of its C{stream} block.
    """
    return (
        f"load_module {nginxStreamModule()};\n"
        f"worker_processes {workers}; daemon off;\n"
        f"pid {tmp}/stream.pid; error_log {tmp}/stream.err;\n"
        "events { worker_connections 20000; }\nstream {\n"
    )


def nginxStreamModule():
    path = "/usr/lib/nginx/modules/ngx_stream_module.so"
    return path if os.path.exists(path) else None


def startBackends(procs, ports, tmp):
    port = {}
    if shutil.which("iperf3"):
        port["iperf"] = ports.take()
        procs.start(["iperf3", "-s", "-p", str(port["iperf"])])
    if shutil.which("sockperf"):
        port["sockperf_tcp"], port["sockperf_udp"] = ports.take(), ports.take()
        procs.start(
            [
                "sockperf",
                "server",
                "--tcp",
                "-i",
                "127.0.0.1",
                "-p",
                str(port["sockperf_tcp"]),
            ]
        )
        procs.start(
            ["sockperf", "server", "-i", "127.0.0.1", "-p", str(port["sockperf_udp"])]
        )
    if shutil.which("nginx"):
        port["http"] = ports.take()
        startHTTP(procs, tmp, [f"127.0.0.1:{port['http']}"])
    for key in ("iperf", "sockperf_tcp", "http"):
        if key in port:
            waitTCP(port[key])
    return port


def startHTTP(procs, tmp, listens):
    """
    nginx answering C{hello} on each of C{listens} (what follows
    C{listen}: C{"127.0.0.1:8080"}, C{"127.0.0.1:8081 proxy_protocol"}).
    """
    conf = os.path.join(tmp, "http.conf")
    servers = "".join(
        f'  server {{ listen {listen}; location / {{ return 200 "hello\\n"; }} }}\n'
        for listen in listens
    )
    with open(conf, "w") as f:
        f.write(
            f"worker_processes 1; daemon off; pid {tmp}/http.pid; error_log {tmp}/http.err;\n"
            "events { worker_connections 20000; }\n"
            "http { access_log off; keepalive_requests 1000000;\n" + servers + "}\n"
        )
    procs.start(["nginx", "-c", conf])


def accessDefaults(entries=1000):
    """
    The map's C{defaults} of the --access run: C{entries} deny CIDRs, none
    of them loopback, and per-client limits far above what the load
    tools open, so that every check runs and none refuses.
    """
    cidrs = [f"10.{i // 256}.{i % 256}.0/24" for i in range(entries - entries // 4)]
    cidrs += [f"2001:db8:{i:x}::/48" for i in range(entries // 4)]
    return (
        "defaults:\n"
        "  deny: [" + ", ".join(cidrs) + "]\n"
        "  max_connections_per_client: 100000\n"
        "  new_connections_per_client: {rate: 1000000/s, burst: 1000000}\n"
        "  datagrams_per_client: 100000000/s\n"
    )


def startPortproxyPeer(procs, ports, tmp, backend, protos, name, head="", env=None):
    """
    One twistd serving every backend: {backend: front port}; C{env}: what
    to add to its environment.
    """
    fronts = {k: ports.take() for k in backend}
    mapPath = os.path.join(tmp, f"{name}.yaml")
    with open(mapPath, "w") as f:
        f.write(head + "mappings:\n")
        for key, port in fronts.items():
            proto = "[" + ", ".join(sorted(protos[key])) + "]"
            f.write(
                f"  - name: {key}\n    proto: {proto}\n    listen: 127.0.0.1:{port}\n"
                f"    target: 127.0.0.1:{backend[key]}\n"
            )
    with open(os.path.join(tmp, f"{name}.log"), "w") as log:
        process = procs.start(
            [
                *(TWISTD_NOSPIN if name == "portproxy-nospin" else TWISTD),
                "-n",
                "--pidfile=",
                "portproxy",
                "-c",
                mapPath,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # "python -c" puts its working directory first on sys.path: a
            # baseline checkout must be the working directory too, or the
            # checkout the harness runs in would shadow it.
            cwd=(env or {}).get("PYTHONPATH"),
        )
    PIDS.setdefault(name, []).append(process.pid)
    return fronts


#: The pids each peer was started as, by its name in the table: the CPU
#: table counts these and every process below them.
PIDS = {}


def processTree(pid):
    """
    C{pid} and every living process below it (nginx's workers, socat's
    forks).
    """
    tree, todo = [], [pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return tree


def cpuSeconds(pid, fields=(11, 12, 13, 14)):
    """
    User plus system CPU time of process C{pid} so far, all its threads,
    and of its children that it has waited for; C{fields}: which of
    /proc/<pid>/stat's times after the name (11, 13: user; 12, 14:
    system).
    """
    with open(f"/proc/{pid}/stat") as f:
        times = f.read().rpartition(")")[2].split()
    return sum(int(times[i]) for i in fields) / os.sysconf("SC_CLK_TCK")


def systemSeconds(pid):
    """
    System CPU time of process C{pid} so far (see L{cpuSeconds}).
    """
    return cpuSeconds(pid, (12, 14))


def machineBusySeconds():
    """
    CPU seconds the whole machine has spent busy so far, on every core and
    in every process, kernel threads and interrupts included (all of
    /proc/stat's times but idle and iowait).
    """
    with open("/proc/stat") as f:
        times = [int(t) for t in f.readline().split()[1:9]]
    return (sum(times) - times[3] - times[4]) / os.sysconf("SC_CLK_TCK")


def treeSum(root, measure):
    """
    C{measure(pid)} summed over process C{root} and every process below
    it; a process that is gone by then counts nothing.
    """
    total = 0
    for pid in processTree(root):
        try:
            total += measure(pid)
        except OSError:
            pass
    return total


def treeCPU(root):
    """
    CPU seconds so far of process C{root} and every process below it,
    all their threads.
    """
    return treeSum(root, cpuSeconds)


def peerCPU(name, measure=cpuSeconds):
    """
    CPU seconds so far of everything peer C{name} runs as (all threads,
    all processes), or None if it is not known; C{measure}: per process,
    L{cpuSeconds} or L{systemSeconds}.
    """
    roots = PIDS.get(name)
    return sum(treeSum(root, measure) for root in roots) if roots else None


def portproxyVariants(engineThreads=(), python=False):
    """
    The portproxy columns of a run and the environment each adds: plain
    C{portproxy} (with C{PORTPROXY_ENGINE_THREADS} set to the first of
    C{engineThreads} if any are given), C{portproxy-tN} for each further
    count, and C{portproxy-python} (C{PORTPROXY_FASTPATH=0}) if asked.
    """
    variants = []
    for i, count in enumerate(engineThreads or [None]):
        env = {} if count is None else {ENGINE_THREADS: str(count)}
        variants.append(("portproxy" if i == 0 else f"portproxy-t{count}", env))
    if python:
        variants.append(("portproxy-python", {"PORTPROXY_FASTPATH": "0"}))
    return variants


#: The environment variable that sets the TCP engine's relay threads
#: (default: one per CPU); --engine-threads starts one portproxy per count.
ENGINE_THREADS = "PORTPROXY_ENGINE_THREADS"

#: Columns that are not peers: the backend itself and portproxy's own.
OURS = (
    "direct",
    "portproxy",
    "portproxy-python",
    "portproxy-nospin",
    "portproxy+access",
    "portproxy-base",
)


def isPeer(name):
    """
    Whether column C{name} is another proxy (not direct, not portproxy).
    """
    return name not in OURS and not name.startswith("portproxy-t")


def startPeers(
    procs,
    ports,
    tmp,
    backend,
    wanted,
    access=False,
    control=False,
    engineThreads=(),
    baseline="",
):
    """
    Every installed peer that was asked for, and portproxy (each of
    L{portproxyVariants}; C{portproxy-base}, the tree C{baseline}
    imported through PYTHONPATH, when given): peer name -> {backend: front
    port}.
    """
    front = {"direct": dict(backend)}
    protos = {
        key: {WORKLOADS[w][3] for w in WORKLOADS if WORKLOADS[w][2] == key}
        for key in backend
    }
    if "docker-proxy" in wanted and dockerProxyPath():
        front["docker-proxy"] = {}
        for key, target in backend.items():
            front["docker-proxy"][key] = port = ports.take()
            for proto in sorted(protos[key]):
                p = startDockerProxy(procs, proto, port, target)
                PIDS.setdefault("docker-proxy", []).append(p.pid)
    if "socat" in wanted and shutil.which("socat"):
        front["socat"] = {}
        for key, target in backend.items():
            front["socat"][key] = port = ports.take()
            for proto in protos[key]:
                if proto == "tcp":
                    argv = [
                        f"TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
                        f"TCP4:127.0.0.1:{target}",
                    ]
                else:
                    argv = [
                        f"UDP4-RECVFROM:{port},bind=127.0.0.1,reuseaddr,fork",
                        f"UDP4:127.0.0.1:{target}",
                    ]
                PIDS.setdefault("socat", []).append(procs.start(["socat", *argv]).pid)
    if "haproxy" in wanted and shutil.which("haproxy"):
        front["haproxy"] = {k: ports.take() for k in backend if "tcp" in protos[k]}
        conf = os.path.join(tmp, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(
                "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 300s\n  timeout server 300s\n"
            )
            for key, port in front["haproxy"].items():
                f.write(
                    f"listen {key}\n  bind 127.0.0.1:{port}\n  server s 127.0.0.1:{backend[key]}\n"
                )
        PIDS["haproxy"] = [procs.start(["haproxy", "-f", conf, "-db"]).pid]
    if "nginx" in wanted and shutil.which("nginx") and nginxStreamModule():
        front["nginx"] = {k: ports.take() for k in backend}
        conf = os.path.join(tmp, "stream.conf")
        with open(conf, "w") as f:
            f.write(nginxStreamHead(tmp))
            for key, port in front["nginx"].items():
                for proto in protos[key]:
                    udp = " udp" if proto == "udp" else ""
                    f.write(
                        f"  server {{ listen 127.0.0.1:{port}{udp}; proxy_pass 127.0.0.1:{backend[key]}; }}\n"
                    )
            f.write("}\n")
        PIDS["nginx"] = [procs.start(["nginx", "-c", conf]).pid]
    variants = portproxyVariants(engineThreads, "portproxy-python" in wanted)
    if "portproxy-nospin" in wanted:
        variants.append(("portproxy-nospin", {}))
    if baseline:
        # An A/B run: another checkout (with its extensions built in
        # place) against this one, in the same rounds.
        variants.append(("portproxy-base", {"PYTHONPATH": os.path.abspath(baseline)}))
    for name, env in variants:
        front[name] = startPortproxyPeer(
            procs, ports, tmp, backend, protos, name, env=env
        )
    if access:
        front["portproxy+access"] = startPortproxyPeer(
            procs,
            ports,
            tmp,
            backend,
            protos,
            "portproxy+access",
            "" if control else accessDefaults(),
        )
    for fronts in front.values():
        for key, port in fronts.items():
            if "tcp" in protos[key]:
                waitTCP(port)
    return front


def run(argv, seconds):
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 30
        ).stdout
    except subprocess.TimeoutExpired:
        return ""


def measure(workload, port, seconds):
    """
    One figure for C{workload} through 127.0.0.1:C{port}, or None.
    """
    return measureWork(workload, port, seconds)[0]


#: What one unit of work is, for the CPU table: (name, how many of what
#: L{measureWork} counts make one unit).
WORK_UNITS = {
    "tcp_bulk": ("GB", 1.0),
    "tcp_bulk8": ("GB", 1.0),
    "udp_bulk": ("GB", 1.0),
    "http_keepalive": ("10k requests", 1e4),
    "http_close": ("10k connections", 1e4),
    "tcp_pingpong": ("10k round trips", 1e4),
    "udp_pingpong": ("10k round trips", 1e4),
}


def pingPong(workload, port, seconds):
    """
    What C{sockperf ping-pong} of 64-byte messages through
    127.0.0.1:C{port} for C{seconds} printed: over TCP for
    C{tcp_pingpong}, else UDP.
    """
    tcp = ["--tcp"] if workload == "tcp_pingpong" else []
    return run(
        [
            "sockperf",
            "ping-pong",
            *tcp,
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-m",
            "64",
        ],
        seconds,
    )


def measureWork(workload, port, seconds):
    """
    One figure for C{workload} through 127.0.0.1:C{port} and the work it
    took (GB received, requests or connections, round trips): a pair, or
    C{(None, None)}.
    """
    if workload in ("tcp_bulk", "tcp_bulk8", "udp_bulk"):
        udp = ["-u", "-b", "0", "-l", "1400"] if workload == "udp_bulk" else []
        parallel = ["-P", "8"] if workload == "tcp_bulk8" else []
        out = run(
            [
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                str(seconds),
                *parallel,
                *udp,
            ],
            seconds,
        )
        # The receiver's line is the last rate iperf3 prints (with -P, the
        # [SUM] line), and the amount before it what arrived.
        found = re.findall(
            r"([\d.]+) ([KMG])Bytes\s+([\d.]+) ([KMG])bits/sec.*receiver", out
        )
        if not found:
            return None, None
        amount, unit, rate, scale = found[-1]
        # iperf3 counts bytes in powers of 1024 and bits in powers of 1000.
        gbytes = float(amount) * 1024 ** "KMG".index(unit) * 1024 / 1e9
        return float(rate) * {"K": 1e-6, "M": 1e-3, "G": 1.0}[scale], gbytes
    if workload.startswith("http_"):
        header = ["-H", "Connection: close"] if workload == "http_close" else []
        out = run(
            [
                "wrk",
                *header,
                "-t1",
                "-c32",
                f"-d{seconds}",
                f"http://127.0.0.1:{port}/",
            ],
            seconds,
        )
        found = re.search(r"Requests/sec:\s+([\d.]+)", out)
        count = re.search(r"(\d+) requests in", out)
        if not (found and count):
            return None, None
        return float(found.group(1)), int(count.group(1))
    out = pingPong(workload, port, seconds)
    found = re.search(r"percentile 50.000 =\s+([\d.]+)", out)
    count = re.search(r"\[Total Run\].*ReceivedMessages=(\d+)", out)
    if not (found and count):
        return None, None
    return float(found.group(1)), int(count.group(1))


def rssKiB(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class HoldingServer:
    """
    A loopback TCP server that accepts connections and holds them open.
    """

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(4096)
        self.port = self.socket.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        self.socket.close()
        for conn in self.held:
            conn.close()


def startPortproxy(procs, tmp, name, mapText):
    mapPath = os.path.join(tmp, f"{name}.yaml")
    with open(mapPath, "w") as f:
        f.write(mapText)
    return procs.start([*TWISTD, "-n", "--pidfile=", "portproxy", "-c", mapPath])


def idleMemory(ports, tmp, count):
    """
    RSS growth per idle TCP connection held open through portproxy and
    through docker-proxy: name -> KiB per connection.
    """
    result = {}
    target = HoldingServer()
    try:
        for name in ("docker-proxy", "portproxy"):
            if name == "docker-proxy" and not dockerProxyPath():
                continue
            procs, port = Processes(), ports.take()
            try:
                if name == "portproxy":
                    pid = startPortproxy(
                        procs,
                        tmp,
                        "idle",
                        f"mappings:\n  - name: idle\n    listen: 127.0.0.1:{port}\n"
                        f"    target: 127.0.0.1:{target.port}\n",
                    ).pid
                else:
                    pid = startDockerProxy(procs, "tcp", port, target.port).pid
                waitTCP(port)
                time.sleep(0.5)
                before = rssKiB(pid)
                conns = [
                    socket.create_connection(("127.0.0.1", port), timeout=5)
                    for _ in range(count)
                ]
                time.sleep(2)
                result[name] = (rssKiB(pid) - before) / count
                for conn in conns:
                    conn.close()
            finally:
                procs.stopAll()
    finally:
        target.close()
    return result


def manyListeners(ports, tmp, count):
    """
    Start-up time and RSS of C{count} TCP + C{count} UDP listeners: one
    portproxy, against docker-proxy's two processes a port (100 ports
    started and measured, the rest scaled).
    """
    base = None
    for _ in range(200):
        candidate = 20000 + int.from_bytes(os.urandom(2), "big") % 40000
        if candidate + count < 64000 and all(
            _free(p) for p in range(candidate, candidate + count)
        ):
            base = candidate
            break
    if base is None:
        raise SystemExit("no free port range")
    target = ports.take()
    result = {}
    procs = Processes()
    try:
        started = time.monotonic()
        pid = startPortproxy(
            procs,
            tmp,
            "scale",
            f"mappings:\n  - name: scale\n    proto: [tcp, udp]\n"
            f"    listen: 127.0.0.1:{base}-{base + count - 1}\n"
            f"    target: 127.0.0.1:{target}\n",
        ).pid
        waitTCP(base + count - 1, timeout=120)
        result["portproxy"] = (time.monotonic() - started, rssKiB(pid) / 1024)
    finally:
        procs.stopAll()
    if dockerProxyPath():
        sample = min(count, 100)
        procs = Processes()
        try:
            started = time.monotonic()
            pids = [
                startDockerProxy(procs, proto, base + i, target).pid
                for i in range(sample)
                for proto in ("tcp", "udp")
            ]
            elapsed = time.monotonic() - started
            time.sleep(1)
            perProcess = sum(rssKiB(p) for p in pids) / len(pids)
            result["docker-proxy"] = (
                elapsed * count / sample,
                perProcess * 2 * count / 1024,
            )
        finally:
            procs.stopAll()
    return result


def _free(port):
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def needs(workload):
    tool = {
        "iperf": "iperf3",
        "http": "wrk",
        "sockperf_tcp": "sockperf",
        "sockperf_udp": "sockperf",
    }
    return tool[WORKLOADS[workload][2]]


def medianOrNone(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bestPeerRatios(results, name, higher):
    """
    Per round, C{name}'s figure over the best peer's in that round (the
    highest rate, or the lowest latency or CPU); the median of those.
    """
    ratios = []
    for r, ours in enumerate(results[name]):
        peers = [
            values[r]
            for peer, values in results.items()
            if isPeer(peer) and r < len(values) and values[r]
        ]
        if ours and peers:
            ratios.append(ours / (max(peers) if higher else min(peers)))
    return medianOrNone(ratios)


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def printTable(a, workloads, names, results):
    """
    The comparison table: medians, and the median per-round ratio of each
    portproxy column to docker-proxy and to the best peer.
    """
    ours = [n for n in names if not isPeer(n) and n != "direct"]
    print(
        f"\n{a.rounds} rounds of {a.seconds} s; medians; ratio columns: median of per-round ratios"
        " (best peer: the best of the other proxies in that round)\n"
    )
    extra = " portproxy+access / portproxy |" if a.access else ""
    heads = ["portproxy / docker-proxy"] + [
        f"{n} / best peer" for n in ours if n != "portproxy+access"
    ]
    print(
        "| workload | unit | "
        + " | ".join(names)
        + " | "
        + " | ".join(heads)
        + " |"
        + extra
    )
    print("|---" * (len(names) + 2 + len(heads) + a.access) + "|")
    for w in workloads:
        unit, higher = WORKLOADS[w][:2]
        row = [w, unit] + [fmt(medianOrNone(results[w][n])) for n in names]
        pairs = [
            p / d
            for p, d in zip(
                results[w]["portproxy"],
                results[w].get("docker-proxy", []),
                strict=False,
            )
            if p and d
        ]
        row.append(fmt(medianOrNone(pairs)))
        row += [
            fmt(bestPeerRatios(results[w], n, higher))
            for n in ours
            if n != "portproxy+access"
        ]
        if a.access:
            pairs = [
                q / p
                for q, p in zip(
                    results[w]["portproxy+access"],
                    results[w]["portproxy"],
                    strict=False,
                )
                if p and q
            ]
            row.append(fmt(medianOrNone(pairs), 3))
        print("| " + " | ".join(row) + " |")


def printCPUTable(a, workloads, names, cpu):
    """
    CPU seconds per unit of work of every proxy (all its processes and
    threads), and each portproxy column over the most frugal peer.
    """
    shown = [n for n in names if n in PIDS]
    ours = [n for n in shown if not isPeer(n)]
    print(
        "\nCPU seconds (user + system, every process and thread of the proxy) per unit"
        " of work, medians; ratio columns: median of per-round ratios to the most"
        " frugal peer in that round\n"
    )
    print(
        "| workload | CPU s per | "
        + " | ".join(shown)
        + " | "
        + " | ".join(f"{n} / most frugal" for n in ours)
        + " |"
    )
    print("|---" * (len(shown) + len(ours) + 2) + "|")
    for w in workloads:
        unit, per = WORK_UNITS[w]
        scaled = {n: [None if v is None else v * per for v in cpu[w][n]] for n in shown}
        row = [w, unit] + [fmt(medianOrNone(scaled[n]), 3) for n in shown]
        row += [fmt(bestPeerRatios(scaled, n, False)) for n in ours]
        print("| " + " | ".join(row) + " |")


def printMachineTable(workloads, names, cpu, system, machine):
    """
    What bounds a rate on a machine whose cores the load tool, the backend
    and the proxy share: per unit of work, the whole machine's busy CPU
    (every process and kernel thread) and each proxy's own CPU and its
    system part (its kernel work: the system calls and the TCP stack under
    them).  Where the cores are all busy the rate is about the inverse of
    the machine's CPU per unit, so the last column bounds portproxy's rate
    over the best peer's: the best peer's machine CPU per unit over
    portproxy's less portproxy's user time, the rate it would reach if its
    own code cost nothing.
    """
    shown = [n for n in names if n in PIDS or n == "direct"]
    print(
        "\nPer unit of work (ms per GB; µs per request, connection or round trip),"
        " medians: the whole machine's busy CPU (every process: load tool,"
        " backend, proxy, kernel threads) / the proxy's CPU / its system part."
        " Last column: portproxy's rate over the best peer's if its user time"
        " were zero (the best peer's machine CPU over portproxy's less its user"
        " CPU; median of per-round figures)\n"
    )
    print(
        "| workload | " + " | ".join(shown) + " | portproxy, no user time / best peer |"
    )
    print("|---" * (len(shown) + 2) + "|")
    for w in workloads:
        # seconds per GB or per item (what measureWork counts) -> ms per
        # GB or µs per item
        scale = 1e3 if WORK_UNITS[w][0] == "GB" else 1e6

        def cell(n, w=w, scale=scale):
            parts = [medianOrNone(table[w][n]) for table in (machine, cpu, system)]
            return " / ".join(fmt(None if v is None else v * scale, 1) for v in parts)

        bounds = []
        ours = machine[w].get("portproxy", [])
        for r, total in enumerate(ours):
            proxy, kernel = cpu[w]["portproxy"][r], system[w]["portproxy"][r]
            peers = [
                values[r]
                for peer, values in machine[w].items()
                if isPeer(peer) and peer in PIDS and values[r]
            ]
            if total and proxy is not None and kernel is not None and peers:
                bounds.append(min(peers) / (total - (proxy - kernel)))
        print(
            "| "
            + " | ".join([w] + [cell(n) for n in shown] + [fmt(medianOrNone(bounds))])
            + " |"
        )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "-w",
        "--workloads",
        default=",".join(w for w in WORKLOADS if w != "tcp_bulk8"),
        help="comma list of " + ", ".join(WORKLOADS),
    )
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-s", "--seconds", type=int, default=3)
    ap.add_argument(
        "--peers",
        default="docker-proxy,socat,haproxy,nginx",
        help="comma list of docker-proxy, socat, haproxy, nginx, and"
        " portproxy-python (portproxy with PORTPROXY_FASTPATH=0),"
        " portproxy-nospin (the engines' busy-poll off)",
    )
    ap.add_argument(
        "--engine-threads",
        default="",
        help="comma list of engine thread counts: one portproxy column each,"
        f" started with {ENGINE_THREADS}=N (the TCP engine's relay threads)",
    )
    ap.add_argument(
        "--baseline",
        default="",
        help="another checkout of portproxy (its extensions built in place):"
        " a portproxy-base column importing it through PYTHONPATH, for A/B runs",
    )
    ap.add_argument(
        "--machine",
        action="store_true",
        help="also the whole machine's CPU per unit of work, the proxies'"
        " system part, and what portproxy would reach with no user time",
    )
    ap.add_argument(
        "--access",
        action="store_true",
        help="also portproxy with a 1,000-entry deny list and per-client limits",
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="with --access: the second portproxy without them (an A/A run: the noise)",
    )
    ap.add_argument(
        "--idle",
        type=int,
        default=2000,
        help="idle connections for the memory figure; 0 skips it",
    )
    ap.add_argument(
        "--scale",
        type=int,
        default=1000,
        help="listeners per protocol for the start-up figure; 0 skips it",
    )
    a = ap.parse_args()
    workloads = [w for w in a.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w}")
    engineThreads = [int(n) for n in a.engine_threads.split(",") if n]
    missing = sorted({needs(w) for w in workloads if not shutil.which(needs(w))})
    if missing:
        raise SystemExit(
            f"missing load tools: {', '.join(missing)} (../shared/bench/install-peers installs them)"
        )
    procs, ports = Processes(), Ports()
    tmp = tempfile.mkdtemp(prefix="portproxy-peers-")
    try:
        backend = startBackends(procs, ports, tmp)
        front = startPeers(
            procs,
            ports,
            tmp,
            backend,
            a.peers.split(","),
            a.access,
            a.control,
            engineThreads,
            a.baseline,
        )
        names = list(front)
        results = {w: {n: [] for n in names} for w in workloads}
        # CPU seconds of each proxy per unit of work counted by measureWork:
        # unlike a rate, hardly moved by what else the machine runs.
        cpu = {w: {n: [] for n in names} for w in workloads}
        # The whole machine's busy CPU seconds per unit (load tool, backend,
        # proxy, kernel threads), and the proxy's system part: --machine.
        machine = {w: {n: [] for n in names} for w in workloads}
        system = {w: {n: [] for n in names} for w in workloads}
        for r in range(a.rounds):
            for w in workloads:
                # Every other round in reverse: a run leaves thousands of
                # TIME_WAIT sockets on loopback that slow the next run's
                # connects, and no peer should always come after another.
                for name in names if r % 2 == 0 else names[::-1]:
                    port = front[name].get(WORKLOADS[w][2])
                    before = peerCPU(name) if port else None
                    beforeSystem = peerCPU(name, systemSeconds) if port else None
                    beforeMachine = machineBusySeconds()
                    value, work = (
                        measureWork(w, port, a.seconds) if port else (None, None)
                    )
                    results[w][name].append(value)
                    busy = machineBusySeconds() - beforeMachine
                    after = peerCPU(name) if before is not None else None
                    afterSystem = peerCPU(name, systemSeconds) if port else None
                    cpu[w][name].append(
                        (after - before) / work if after is not None and work else None
                    )
                    machine[w][name].append(busy / work if work else None)
                    system[w][name].append(
                        (afterSystem - beforeSystem) / work
                        if afterSystem is not None and work
                        else None
                    )
                    print(f"round {r + 1} {w:15s} {name:13s} {value}", file=sys.stderr)
    finally:
        procs.stopAll()
    printTable(a, workloads, names, results)
    printCPUTable(a, workloads, names, cpu)
    if a.machine:
        printMachineTable(workloads, names, cpu, system, machine)
    if a.access:
        print(
            "\nportproxy CPU time per request (user + system, all threads), medians;"
            " last column: median of per-round ratios\n"
        )
        print(
            "| workload | portproxy, us | portproxy+access, us | portproxy+access / portproxy |\n|---|---|---|---|"
        )
        for w in workloads:
            pairs = [
                (p, c)
                for p, c in zip(
                    cpu[w]["portproxy"], cpu[w]["portproxy+access"], strict=False
                )
                if p and c and WORKLOADS[w][2] == "http"
            ]
            if pairs:
                plain = statistics.median(p for p, _ in pairs)
                checked = statistics.median(c for _, c in pairs)
                ratio = statistics.median(c / p for p, c in pairs)
                print(
                    f"| {w} | {plain * 1e6:.1f} | {checked * 1e6:.1f} | {ratio:.3f} |"
                )
    footprint = []
    if a.idle:
        idle = idleMemory(ports, tmp, a.idle)
        footprint.append(
            (
                f"RSS per idle TCP connection ({a.idle} open), KiB",
                idle.get("docker-proxy"),
                idle.get("portproxy"),
            )
        )
    if a.scale:
        scale = manyListeners(ports, tmp, a.scale)
        docker = scale.get("docker-proxy", (None, None))
        footprint.append(
            (
                f"RSS of {a.scale} TCP + {a.scale} UDP listeners, MiB",
                docker[1],
                scale["portproxy"][1],
            )
        )
        footprint.append(
            ("start-up of those listeners, s", docker[0], scale["portproxy"][0])
        )
    if footprint:
        print(
            "\n| footprint | docker-proxy | portproxy | portproxy / docker-proxy |\n|---|---|---|---|"
        )
        for label, docker, ours in footprint:
            ratio = f"{ours / docker:.3f}" if docker else "-"
            print(
                f"| {label} | {'-' if docker is None else f'{docker:.2f}'} | {ours:.2f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
