#!/usr/bin/env python3
"""
What C{client_address} costs, and that listeners without it cost what
they did.

    python bench/clientaddress.py --baseline /path/to/other/checkout
    python bench/clientaddress.py -w http_close -r 5 -s 3

On loopback only: nginx as the HTTP backend, listening twice, plainly and
with C{proxy_protocol} (so it refuses a connection without a valid header:
a wrong header shows as errors, not as speed); then one portproxy of this
checkout with a plain mapping, a C{proxy_protocol_v1} and a
C{proxy_protocol_v2} one, and, with C{--baseline}, the same plain mapping
run by another checkout (its code first on PYTHONPATH, extensions built).
Every round runs each workload through each in turn; the table gives
medians and, per row, the median of the per-round ratios to this
checkout's plain mapping (or to the baseline's, when given), so machine
drift cancels out.  Run it from the project's venv; needs nginx and wrk
(../shared/bench/install-peers).
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import TWISTD, Ports, waitTCP
from peers import measure, startHTTP
from processes import Processes

HERE = os.path.dirname(os.path.abspath(__file__))
#: the checkout this script belongs to
CHECKOUT = os.path.dirname(HERE)


def nginx(procs, tmp, plain, proxied):
    startHTTP(procs, tmp, [f"127.0.0.1:{plain}", f"127.0.0.1:{proxied} proxy_protocol"])
    waitTCP(plain)
    waitTCP(proxied)


def portproxy(procs, tmp, name, mappings, code=CHECKOUT):
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write("mappings:\n" + "".join(mappings))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")])
    with open(os.path.join(tmp, f"{name}.log"), "wb") as log:
        return procs.start(
            [*TWISTD, "-n", "--pidfile=", "portproxy", "-c", path],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).pid


def cpuSeconds(pid):
    """
    User and system CPU time of process C{pid} so far, all its threads.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mapping(name, listen, target, extra=""):
    return f"  - {{name: {name}, listen: '127.0.0.1:{listen}', target: '127.0.0.1:{target}'{extra}}}\n"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-w", "--workloads", default="http_close,http_keepalive")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-s", "--seconds", type=int, default=3)
    ap.add_argument(
        "--baseline", help="another checkout whose plain mapping is the reference"
    )
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    procs = Processes()
    ports = Ports()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plainBackend, proxiedBackend = ports.take(), ports.take()
            nginx(procs, tmp, plainBackend, proxiedBackend)
            through = {}
            pids = {}
            if args.baseline:
                through["baseline plain"] = ports.take()
                pids["baseline plain"] = portproxy(
                    procs,
                    tmp,
                    "baseline",
                    [mapping("plain", through["baseline plain"], plainBackend)],
                    code=os.path.abspath(args.baseline),
                )
            through["plain"], through["v1"], through["v2"] = (
                ports.take(),
                ports.take(),
                ports.take(),
            )
            pids["plain"] = pids["v1"] = pids["v2"] = portproxy(
                procs,
                tmp,
                "this",
                [
                    mapping("plain", through["plain"], plainBackend),
                    mapping(
                        "v1",
                        through["v1"],
                        proxiedBackend,
                        ", client_address: proxy_protocol_v1",
                    ),
                    mapping(
                        "v2",
                        through["v2"],
                        proxiedBackend,
                        ", client_address: proxy_protocol_v2",
                    ),
                ],
            )
            try:
                for port in through.values():
                    waitTCP(port)
            except SystemExit:
                for name in os.listdir(tmp):
                    if name.endswith(".log"):
                        print(
                            Path(tmp, name).read_text()[-2000:],
                            file=sys.stderr,
                        )
                raise
            time.sleep(1)
            reference = "baseline plain" if args.baseline else "plain"
            figures = {(w, k): [] for w in workloads for k in through}
            # the proxy's CPU time per request, in microseconds: what the
            # proxy itself spends, which a busy machine blurs far less
            # than the rates
            costs = {(w, k): [] for w in workloads for k in through}
            for _ in range(args.rounds):
                for w in workloads:
                    # a new order every round: nothing always runs first
                    order = list(through.items())
                    random.shuffle(order)
                    for k, port in order:
                        before = cpuSeconds(pids[k])
                        rate = measure(w, port, args.seconds)
                        spent = cpuSeconds(pids[k]) - before
                        figures[(w, k)].append(rate)
                        if rate:
                            costs[(w, k)].append(spent * 1e6 / (rate * args.seconds))
            print(
                f"{'workload':16} {'through':16} {'median':>10} {'ratio to ' + reference:>24}"
                f" {'proxy CPU us/req':>17} {'ratio':>7}"
            )
            for w in workloads:
                for k in through:
                    values = [v for v in figures[(w, k)] if v is not None]
                    ratios = [
                        v / r
                        for v, r in zip(
                            figures[(w, k)], figures[(w, reference)], strict=True
                        )
                        if v is not None and r
                    ]
                    median = (
                        f"{statistics.median(values):10.0f}" if values else f"{'-':>10}"
                    )
                    ratio = (
                        f"{statistics.median(ratios):24.3f}" if ratios else f"{'-':>24}"
                    )
                    cost = statistics.median(costs[(w, k)]) if costs[(w, k)] else None
                    base = (
                        statistics.median(costs[(w, reference)])
                        if costs[(w, reference)]
                        else None
                    )
                    costText = (
                        f"{cost:17.1f} {cost / base:7.3f}"
                        if cost and base
                        else f"{'-':>17} {'-':>7}"
                    )
                    print(f"{w:16} {k:16} {median} {ratio} {costText}")
    finally:
        procs.stopAll()


if __name__ == "__main__":
    sys.exit(main())
