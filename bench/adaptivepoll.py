#!/usr/bin/env python3
"""
What the TCP engine's busy-poll does under sockperf ping-pong.

    python bench/adaptivepoll.py                 # ceilings 0 and 50 us, 3 times each, 2 s
    python bench/adaptivepoll.py -c 0,20,50,100 -r 2 -s 3

One TCP flow (sockperf ping-pong, 64 B, against a sockperf server on
loopback) through a TCPEngine of this checkout with one relay thread,
driven by this process with no reactor: for each ceiling (the engine's
busyPoll, in us) in turn, round after round, it prints sockperf's p50,
the round trips, this process's CPU time per round trip (the relay
thread's, as nothing else runs), and the engine's pollCounters(): polls
begun, those that caught an event, and those during which the thread was
preempted (each ends polling for 50 ms).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpuSeconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(busyPoll: int, seconds: int, serverPort: int) -> str:
    """
    One sockperf ping-pong run through an engine with this ceiling: one
    line of figures.
    """
    from twistedproxy.tcp._engine import TCPEngine

    engine = TCPEngine(busyPoll=busyPoll, threads=1)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    port = listening.getsockname()[1]
    pingPong = ["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port)]
    client = subprocess.Popen(
        [*pingPong, "-t", str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        accepted, _ = listening.accept()
        target = socket.create_connection(("127.0.0.1", serverPort))
        for s in (accepted, target):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        before = cpuSeconds()
        engine.adopt(accepted.detach(), target.detach(), 1, 0.0, True)
        out = client.communicate(timeout=seconds + 30)[0]
        cpu = cpuSeconds() - before
        polls, caught, preempted = engine.pollCounters()
    finally:
        client.kill()
        engine.stop()
        listening.close()
    p50 = re.search(r"50\.000 =\s*([\d.]+)", out)
    trips = re.search(r"ReceivedMessages=(\d+)", out)
    n = int(trips.group(1)) if trips else 0
    return (
        f"busyPoll={busyPoll:4d} p50_us={p50.group(1) if p50 else '?'} round_trips={n}"
        f" cpu_us_per_round_trip={cpu / max(n, 1) * 1e6:.1f} polls={polls}"
        f" caught={caught} preempted={preempted}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--ceilings", default="0,50", help="busyPoll values, us")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-s", "--seconds", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    serverPort = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen(
        ["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(serverPort)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", serverPort)).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for _ in range(a.rounds):
            for ceiling in [int(c) for c in a.ceilings.split(",")]:
                print(measure(ceiling, a.seconds, serverPort), flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
