#!/usr/bin/env python3
"""
Time reloads of a big map: from SIGHUP to the reload's summary line.

    python bench/reload.py            # 1000 TCP + 1000 UDP listeners, 3 rounds
    python bench/reload.py -n 500 -r 5

Each round starts from a map with one mapping, reloads to a map that adds a
range of N ports for both protocols (2N listeners), then reloads back
(removing them), and prints both times.  Loopback only.  Run it from the
project's venv (it starts `twistd -n portproxy`).
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import TWISTD, freeRange


def small(port):
    return f"mappings:\n  - name: one\n    listen: 127.0.0.1:{port}\n    target: 127.0.0.1:9\n"


def big(port, base, n):
    return small(port) + (
        f"  - name: many\n    proto: [tcp, udp]\n"
        f"    listen: 127.0.0.1:{base}-{base + n - 1}\n    target: 127.0.0.1:9\n"
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "-n", type=int, default=1000, help="ports per protocol (default 1000)"
    )
    ap.add_argument("-r", "--rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="portproxy-reload-")
    path, logPath = os.path.join(tmp, "map.yaml"), os.path.join(tmp, "proxy.log")
    port = freeRange(1)
    base = freeRange(a.n)
    with open(path, "w") as f:
        f.write(small(port))
    with open(logPath, "w") as log:
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "portproxy", "-c", path],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            start_new_session=True,
        )

    def waitFor(pattern, since):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = re.compile(pattern).search(Path(logPath).read_text(), since)
            if m:
                return m.group(0)
            if proc.poll() is not None:
                raise SystemExit(Path(logPath).read_text())
            time.sleep(0.002)
        raise SystemExit(f"timed out waiting for {pattern}")

    def reload(text):
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)
        since = len(Path(logPath).read_text())
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        line = waitFor(r"reload of [^\n]*", since)
        return time.monotonic() - t0, line

    try:
        waitFor("portproxy started", 0)
        adds, removes = [], []
        for r in range(a.rounds):
            dt, line = reload(big(port, base, a.n))
            assert f"added {2 * a.n}," in line, line
            adds.append(dt)
            dt, line = reload(small(port))
            assert f"removed {2 * a.n}," in line, line
            removes.append(dt)
            print(
                f"round {r + 1}: add {2 * a.n} listeners {adds[-1]:.3f}s, remove them {removes[-1]:.3f}s"
            )
        print(
            f"median: add {statistics.median(adds):.3f}s, remove {statistics.median(removes):.3f}s "
            f"({2 * a.n} listeners: {a.n} TCP + {a.n} UDP)"
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


if __name__ == "__main__":
    main()
