#!/usr/bin/env python3
"""
Docker's own docker-proxy against the portproxy shim, with a real dockerd.

    python bench/docker.py                 # 1000-port range, 3 rounds of 3 s
    python bench/docker.py --range 1000 -r 5 -s 5

One run, one dockerd at a time (only one can own docker0): dockerd with
userland-proxy-path = Debian's /usr/sbin/docker-proxy, and dockerd with
userland-proxy-path = this checkout's shim and one portproxy daemon.
Each dockerd is the tests' sandbox (tests/test_docker_e2e.py): state in a
temporary directory, bridge on 198.18.0.0/24, no iptables, no forwarding;
traffic goes to 127.0.0.1 and that bridge only.  Measured:

- each proxy's own start-up: from posix_spawn to its "0\\n" on
  descriptor 3, spawned as dockerd spawns it (median of 100);
- round by round, a dockerd of each kind in turn (and a third whose
  "proxy" only reports 0 and waits: what dockerd itself costs): the wall
  time of
  `docker run -d -p 127.0.0.1:20000-20999:20000-20999` (the next free
  block of ports if some are taken), and the resident memory (RSS, and
  PSS, which divides shared pages among the processes sharing them) of
  everything that serves those ports: every docker-proxy process, or
  every shim plus the portproxy daemon;
- tcp_bulk (iperf3) and http_keepalive (wrk -c32, nginx answering
  "hello") through one published port of a container: docker-proxy's,
  then, interleaved round by round, the shim's, a hand-written map entry
  of the same portproxy daemon to the same container port, and direct.

Needs root, dockerd (docker.io), busybox-static, iperf3, wrk and nginx
(../shared/bench/install-peers installs the last three).  Run it from the
project's venv.  Prints the table docs/PERFORMANCE.md quotes.
"""

import argparse
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import TWISTD, freeRange, waitTCP
from processes import Processes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from twistedproxy.control import shimPath  # noqa: E402 (the checkout is on sys.path only now)

DOCKER = (
    "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
)
DOCKER_PROXY = "/usr/sbin/docker-proxy"
IMAGE = "local/bench"
#: A userland proxy that only reports success and waits: what dockerd
#: itself costs to publish a range, without any proxy's own work.
NULL_PROXY = r"""
#include <unistd.h>
int main(void) { if (write(3, "0\n", 2) == 2) close(3); pause(); return 0; }
"""
NGINX_CONF = """user root; worker_processes 1; daemon off; pid /tmp/nginx.pid;
error_log /tmp/nginx.err; events { worker_connections 20000; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path /tmp; proxy_temp_path /tmp; fastcgi_temp_path /tmp;
  uwsgi_temp_path /tmp; scgi_temp_path /tmp;
  server { listen 80; location / { return 200 "hello\\n"; } } }
"""


