"""
Bulk TCP over several parallel streams through portproxy with 1, 2, ...
relay threads (PORTPROXY_ENGINE_THREADS), on loopback only:

    python bench/engine_threads.py                 # 1 and 2 threads, 8 streams
    python bench/engine_threads.py -t 1,2,4 -P 16 -r 5 -s 5

One iperf3 server, one twistd per thread count (all started up front,
idle while the others are measured), and a direct run as the machine's
ceiling; the runs are interleaved round by round, so that load from
elsewhere on the machine falls on every column alike.  Each run is
`iperf3 -c 127.0.0.1 -p PORT -P STREAMS -t SECONDS -J`: its receiver's
Gbit/s, the proxy's CPU (user + system, all threads) over the run in
cores, and the CPU of its busiest relay thread (tcprelayN).  Prints the median of each column and each count's ratio to one
thread.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _common import TWISTD, Ports, waitTCP
from peers import cpuSeconds
from processes import Processes


def relayThreadSeconds(pid):
    """
    CPU seconds so far of each of process C{pid}'s relay threads (named
    C{tcprelayN} by the engine), by thread id.
    """
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if not f.read().startswith("tcprelay"):
                    continue
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        seconds[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def iperf(port, streams, seconds):
    """
    Gbit/s received over C{streams} parallel streams to 127.0.0.1:C{port},
    or None when iperf3 failed.
    """
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port)]
    argv += ["-P", str(streams), "-t", str(seconds), "-J"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        result = json.loads(out.stdout)
        return result["end"]["sum_received"]["bits_per_second"] / 1e9
    except (subprocess.TimeoutExpired, ValueError, KeyError):
        return None


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-t", "--threads", default="1,2", help="comma list of counts")
    ap.add_argument("-P", "--streams", type=int, default=8)
    ap.add_argument("-r", "--rounds", type=int, default=5)
    ap.add_argument("-s", "--seconds", type=int, default=4)
    a = ap.parse_args()
    counts = [int(n) for n in a.threads.split(",")]
    ports = Ports()
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="portproxy-threads-")
    try:
        backend = ports.take()
        procs.start(["iperf3", "-s", "-p", str(backend)])
        waitTCP(backend)
        fronts = {}
        for n in counts:
            port = ports.take()
            mapPath = os.path.join(tmp, f"threads{n}.yaml")
            with open(mapPath, "w") as f:
                f.write(
                    f"mappings:\n  - name: bulk\n    listen: 127.0.0.1:{port}\n"
                    f"    target: 127.0.0.1:{backend}\n"
                )
            env = dict(os.environ, PORTPROXY_ENGINE_THREADS=str(n))
            process = procs.start(
                [*TWISTD, "-n", "--pidfile=", "portproxy", "-c", mapPath], env=env
            )
            waitTCP(port)
            fronts[n] = (port, process.pid)
        rates = {name: [] for name in ["direct", *counts]}
        cores = {n: [] for n in counts}
        busiest = {n: [] for n in counts}
        for r in range(a.rounds):
            rates["direct"].append(iperf(backend, a.streams, a.seconds))
            for n in counts:
                port, pid = fronts[n]
                before = cpuSeconds(pid)
                threadsBefore = relayThreadSeconds(pid)
                rates[n].append(iperf(port, a.streams, a.seconds))
                cores[n].append((cpuSeconds(pid) - before) / a.seconds)
                used = [
                    (t - threadsBefore.get(tid, 0.0)) / a.seconds
                    for tid, t in relayThreadSeconds(pid).items()
                ]
                busiest[n].append(max(used, default=0.0))
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{name}: {rate if rate is None else round(rate, 2)}"
                    for name, rate in ((k, v[-1]) for k, v in rates.items())
                ),
                file=sys.stderr,
            )
    finally:
        procs.stopAll()

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    one = median(rates[counts[0]])
    print(f"iperf3 -P {a.streams}, {a.seconds} s, {a.rounds} rounds, medians:")
    print("| path | Gbit/s | proxy CPU (cores) | busiest relay thread | vs first |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| direct | {median(rates['direct']):.2f} | - | - | - |")
    for n in counts:
        rate = median(rates[n])
        print(
            f"| {n} thread(s) | {rate:.2f} | {median(cores[n]):.2f}"
            f" | {median(busiest[n]):.2f} | {rate / one:.2f} |"
        )


if __name__ == "__main__":
    main()
