#!/usr/bin/env python3
"""
Time C{python -m twistedproxy check} on a big valid map (issue 17 wants
100,000 mappings checked in under 3 s).

    python bench/bigmap.py                 # 100,000 mappings, 5 rounds
    python bench/bigmap.py -n 50000 -r 3
    python bench/bigmap.py --profile       # and where one load's time goes
    python bench/bigmap.py --write map.yaml   # only write the map

The map has one mapping per line, C{- {name: mN, listen: 127.0.0.X:PORT,
target: 127.0.1.X:PORT}} over 250 loopback addresses (see L{bigMap}).  Each
round prints the time on the clock, the processor time (user and system)
and the peak RSS of the check; then the same for a reference loop of pure
Python, so that figures from a busy machine can be compared with an idle
one's.  Run it from the project's venv.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time

#: Loopback addresses the mappings are spread over.
ADDRESSES = 250

#: A reference loop of pure Python, about 1 s of one idle core of the
#: 2-core build machine.
REFERENCE = "for i in range(3 * 10**7): pass"


def bigMap(count: int) -> str:
    """
    The text of a valid map of C{count} mappings, one flow mapping a line:
    mapping I listens on 127.0.0.(1 + I % 250), port 10000 + I // 250, and
    forwards to the same port of 127.0.1.(1 + I % 250).
    """
    lines = ["mappings:"]
    for i in range(count):
        host, port = 1 + i % ADDRESSES, 10000 + i // ADDRESSES
        lines.append(
            f"  - {{name: m{i}, listen: 127.0.0.{host}:{port},"
            f" target: 127.0.1.{host}:{port}}}"
        )
    return "\n".join(lines) + "\n"


def timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float, float, int]:
    """
    Run C{command}; its result, seconds on the clock, seconds of processor
    time (user and system) and peak RSS in KiB.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    clock = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, clock, cpu, after.ru_maxrss


def profile(path: str, top: int) -> None:
    """
    Load the map at C{path} once under cProfile and print where the time
    went, by own time and by cumulative time.
    """
    from twistedproxy.config import loadMap

    profiler = cProfile.Profile()
    profiler.enable()
    loadMap(path)
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(top)
        print(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=100_000, help="mappings (100,000)")
    ap.add_argument("-r", "--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also profile one load")
    ap.add_argument("--top", type=int, default=25, help="profile lines to print")
    ap.add_argument("--write", metavar="PATH", help="only write the map to PATH")
    a = ap.parse_args()
    text = bigMap(a.n)
    if a.write:
        with open(a.write, "w") as f:
            f.write(text)
        return
    with tempfile.TemporaryDirectory(prefix="portproxy-bigmap-") as tmp:
        path = os.path.join(tmp, "map.yaml")
        with open(path, "w") as f:
            f.write(text)
        print(f"{a.n} mappings, {len(text) / 1e6:.1f} MB; load average", end=" ")
        print(" ".join(f"{x:.2f}" for x in os.getloadavg()))
        clocks, cpus, references = [], [], []
        for _ in range(a.rounds):
            result, clock, cpu, rss = timed(
                [sys.executable, "-m", "twistedproxy", "check", path]
            )
            if result.returncode != 0:
                raise SystemExit(result.stderr[-2000:])
            _, _, reference, _ = timed([sys.executable, "-c", REFERENCE])
            clocks.append(clock)
            cpus.append(cpu)
            references.append(reference)
            print(
                f"check {clock:.2f} s on the clock, {cpu:.2f} s processor time,"
                f" {rss / 1024:.0f} MiB peak RSS; reference loop {reference:.2f} s"
            )
        print(
            f"median: check {statistics.median(clocks):.2f} s on the clock,"
            f" {statistics.median(cpus):.2f} s processor time;"
            f" reference loop {statistics.median(references):.2f} s"
        )
        if a.profile:
            profile(path, a.top)


if __name__ == "__main__":
    main()
