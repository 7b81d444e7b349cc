#!/usr/bin/env python3
"""
What a Prometheus scraper costs the relay: wrk with a new TCP connection
per request (http_close, the workload that ends the most flows a second)
through one portproxy with an http section, on loopback, with and without
a scraper fetching /metrics every second, round after round in alternating
order, so that machine drift hits both alike.

    python bench/scrape.py                 # 6 rounds of 5 s
    python bench/scrape.py -r 10 -s 5 -w http_keepalive
    PORTPROXY_FASTPATH=0 python bench/scrape.py

Prints each round's figures and the medians of the per-round ratios (with
scraper / without) of two figures: the connections a second wrk saw, which
swings with everything else the machine runs, and the proxy's CPU time
(user + system, all its threads, from /proc) per connection, which moves
much less, and is what a scrape would add to.  Needs nginx (the HTTP backend) and wrk:
`../shared/bench/install-peers` (root) installs them.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import urllib.request

from _common import Ports, waitTCP
from peers import measure, startBackends, startPortproxy
from processes import Processes


class Scraper(threading.Thread):
    """
    GETs a URL every C{interval} seconds until stopped, as Prometheus
    does; counts the scrapes.
    """

    def __init__(self, url, interval=1.0):
        threading.Thread.__init__(self, daemon=True)
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            with urllib.request.urlopen(self.url, timeout=10) as response:
                response.read()
            self.scrapes += 1
            self.stopped.wait(self.interval)


def cpuSeconds(pid):
    """
    User + system CPU seconds of process C{pid}, all its threads.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-r", "--rounds", type=int, default=6)
    ap.add_argument("-s", "--seconds", type=int, default=5)
    ap.add_argument(
        "--control",
        action="store_true",
        help="run no scraper in the 'with' runs either: how far apart two identical runs come out",
    )
    ap.add_argument(
        "--scrapes", type=int, default=300, help="scrapes in a row to time one"
    )
    ap.add_argument(
        "-w",
        "--workload",
        default="http_close",
        choices=["http_close", "http_keepalive"],
    )
    args = ap.parse_args()
    procs = Processes()
    ports = Ports()
    tmp = tempfile.mkdtemp(prefix="portproxy-scrape-")
    try:
        backend = startBackends(procs, ports, tmp)
        if "http" not in backend:
            sys.exit("nginx is needed for the HTTP backend")
        front, http = ports.take(), ports.take()
        proxy = startPortproxy(
            procs,
            tmp,
            "observed",
            f"http:\n  listen: 127.0.0.1:{http}\nmappings:\n  - name: web\n"
            f"    listen: 127.0.0.1:{front}\n    target: 127.0.0.1:{backend['http']}\n",
        )
        for port in (front, http):
            waitTCP(port)
        ratios, cpuRatios, without, withScraper = [], [], [], []
        for round in range(args.rounds):
            figures, cpu = {}, {}
            order = ["without", "with"] if round % 2 == 0 else ["with", "without"]
            for kind in order:
                scraper = None
                if kind == "with" and not args.control:
                    scraper = Scraper(f"http://127.0.0.1:{http}/metrics")
                    scraper.start()
                before = cpuSeconds(proxy.pid)
                figures[kind] = measure(args.workload, front, args.seconds)
                # microseconds of the proxy's CPU per connection
                cpu[kind] = (
                    (cpuSeconds(proxy.pid) - before)
                    * 1e6
                    / (figures[kind] * args.seconds)
                )
                if scraper is not None:
                    scraper.stopped.set()
                    scraper.join()
                    scrapes = scraper.scrapes
                elif kind == "with":
                    scrapes = 0
            without.append(figures["without"])
            withScraper.append(figures["with"])
            ratios.append(figures["with"] / figures["without"])
            cpuRatios.append(cpu["with"] / cpu["without"])
            print(
                f"round {round + 1}: without {figures['without']:.0f}/s {cpu['without']:.0f} us CPU/conn,"
                f" with scraper {figures['with']:.0f}/s {cpu['with']:.0f} us CPU/conn"
                f" ({scrapes} scrapes); ratios {ratios[-1]:.3f} {cpuRatios[-1]:.3f}",
                file=sys.stderr,
            )
        fast = os.environ.get("PORTPROXY_FASTPATH", "1") != "0"
        print(
            f"{args.workload} ({'compiled paths' if fast else 'pure Python'}), {args.rounds} rounds of"
            f" {args.seconds} s: without a scraper {statistics.median(without):.0f}/s,"
            f" with a scraper every second {statistics.median(withScraper):.0f}/s;"
            f" median ratio {statistics.median(ratios):.3f}; proxy CPU per connection: median ratio"
            f" {statistics.median(cpuRatios):.3f}"
        )
        # What one scrape costs the proxy, with nothing else running: CPU
        # seconds over a run of scrapes in a row.
        before = cpuSeconds(proxy.pid)
        for _ in range(args.scrapes):
            with urllib.request.urlopen(
                f"http://127.0.0.1:{http}/metrics", timeout=10
            ) as response:
                response.read()
        perScrape = (cpuSeconds(proxy.pid) - before) / args.scrapes
        print(
            f"one scrape of /metrics: {perScrape * 1e3:.2f} ms of the proxy's CPU"
            f" (mean of {args.scrapes}), {perScrape * 100:.2f}% of a core at one scrape a second"
        )
    finally:
        procs.stopAll()


if __name__ == "__main__":
    main()