def rssKiB(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pssKiB(pid):
    """
    Proportional set size: each shared page divided among the processes
    that map it, so that a sum over processes is the memory they take.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(parent, exe):
    """
    Pids of the processes of C{exe} whose parent is C{parent}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == parent and os.readlink(f"/proc/{entry}/exe") == exe:
                found.append(int(entry))
        except OSError:
            continue
    return found


class Dockerd:
    """
    A sandboxed dockerd whose userland proxy is C{proxyPath}.
    """

    #: The last one started, stopped (with its containers) at exit.
    current = None

    def __init__(self, root, proxyPath, control, processes):
        self.root = root
        self.sock = root / "docker.sock"
        self.proxyPath = proxyPath
        config = {
            "bip": "198.18.0.1/24",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "storage-driver": "vfs",
            "data-root": str(root / "data"),
            "exec-root": str(root / "exec"),
            "pidfile": str(root / "docker.pid"),
            "hosts": [f"unix://{self.sock}"],
            "userland-proxy-path": proxyPath,
        }
        (root / "daemon.json").write_text(json.dumps(config))
        env = dict(os.environ, PORTPROXY_CONTROL=control)
        with open(root / "dockerd.log", "ab") as log:
            self.process = processes.start(
                ["/usr/sbin/dockerd", "--config-file", str(root / "daemon.json")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes = processes
        Dockerd.current = self
        deadline = time.monotonic() + 60
        while self.run("version", check=False).returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                sys.exit(f"dockerd did not start; see {root}/dockerd.log")
            time.sleep(0.2)

    def run(self, *args, check=True, input=None):
        result = subprocess.run(
            [DOCKER, "-H", f"unix://{self.sock}", *args],
            input=input,
            capture_output=True,
            timeout=600,
        )
        if check and result.returncode != 0:
            sys.exit(f"docker {' '.join(args)}: {result.stderr.decode()}")
        return result

    def stop(self):
        if self.process.poll() is None:
            # Their containerd shims would outlive dockerd.
            ids = self.run("ps", "-aq", check=False).stdout.split()
            if ids:
                self.run("rm", "-f", *[i.decode() for i in ids], check=False)
        self.processes.stop(self.process)
        if os.path.exists("/sys/class/net/docker0"):
            subprocess.run(["ip", "link", "delete", "docker0"], check=False)


def buildImage(docker, root):
    """
    C{local/bench}: busybox, iperf3 and nginx with the libraries they link.
    """
    image = root / "image"
    for d in ("bin", "tmp", "etc", "var/log/nginx", "var/lib/nginx"):
        (image / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", image / "bin" / "busybox")
    for name in ("sh", "sleep"):
        os.symlink("busybox", image / "bin" / name)
    for binary in ("/usr/bin/iperf3", "/usr/sbin/nginx"):
        libs = re.findall(
            r"(/\S+\.so[\S]*)",
            subprocess.run(["ldd", binary], capture_output=True, text=True).stdout,
        )
        for path in [binary, *libs]:
            target = image / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.realpath(path), target)
    (image / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (image / "etc" / "group").write_text("root:x:0:\n")
    (image / "nginx.conf").write_text(NGINX_CONF)
    tar = subprocess.run(
        ["tar", "-C", str(image), "-c", "."], capture_output=True, check=True
    )
    docker.run("import", "-", IMAGE, input=tar.stdout)


def measure(workload, host, port, seconds):
    if workload == "tcp_bulk":
        out = subprocess.run(
            ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        ).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}", f"http://{host}:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def proxyStartMs(path, port, target, control, count):
    """
    Median ms from spawning C{path} as dockerd does (posix_spawn, the
    report pipe on descriptor 3) to its "0\\n", for C{count} runs; each
    is stopped with SIGTERM before the next.
    """
    times = []
    env = dict(os.environ, PORTPROXY_CONTROL=control)
    argv = [
        path,
        "-proto",
        "tcp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        str(port),
        "-container-ip",
        target,
        "-container-port",
        "80",
    ]
    for _ in range(count):
        readEnd, writeEnd = os.pipe()
        started = time.perf_counter()
        pid = os.posix_spawn(
            path, argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, writeEnd, 3)]
        )
        os.close(writeEnd)
        with os.fdopen(readEnd, "rb") as pipe:
            report = pipe.read(2)
        times.append((time.perf_counter() - started) * 1000)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        if report != b"0\n":
            sys.exit(f"{path} reported {report!r}")
    return statistics.median(times)


def rangeRound(docker, first, count, servers, listening=True):
    """
    One `docker run` with a range of C{count} ports from C{first} (or the
    next free block): its seconds, and the RSS and PSS (KiB) and number of
    the processes serving the range.
    """
    first = freeRange(count, first)
    spec = f"127.0.0.1:{first}-{first + count - 1}:{first}-{first + count - 1}"
    started = time.perf_counter()
    docker.run("run", "-d", "--name", "range", "-p", spec, IMAGE, "sleep", "1000")
    seconds = time.perf_counter() - started
    if listening:
        waitTCP(first + count - 1)
    pids = servers()
    rss = sum(rssKiB(pid) for pid in pids)
    pss = sum(pssKiB(pid) for pid in pids)
    docker.run("rm", "-f", "range")
    print(
        f"  range: {seconds:.2f} s, {len(pids)} processes, RSS {rss / 1024:.1f} MiB,"
        f" PSS {pss / 1024:.1f} MiB",
        file=sys.stderr,
    )
    return seconds, rss, pss, len(pids)


def throughput(paths, rounds, seconds):
    """
    Medians per workload and path; C{paths} maps a name to (host, port)
    per workload.  Paths are interleaved in every round.
    """
    results = {w: {name: [] for name in paths} for w in ("tcp_bulk", "http_keepalive")}
    for r in range(rounds):
        for w in results:
            for name, where in paths.items():
                host, port = where[w]
                value = measure(w, host, port, seconds)
                results[w][name].append(value)
                print(f"  round {r + 1} {w} {name}: {value:.2f}", file=sys.stderr)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--range", type=int, default=1000, help="ports in the range (1000)"
    )
    parser.add_argument(
        "--first", type=int, default=20000, help="its first port (20000)"
    )
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("-s", "--seconds", type=int, default=3)
    arguments = parser.parse_args()
    shim = shimPath()
    for need in (DOCKER_PROXY, shim, "/usr/sbin/dockerd", "/bin/busybox"):
        if not os.path.exists(need):
            sys.exit(f"missing {need}")
    processes = Processes()
    root = Path(tempfile.mkdtemp(prefix="ppbench-"))
    control = str(root / "control.sock")
    proxies = {"docker-proxy": DOCKER_PROXY, "portproxy": shim}
    nullProxy = str(root / "null-proxy")
    (root / "null-proxy.c").write_text(NULL_PROXY)
    subprocess.run(
        ["gcc", "-O2", "-static", "-o", nullProxy, str(root / "null-proxy.c")],
        check=True,
    )
    ranges = {name: [] for name in [*proxies, "null"]}
    try:
        mapPath = root / "map.yaml"
        mapPath.write_text(f"mappings: []\ncontrol:\n  socket: {control}\n")
        with open(root / "portproxy.log", "wb") as log:
            daemon = processes.start(
                [*TWISTD, "-n", "--pidfile=", "portproxy", "-c", str(mapPath)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while not os.path.exists(control):
            time.sleep(0.05)
        freePort = freeRange(10, arguments.first + arguments.range + 10)
        startMs = {
            name: proxyStartMs(path, freePort, "198.18.0.99", control, 100)
            for name, path in proxies.items()
        }

        # The range, round by round, a dockerd of each kind in turn (only
        # one can own docker0), so that machine drift hits both alike.
        servers = {
            "docker-proxy": lambda pid: children(pid, DOCKER_PROXY),
            "portproxy": lambda pid: [*children(pid, shim), daemon.pid],
            "null": lambda pid: children(pid, nullProxy),
        }
        for r in range(arguments.rounds):
            for name, path in [*proxies.items(), ("null", nullProxy)]:
                print(f"round {r + 1}, {name}", file=sys.stderr)
                docker = Dockerd(root, path, control, processes)
                if r == 0 and name == "docker-proxy":
                    buildImage(docker, root)
                pid = docker.process.pid
                ranges[name].append(
                    rangeRound(
                        docker,
                        arguments.first,
                        arguments.range,
                        functools.partial(servers[name], pid),
                        name != "null",
                    )
                )
                docker.stop()
        daemonRSS = rssKiB(daemon.pid)

        # Throughput: docker-proxy's published port, then the shim's and a
        # hand-written map entry of the same daemon, interleaved.
        measured = {}
        for name, path in proxies.items():
            docker = Dockerd(root, path, control, processes)
            docker.run(
                "run",
                "-d",
                "--name",
                "servers",
                "-p",
                f"127.0.0.1:{freePort + 1}:5201",
                "-p",
                f"127.0.0.1:{freePort + 2}:80",
                IMAGE,
                "sh",
                "-c",
                "iperf3 -s -D; exec nginx -c /nginx.conf",
            )
            waitTCP(freePort + 2)
            ip = (
                docker.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "servers")
                .stdout.decode()
                .strip()
            )
            published = {
                "tcp_bulk": ("127.0.0.1", freePort + 1),
                "http_keepalive": ("127.0.0.1", freePort + 2),
            }
            if name == "docker-proxy":
                measured.update(
                    throughput(
                        {"docker-proxy": published}, arguments.rounds, arguments.seconds
                    )
                )
            else:
                mapPath.write_text(
                    f"mappings:\n  - name: iperf\n    listen: 127.0.0.1:{freePort + 3}\n"
                    f"    target: {ip}:5201\n"
                    f"  - name: http\n    listen: 127.0.0.1:{freePort + 4}\n    target: {ip}:80\n"
                    f"control:\n  socket: {control}\n"
                )
                os.kill(daemon.pid, signal.SIGHUP)
                waitTCP(freePort + 4)
                shimPaths = throughput(
                    {
                        "direct": {"tcp_bulk": (ip, 5201), "http_keepalive": (ip, 80)},
                        "hand-written map": {
                            "tcp_bulk": ("127.0.0.1", freePort + 3),
                            "http_keepalive": ("127.0.0.1", freePort + 4),
                        },
                        "shim (published)": published,
                    },
                    arguments.rounds,
                    arguments.seconds,
                )
            docker.stop()
    finally:
        if Dockerd.current is not None:
            Dockerd.current.stop()
        processes.stopAll()
        if os.path.exists("/sys/class/net/docker0"):
            subprocess.run(["ip", "link", "delete", "docker0"], check=False)
        shutil.rmtree(root, ignore_errors=True)

    fastpath = os.environ.get("PORTPROXY_FASTPATH", "1") != "0"
    dp, pp = ranges["docker-proxy"], ranges["portproxy"]

    def median(rows, i):
        return statistics.median(row[i] for row in rows)

    def ratio(i):
        return statistics.median(b[i] / a[i] for a, b in zip(dp, pp, strict=True))

    print(
        f"\n{arguments.range}-port TCP range, {arguments.rounds} rounds, medians; ratio: median"
        f" of the per-round ratios (portproxy {'with' if fastpath else 'without'} its compiled paths)"
    )
    print(f"{'':30s} {'docker-proxy':>14s} {'shim+portproxy':>15s} {'ratio':>7s}")
    print(
        f"{'docker run returns (s)':30s} {median(dp, 0):14.2f} {median(pp, 0):15.2f} {ratio(0):7.2f}"
    )
    print(f"{'processes serving the range':30s} {dp[-1][3]:14d} {pp[-1][3]:15d}")
    print(
        f"{'their RSS (MiB)':30s} {median(dp, 1) / 1024:14.1f} {median(pp, 1) / 1024:15.1f} {ratio(1):7.2f}"
    )
    print(
        f"{'their PSS (MiB)':30s} {median(dp, 2) / 1024:14.1f} {median(pp, 2) / 1024:15.1f} {ratio(2):7.2f}"
    )
    print(f"{'  of which the daemon (RSS)':30s} {'':14s} {daemonRSS / 1024:15.1f}")
    print(f"{'dockerd alone (null proxy)':30s} {median(ranges['null'], 0):14.2f} s")
    print(
        f"{'one proxy: exec to 0 (ms)':30s} {startMs['docker-proxy']:14.2f} {startMs['portproxy']:15.2f}"
        f" {startMs['portproxy'] / startMs['docker-proxy']:7.2f}"
    )
    print("\nthrough one published port (median; ratio shim / hand-written map)")
    for w, unit in (("tcp_bulk", "Gbit/s"), ("http_keepalive", "req/s")):
        med = {name: statistics.median(v) for name, v in shimPaths[w].items()}
        med["docker-proxy"] = statistics.median(measured[w]["docker-proxy"])
        ratios = [
            s / h
            for s, h in zip(
                shimPaths[w]["shim (published)"],
                shimPaths[w]["hand-written map"],
                strict=True,
            )
        ]
        cells = "  ".join(f"{name} {value:.2f}" for name, value in med.items())
        print(f"{w} ({unit}): {cells}  ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
