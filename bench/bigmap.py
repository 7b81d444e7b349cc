#!/usr/bin/env python3
"""
Time C{python -m twistedproxy check} on a big valid map (issue 17 wants
100,000 mappings checked in under 3 s).

    python bench/bigmap.py                 # 100,000 mappings, 5 rounds
    python bench/bigmap.py -n 50000 -r 3
    python bench/bigmap.py --profile       # and where one load's time goes
    python bench/bigmap.py --write map.yaml   # only write the map
    python bench/bigmap.py --before /tmp/old  # and another tree, in turn

The map has one mapping per line, C{- {name: mN, listen: 127.0.0.X:PORT,
target: 127.0.1.X:PORT}} over 250 loopback addresses (see L{bigMap}).  Each
round prints the time on the clock, the processor time (user and system)
and the peak RSS of the check; then the same for a reference loop of pure
Python, so that figures from a busy machine can be compared with an idle
one's.  With C{--before DIR} each round also checks the map with the
C{twistedproxy} package of another tree (C{git archive REV twistedproxy |
tar -x -C DIR}), so that two versions are compared in the same minutes.
Run it from the project's venv.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import subprocess
import sys
import sysconfig
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


def timed(
    command: list[str], tree: str | None = None
) -> tuple[subprocess.CompletedProcess, float, float, int]:
    """
    Run C{command}, with the package of C{tree} when given; its result,
    seconds on the clock, seconds of processor time (user and system) and
    peak RSS in KiB.
    """
    env = dict(os.environ)
    if tree is not None:
        # Without site (-S), so that the editable install's import hook
        # does not bring this tree's package; the venv's libraries by path.
        env["PYTHONPATH"] = os.pathsep.join([tree, sysconfig.get_paths()["purelib"]])
        command = [command[0], "-S", *command[1:]]
    started = time.monotonic()
    # Not from this directory, which python -m would import from first.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command, stdout=out, stderr=err, env=env, cwd=tempfile.gettempdir()
        )
        # wait4 reaps the child and gives its own resource usage.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        clock = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(
            command, process.returncode, out.read(), err.read()
        )
    return result, clock, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


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
    ap.add_argument("--before", metavar="DIR", help="also time this tree's package")
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
        trees: dict[str, str | None] = {"this tree": None}
        if a.before:
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            trees = {f"before ({a.before})": a.before, "this tree": here}
        clocks: dict[str, list[float]] = {name: [] for name in trees}
        cpus: dict[str, list[float]] = {name: [] for name in trees}
        references = []
        for _ in range(a.rounds):
            for name, tree in trees.items():
                result, clock, cpu, rss = timed(
                    [sys.executable, "-m", "twistedproxy", "check", path], tree
                )
                if result.returncode != 0:
                    raise SystemExit(result.stderr[-2000:])
                clocks[name].append(clock)
                cpus[name].append(cpu)
                print(
                    f"{name}: check {clock:.2f} s on the clock, {cpu:.2f} s"
                    f" processor time, {rss / 1024:.0f} MiB peak RSS"
                )
            _, _, reference, _ = timed([sys.executable, "-c", REFERENCE])
            references.append(reference)
            print(f"reference loop {reference:.2f} s")
        for name in trees:
            print(
                f"median, {name}: check {statistics.median(clocks[name]):.2f} s on"
                f" the clock, {statistics.median(cpus[name]):.2f} s processor time"
            )
        print(f"median reference loop {statistics.median(references):.2f} s")
        if a.profile:
            profile(path, a.top)


if __name__ == "__main__":
    main()
