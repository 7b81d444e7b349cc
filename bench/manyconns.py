#!/usr/bin/env python3
"""
Many connections through portproxy, HAProxy and nginx stream, on loopback.

    python bench/manyconns.py                       # 10,000 (or what fits), 5,000 req/s, 10 s
    python bench/manyconns.py -n 5000 --rate 10000 --seconds 5
    python bench/manyconns.py --proxies portproxy,nginx --idle-only

For each proxy in turn, alone on the machine's loopback (a fresh process
each time, so that one's memory does not colour the next):

- kept-alive: C{connload rr} (bench/connload.c, compiled here with gcc)
  opens N connections from the source addresses 127.0.0.2, 127.0.0.3, ...,
  sends one request on each (not timed), then sends --rate requests a
  second in total over them for --seconds, and gives the reply latency
  percentiles and how many 100 ms windows of the run hold a reply slower
  than the p99 (a few: a stall; many: a spread tail); the proxy's RSS (every process of it) is sampled every
  0.2 s and the highest kept, and its CPU time (every process and
  thread) while the rate runs is divided by the replies;
- idle: C{connload idle} opens N connections and holds them: the proxy's
  RSS growth per connection once it holds all of them (its open fds are
  polled until they reach 2N), and again after one request and reply on
  each.

The server behind every proxy is nginx answering "hello\\n".  The proxies
are portproxy (compiled paths), portproxy-python (PORTPROXY_FASTPATH=0),
portproxy-nospin (compiled, the engines' busy-poll off; only when
named in --proxies),
HAProxy (2.6, one process, its default threads) and nginx stream (one
worker).  RLIMIT_NOFILE is raised to its hard limit here, and the proxies
inherit it; a proxy holds two descriptors per connection (client side and
server side), so N is capped at (hard limit - 200) / 2, and the cap is
printed.  Run it from the project's venv.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from _common import TWISTD, Ports, waitTCP
from peers import TWISTD_NOSPIN, nginxStreamModule, rssKiB, startHTTP, treeCPU, treeSum
from processes import Processes

HERE = os.path.dirname(os.path.abspath(__file__))


def compileLoad(tmp):
    binary = os.path.join(tmp, "connload")
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-o",
            binary,
            os.path.join(HERE, "connload.c"),
        ],
        check=True,
    )
    return binary


def treeRSS(pid):
    """
    Resident KiB of C{pid} and every process below it.
    """
    return treeSum(pid, rssKiB)


def treeFDs(pid):
    """
    Open descriptors of C{pid} and every process below it.
    """
    return treeSum(pid, lambda p: len(os.listdir(f"/proc/{p}/fd")))


def startProxy(procs, tmp, name, port, target, count):
    """
    Proxy C{name} from 127.0.0.1:C{port} to 127.0.0.1:C{target}, sized
    for C{count} connections: its root pid.
    """
    if name.startswith("portproxy"):
        path = os.path.join(tmp, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(
                f"mappings:\n  - name: many\n    listen: 127.0.0.1:{port}\n"
                f"    target: 127.0.0.1:{target}\n"
            )
        env = dict(os.environ)
        if name == "portproxy-python":
            env["PORTPROXY_FASTPATH"] = "0"
        twistd = TWISTD_NOSPIN if name == "portproxy-nospin" else TWISTD
        with open(os.path.join(tmp, f"{name}.log"), "w") as log:
            return procs.start(
                [*twistd, "-n", "--pidfile=", "portproxy", "-c", path],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            ).pid
    if name == "haproxy":
        path = os.path.join(tmp, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(
                f"global\n  maxconn {count + 50}\ndefaults\n  mode tcp\n  maxconn {count + 50}\n"
                "  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n"
                f"listen many\n  bind 127.0.0.1:{port}\n  server s 127.0.0.1:{target}\n"
            )
        with open(os.path.join(tmp, "haproxy.log"), "w") as log:
            return procs.start(
                ["haproxy", "-f", path, "-db"], stdout=log, stderr=subprocess.STDOUT
            ).pid
    path = os.path.join(tmp, "stream.conf")
    with open(path, "w") as f:
        f.write(
            f"load_module {nginxStreamModule()};\nworker_processes 1; daemon off;\n"
            f"pid {tmp}/stream.pid; error_log {tmp}/stream.err;\n"
            f"events {{ worker_connections {2 * count + 100}; }}\n"
            f"stream {{ server {{ listen 127.0.0.1:{port} backlog=4096;"
            f" proxy_pass 127.0.0.1:{target}; }} }}\n"
        )
    return procs.start(["nginx", "-c", path]).pid


def keptAlive(load, pid, port, a):
    """
    The rr run through C{port}: connload's JSON, plus the proxy's highest
    RSS during it, in MiB, and its CPU time per request while the rate
    ran, in microseconds.
    """
    argv = [load, "rr", str(port), str(a.connections), str(a.sources)]
    run = subprocess.Popen(
        [*argv, str(a.rate), str(a.seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = run.stdout.readline().strip() == "timing"
    cpu = treeCPU(pid) if started and pid else None
    peak = 0
    while run.poll() is None:
        peak = max(peak, treeRSS(pid)) if pid else 0
        time.sleep(0.2)
    used = treeCPU(pid) - cpu if cpu is not None else None
    out, err = run.communicate()
    if run.returncode or not started:
        return {"error": f"exit {run.returncode}: " + err.strip()[-300:]}
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_mib"] = round(peak / 1024, 1) if pid else None
    result["cpu_us_per_request"] = (
        round(used * 1e6 / result["replies"], 1)
        if used is not None and result["replies"]
        else None
    )
    return result


def idle(load, pid, port, a):
    """
    The proxy's RSS growth per held connection, in KiB: C{(connected,
    after one exchange)}.
    """
    before = treeRSS(pid)
    run = subprocess.Popen(
        [load, "idle", str(port), str(a.connections), str(a.sources)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if run.stdout.readline().strip() != "connected":
            return {"error": run.stderr.read().strip()[-300:]}
        deadline = time.monotonic() + 60
        while treeFDs(pid) < 2 * a.connections and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        connected = treeRSS(pid)
        fds = treeFDs(pid)
        run.stdin.write("go\n")
        run.stdin.flush()
        exchanged = run.stdout.readline().split()
        time.sleep(1)
        after = treeRSS(pid)
        run.stdin.write("done\n")
        run.stdin.flush()
        run.wait(30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    n = a.connections
    return {
        "proxy_fds": fds,
        "rss_base_mib": round(before / 1024, 1),
        "kib_per_conn_connected": round((connected - before) / n, 2),
        "kib_per_conn_after_exchange": round((after - before) / n, 2),
        "exchange_errors": int(exchanged[1]) if len(exchanged) > 1 else None,
    }


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--sources", type=int, default=10, help="127.0.0.2 onwards")
    ap.add_argument("--rate", type=float, default=5000, help="requests/s in total")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument(
        "--proxies", default="direct,portproxy,portproxy-python,haproxy,nginx"
    )
    ap.add_argument("--idle-only", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cap = (hard - 200) // 2
    if a.connections > cap:
        print(
            f"RLIMIT_NOFILE hard limit {hard} (not raisable here): a proxy holds 2"
            f" descriptors a connection, so {a.connections} -> {cap} connections",
            file=sys.stderr,
        )
        a.connections = cap
    tmp = tempfile.mkdtemp(prefix="portproxy-many-")
    load = compileLoad(tmp)
    ports = Ports()
    results = {}
    backend = Processes()
    try:
        target = ports.take()
        startHTTP(backend, tmp, [f"127.0.0.1:{target} backlog=4096"])
        waitTCP(target)
        for name in a.proxies.split(","):
            if name == "haproxy" and not shutil.which("haproxy"):
                continue
            if name == "nginx" and not nginxStreamModule():
                continue
            results[name] = {}
            for test in ("idle",) if a.idle_only else ("kept-alive", "idle"):
                procs = Processes()
                try:
                    if name == "direct":
                        if test == "idle":
                            continue
                        pid, port = None, target
                    else:
                        port = ports.take()
                        pid = startProxy(procs, tmp, name, port, target, a.connections)
                        waitTCP(port)
                        time.sleep(0.5)
                    if test == "idle":
                        results[name][test] = idle(load, pid, port, a)
                    else:
                        results[name][test] = keptAlive(load, pid, port, a)
                finally:
                    procs.stopAll()
                print(name, test, json.dumps(results[name][test]), file=sys.stderr)
                # let the TIME_WAIT and closing sockets of this run go first
                time.sleep(2)
    finally:
        backend.stopAll()
    n = a.connections
    print(
        f"\n{n} connections from {a.sources} source addresses;"
        f" kept-alive: {a.rate:.0f} req/s for {a.seconds:.0f} s\n"
    )
    print(
        "| proxy | replies/s | p50 us | p99 us | p99.9 us | proxy CPU us/request |"
        " RSS under load MiB | KiB/conn idle | KiB/conn after 1 request | generator CPU % |"
        " 100 ms windows with a reply slower than p99 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        k, i = r.get("kept-alive", {}), r.get("idle", {})

        def cell(d, key):
            v = d.get(key)
            return "-" if v is None else f"{v:g}" if isinstance(v, int) else f"{v:.1f}"

        load = (
            f"{100 * k['generator_cpu_s'] / k['seconds']:.0f}"
            if "generator_cpu_s" in k
            else "-"
        )
        slow = f"{k['slow_windows']} of {k['windows']}" if "slow_windows" in k else "-"
        print(
            f"| {name} | {cell(k, 'rate')} | {cell(k, 'p50_us')} | {cell(k, 'p99_us')}"
            f" | {cell(k, 'p999_us')} | {cell(k, 'cpu_us_per_request')} | {cell(k, 'rss_mib')}"
            f" | {i.get('kib_per_conn_connected', '-')} | {i.get('kib_per_conn_after_exchange', '-')}"
            f" | {load} | {slow} |"
        )
    errors = {n: r for n, r in results.items() if any("error" in v for v in r.values())}
    if errors:
        print("\nerrors:", json.dumps(errors))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"connections": n, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
