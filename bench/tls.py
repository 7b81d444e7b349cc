#!/usr/bin/env python3
"""
portproxy's TLS termination side by side with nginx `stream` (`listen ...
ssl`, `ssl_certificate`) and HAProxy (`bind ... ssl crt`), in one run.

    python bench/tls.py                   # 3 rounds of 5 s per workload
    python bench/tls.py -r 5 -s 5 --profile /tmp/tls.prof

Each proxy terminates TLS with the same ECDSA P-256 certificate and relays
the cleartext to one nginx HTTP backend on loopback; wrk is the client.
Workloads:

  - tls_handshake: wrk -c32 with "Connection: close": a new TCP connection
    and a full TLS handshake per request (wrk does not resume sessions).
  - tls_keepalive: wrk -c32, small responses over kept-alive TLS
    connections (req/s).
  - tls_bulk: wrk -c4 fetching a 1 MiB body over kept-alive TLS
    connections (Gbit/s of response body).

nginx runs one worker and HAProxy one thread by default, and portproxy its
default (one Python thread, and TLS engine threads one per CPU);
--threads N gives nginx N workers, HAProxy N threads and portproxy N
engine threads (PORTPROXY_ENGINE_THREADS=N), for a run at equal counts.
All three offer TLS 1.2 and 1.3 (nginx 1.22's default is TLS 1.2 only, so
its map says `ssl_protocols TLSv1.2 TLSv1.3`), and the run prints the
protocol each negotiates.  wrk resumes its TLS sessions (it keeps each
connection's session across reconnects), so tls_handshake measures
resumed TLS 1.3 handshakes (PSK with an X25519 exchange, no certificate
signature); `openssl s_time -new` is what measures full handshakes.
Workloads run through each proxy in turn, round after round,
so that machine drift hits all alike; the table gives medians and
portproxy's ratio to the faster peer (median of the per-round ratios).
--profile FILE runs portproxy under cProfile (twistd --profile) and saves
the stats at exit (the figures of that run are lower: say so).  Run it
from the project's venv; `../shared/bench/install-peers` (root) installs
wrk, nginx and HAProxy.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import TWISTD, Ports, waitTCP
from peers import nginxStreamHead, nginxStreamModule
from processes import Processes

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
)
from certs import Authority

WORKLOADS = {
    "tls_handshake": ("conn/s", ["-H", "Connection: close", "-c32"], "/"),
    "tls_keepalive": ("req/s", ["-c32"], "/"),
    "tls_bulk": ("Gbit/s", ["-c4"], "/big"),
}
PEERS = ("nginx", "haproxy", "portproxy")
BIG = 1 << 20


def startBackend(procs, ports, tmp):
    port = ports.take()
    # nginx's worker runs as nobody: it must be able to read the body.
    os.chmod(tmp, 0o755)
    with open(os.path.join(tmp, "big"), "wb") as f:
        f.write(os.urandom(BIG))
    os.chmod(os.path.join(tmp, "big"), 0o644)
    conf = os.path.join(tmp, "http.conf")
    with open(conf, "w") as f:
        f.write(
            f"worker_processes 1; daemon off; pid {tmp}/http.pid; error_log {tmp}/http.err;\n"
            "events { worker_connections 20000; }\n"
            "http { access_log off; keepalive_requests 1000000; sendfile on;\n"
            f"  server {{ listen 127.0.0.1:{port}; root {tmp};\n"
            '    location = / { return 200 "hello\\n"; } } }\n'
        )
    procs.start(["nginx", "-c", conf])
    waitTCP(port)
    return port


def cpuSeconds(pid):
    """
    User and system CPU seconds of process C{pid} and its children so far.
    """
    total = 0.0
    children = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True
    ).stdout.split()
    for one in [pid, *map(int, children)]:
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def startProxies(procs, ports, tmp, backend, cert, key, profile, threads=None):
    """
    The three proxies: name -> (front port, pid).  C{threads}: nginx's
    workers, HAProxy's threads and portproxy's TLS engine threads (None:
    one, one, and portproxy's default).
    """
    front = {}
    combined = os.path.join(tmp, "combined.pem")
    with open(combined, "wb") as f:
        f.write(Path(cert).read_bytes() + Path(key).read_bytes())
    if shutil.which("nginx") and nginxStreamModule():
        front["nginx"] = ports.take()
        conf = os.path.join(tmp, "stream.conf")
        with open(conf, "w") as f:
            f.write(
                nginxStreamHead(tmp, threads or 1)
                + f"  server {{ listen 127.0.0.1:{front['nginx']} ssl; ssl_certificate {cert};"
                f" ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;"
                f" proxy_pass 127.0.0.1:{backend}; }}\n}}\n"
            )
        front["nginx"] = (front["nginx"], procs.start(["nginx", "-c", conf]).pid)
    if shutil.which("haproxy"):
        front["haproxy"] = ports.take()
        conf = os.path.join(tmp, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(
                f"global\n  maxconn 8000\n  nbthread {threads or 1}\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n"
                f"listen tls\n  bind 127.0.0.1:{front['haproxy']} ssl crt {combined}\n"
                f"  server s 127.0.0.1:{backend}\n"
            )
        front["haproxy"] = (
            front["haproxy"],
            procs.start(["haproxy", "-f", conf, "-db"]).pid,
        )
    front["portproxy"] = ports.take()
    mapPath = os.path.join(tmp, "portproxy.yaml")
    with open(mapPath, "w") as f:
        f.write(
            f"mappings:\n  - name: tls\n    listen: 127.0.0.1:{front['portproxy']}\n"
            f"    target: 127.0.0.1:{backend}\n    tls: {{cert: {cert}, key: {key}}}\n"
        )
    extra = (
        [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        if profile
        else []
    )
    with open(os.path.join(tmp, "portproxy.log"), "w") as log:
        portproxy = procs.start(
            [*TWISTD, "-n", "--pidfile=", *extra, "portproxy", "-c", mapPath],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PORTPROXY_ENGINE_THREADS": str(threads)}
            if threads
            else None,
        )
    front["portproxy"] = (front["portproxy"], portproxy.pid)
    for port, _ in front.values():
        waitTCP(port)
    return front, portproxy


def negotiated(port):
    """
    What a proxy negotiates with OpenSSL's client: "New, TLSv1.3, Cipher
    is ...".
    """
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"],
        input=b"GET / HTTP/1.0\r\n\r\n",
        capture_output=True,
        timeout=10,
    ).stdout.decode(errors="replace")
    return next((x for x in out.splitlines() if x.startswith("New,")), "?")


def measure(workload, port, pid, seconds):
    """
    C{(rate, proxy CPU per unit of work)}: conn/s or req/s and CPU
    milliseconds per connection or request, or Gbit/s and CPU seconds per
    GB; C{(None, None)} when wrk failed.
    """
    before = cpuSeconds(pid)
    rate = _wrk(workload, port, seconds)
    used = cpuSeconds(pid) - before
    if not rate:
        return None, None
    if workload == "tls_bulk":
        return rate, used / (rate * seconds / 8)
    return rate, 1000 * used / (rate * seconds)


def _wrk(workload, port, seconds):
    _unit, flags, path = WORKLOADS[workload]
    try:
        out = subprocess.run(
            ["wrk", "-t1", *flags, f"-d{seconds}", f"https://127.0.0.1:{port}{path}"],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        ).stdout
    except subprocess.TimeoutExpired:
        return None
    if workload == "tls_bulk":
        found = re.search(r"Transfer/sec:\s+([\d.]+)([KMG])B", out)
        if not found:
            return None
        # wrk's KB, MB and GB are binary
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}[found.group(2)]
        return float(found.group(1)) * scale * 8 / 1e9
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found or "Non-2xx" in out:
        return None
    return float(found.group(1))


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-s", "--seconds", type=int, default=5)
    ap.add_argument("-w", "--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--profile", help="run portproxy under cProfile, stats saved here")
    ap.add_argument(
        "--threads",
        type=int,
        help="nginx workers, HAProxy threads and portproxy TLS engine threads",
    )
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="portproxy-tls-bench-")
    try:
        ca = Authority(os.path.join(tmp, "pki"))
        cert, key = ca.issue("server", "localhost", ("localhost", "127.0.0.1"))
        ports = Ports()
        backend = startBackend(procs, ports, tmp)
        front, portproxy = startProxies(
            procs, ports, tmp, backend, str(cert), str(key), args.profile, args.threads
        )
        for peer, (port, _) in front.items():
            print(f"{peer}: {negotiated(port)}", file=sys.stderr)
        results = {(w, p): [] for w in workloads for p in front}
        costs = {(w, p): [] for w in workloads for p in front}
        for turn in range(args.rounds):
            for workload in workloads:
                for peer, (port, pid) in front.items():
                    value, cost = measure(workload, port, pid, args.seconds)
                    results[workload, peer].append(value)
                    if cost is not None:
                        costs[workload, peer].append(cost)
                    print(
                        f"round {turn + 1} {workload:14} {peer:10} {value} cost {cost}",
                        file=sys.stderr,
                    )
        print(
            f"\n{'workload':14} {'unit':7} "
            + " ".join(f"{p:>10}" for p in front)
            + "  portproxy/faster peer"
        )
        for workload in workloads:
            unit = WORKLOADS[workload][0]
            medians = {}
            for peer in front:
                values = [v for v in results[workload, peer] if v is not None]
                medians[peer] = statistics.median(values) if values else None
            ratios = []
            for i in range(args.rounds):
                ours = results[workload, "portproxy"][i]
                peersBest = max(
                    (
                        results[workload, p][i]
                        for p in front
                        if p != "portproxy" and results[workload, p][i] is not None
                    ),
                    default=None,
                )
                if ours is not None and peersBest:
                    ratios.append(ours / peersBest)
            cells = " ".join(
                f"{medians[p]:>10.{3 if unit == 'Gbit/s' else 0}f}"
                if medians[p] is not None
                else f"{'-':>10}"
                for p in front
            )
            ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
            print(f"{workload:14} {unit:7} {cells}  {ratio}")
        # On a shared machine the rates follow each process's share of the
        # CPU; the CPU each proxy spends per unit of work does much less.
        print(
            f"\n{'proxy CPU per':14} {'unit':7} "
            + " ".join(f"{p:>10}" for p in front)
            + "  portproxy/cheaper peer"
        )
        for workload in workloads:
            unit = (
                "s/GB"
                if workload == "tls_bulk"
                else "ms/" + WORKLOADS[workload][0].split("/")[0]
            )
            medians = {
                p: statistics.median(costs[workload, p]) if costs[workload, p] else None
                for p in front
            }
            cells = " ".join(
                f"{medians[p]:>10.3f}" if medians[p] is not None else f"{'-':>10}"
                for p in front
            )
            others = [medians[p] for p in front if p != "portproxy" and medians[p]]
            ratio = (
                f"{medians['portproxy'] / min(others):.2f}x"
                if others and medians["portproxy"]
                else "-"
            )
            print(f"{workload:14} {unit:7} {cells}  {ratio}")
    finally:
        if args.profile and portproxy.poll() is None:
            # twistd writes the profile when it stops cleanly.
            portproxy.terminate()
            portproxy.wait(30)
        procs.stopAll()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
