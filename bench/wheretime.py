#!/usr/bin/env python3
"""
Where portproxy's time goes on its two slowest workloads, on loopback.

    python bench/wheretime.py                        # http_close and udp_pingpong, 8 s each
    python bench/wheretime.py -w http_close -s 5
    python bench/wheretime.py -w tcp_pingpong        # also: sockperf TCP ping-pong
    python bench/wheretime.py -w http_keepalive      # also: wrk -t1 -c32, kept alive
    PORTPROXY_FASTPATH=0 python bench/wheretime.py   # the pure-Python path
    python bench/wheretime.py --proxy nginx          # nginx stream's worker, to compare

For each workload one portproxy (this checkout's, from the venv) runs
alone in front of its backend (nginx answering "hello\\n" for http_close,
wrk -t1 -c32 with "Connection: close"; a sockperf server for
udp_pingpong, sockperf ping-pong of 64 B), and the same load runs four
times, each under one observer, so that no observer disturbs another:

1. none: CPU time (user, system) and context switches (voluntary: the
   thread slept, e.g. in epoll_wait; involuntary: preempted) of each of
   its threads, per unit of work (connection, round trip), from
   /proc/<pid>/task/<tid>/{stat,status};
2. strace -f -c: system calls per unit of work, by name (strace slows the
   process down; the counts per unit stay what they are);
3. perf record -g: the share of each thread, and the top symbols of the
   busiest threads (kernel and C);
4. py-spy record --native: the reactor (main) thread's samples.  Those in
   a system call (the innermost libc function under the Python frames)
   are counted by call, and the reactor's system CPU per unit (from run 1)
   is split by those shares; the others by phase of a new connection
   (the innermost portproxy frame that tells: accept, dial with admission
   and the flow object, hand-off to the engine, the engine's end report,
   end of flow with the access line, Twisted's reactor), and its user CPU
   is split by those.  py-spy samples wall-clock time of a running or
   runnable thread: a call in which the thread is preempted (connect(),
   which on loopback wakes the target) weighs more than its CPU.

With --proxy nginx, nginx stream's worker takes portproxy's place for
runs 1 to 3 (its main thread is the worker).  Run it from the project's
root, in its venv (py-spy: pip install py-spy;
perf: Debian's linux-perf).
"""

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from _common import TWISTD, Ports, waitTCP
from peers import measureWork, nginxStreamModule, processTree, startHTTP
from processes import Processes

TICK = os.sysconf("SC_CLK_TCK")

#: Phase of a reactor-thread sample: the first of these that a frame of
#: the stack matches, innermost frame first: (phase, regex on "function
#: (file)").
PHASES = [
    ("waiting in epoll_wait", r"^epoll_wait \("),
    (
        "end of flow, access line",
        r"^(\w+\.)?(flowEnded|flowsEnded|flowsEndedTogether|writeMany|writeBlock"
        r"|observe\w*|flush) \(twistedproxy/"
        r"|^(takeReports|TCPEngine_finished|group\w+|reasonOf) \("
        r"|\(twistedproxy/logs\.py|\(twisted/logger/",
    ),
    (
        "dial: the engine's batch call (dialFlows and its C, outside system calls)",
        r"^(TCPEngine\.dialFlows|TCPEngine_dial|connectTarget|adoptFlow|failureText) \(",
    ),
    (
        "hand-off to the engine",
        r"^(\w+\.)?(_connected|_hand|adopt\w*|proxyHeader) \(twistedproxy/tcp/",
    ),
    (
        "accept",
        r"^(ListeningPort\.doRead|EngineForwarder\.(acceptClients|dial)"
        r"|fastrelay_acceptBatch|acceptOne) \(twistedproxy/tcp/",
    ),
    (
        "engine end reports",
        r"^(\w+\.)?(doRead|_ended|reports) \(twistedproxy/(tcp/engine|udp/)",
    ),
    (
        "dial (with admission and the flow object)",
        r"\(twistedproxy/(tcp/|listener|access|model)",
    ),
    ("dial (with admission and the flow object)", r"^socket\.\w+ \(socket\.py"),
    ("other portproxy", r"\(twistedproxy/"),
    ("Twisted reactor", r"\(twisted/"),
]


def threadTimes(pid):
    """
    {tid: [user s, system s, voluntary switches, involuntary switches]}.
    """
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        out[int(tid)] = [
            int(fields[11]) / TICK,
            int(fields[12]) / TICK,
            int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]),
        ]
    return out


def threadName(pid, tid):
    return "main thread" if tid == pid else f"thread {tid}"


def plain(pid, workload, port, seconds):
    before = threadTimes(pid)
    _, work = measureWork(workload, port, seconds)
    after = threadTimes(pid)
    rows = []
    for tid, end in sorted(after.items()):
        start = before.get(tid, [0, 0, 0, 0])
        delta = [e - s for e, s in zip(end, start, strict=True)]
        if any(delta):
            rows.append((tid, delta))
    return work, rows


def observed(argv, workload, port, seconds):
    """
    Run the load while C{argv} (an observer attached to the proxy) runs;
    stop the observer with SIGINT afterwards: (work, observer's stderr).
    """
    observer = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    _, work = measureWork(workload, port, seconds)
    if observer.poll() is None:
        observer.send_signal(signal.SIGINT)
    out, err = observer.communicate(timeout=120)
    return work, out + err


def straceCounts(text):
    """
    {system call: (calls, errors)} from C{strace -c}'s table.
    """
    counts = {}
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if (
            len(fields) >= 5
            and re.match(r"^[\d.]+$", fields[0])
            and fields[-1] != "total"
        ):
            try:
                errors = int(fields[4]) if len(fields) == 6 else 0
                counts[fields[-1]] = (int(fields[3]), errors)
            except ValueError:
                continue
    return counts


def perfReport(path, pid, tids):
    """
    The share of each thread, then the top symbols of each of C{tids}.
    """
    base = [
        "perf",
        "report",
        "-i",
        path,
        "--stdio",
        "--no-children",
        "-g",
        "none",
        "--percentage",
        "relative",
    ]
    text = subprocess.run(
        [*base, "--sort", "pid"], capture_output=True, text=True
    ).stdout
    lines = ["perf: share of samples by thread"]
    lines += [
        f"    {line.strip()}"
        for line in text.splitlines()
        if "%" in line and not line.startswith("#")
    ][:8]
    for tid in tids:
        text = subprocess.run(
            [*base, "--sort", "dso,sym", "--tid", str(tid), "--percent-limit", "1"],
            capture_output=True,
            text=True,
        ).stdout
        lines.append(f"perf: top symbols of {threadName(pid, tid)} (% of that thread)")
        lines += [
            f"    {line.strip()}"
            for line in text.splitlines()
            if "%" in line and not line.startswith("#")
        ][:18]
    return lines


def phaseOf(inner):
    """
    The phase of a stack, innermost frame first: that of the innermost
    frame that matches one of L{PHASES}.
    """
    for frame in inner:
        for phase, pattern in PHASES[1:]:
            if re.search(pattern, frame):
                return phase
    return "outside Python frames"


def pyspyPhases(path, pid):
    """
    The main thread's samples in py-spy's raw file C{path}: ({phase:
    samples outside system calls}, {innermost Python function: samples},
    {libc call a sample is in (a system call): samples}, samples).  A
    sample belongs to the phase of the innermost frame that matches one of
    L{PHASES}; samples blocked in epoll_wait count under the first.
    """
    phases, functions, calls = (collections.Counter() for _ in range(3))
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            # --threads puts "thread (TID): NAME" first; keep the main thread
            if not frames[0].startswith(f"thread ({pid})"):
                continue
            n = int(count)
            total += n
            inner = frames[::-1]
            if re.search(PHASES[0][1], inner[0]):
                phases[PHASES[0][0]] += n
                continue
            for frame in inner:
                if ".py" in frame:
                    functions[re.sub(r":\d+\)", ")", frame)] += n
                    break
            # the innermost named libc function below the Python frames:
            # the system call the thread is in (or, rarely, a libc helper)
            call = None
            for frame in inner:
                if ".py" in frame:
                    break
                found = re.match(r"^(\w+) \(libc\.so", frame)
                if found and not found.group(1).startswith("0x"):
                    call = found.group(1)
                    break
            if call is not None:
                calls[call] += n
                continue
            phases[phaseOf(inner)] += n
    return phases, functions, calls, total


def report(name, pid, workload, port, a, tmp):
    unit = {"http_close": "connection", "http_keepalive": "request"}.get(
        workload, "round trip"
    )
    print(f"\n## {name}: {workload}, {a.seconds} s per run\n")
    work, rows = plain(pid, workload, port, a.seconds)
    if not work:
        print("the load failed")
        return
    print(f"{work} {unit}s; per {unit}:\n")
    print(
        "| thread | user us | system us | voluntary switches | involuntary switches |"
    )
    print("|---|---|---|---|---|")
    reactorCPU = None
    for tid, (user, system, vcs, nvcs) in rows:
        print(
            f"| {threadName(pid, tid)} | {user * 1e6 / work:.1f} | {system * 1e6 / work:.1f}"
            f" | {vcs / work:.2f} | {nvcs / work:.2f} |"
        )
        if tid == pid:
            reactorCPU = (user * 1e6 / work, system * 1e6 / work)
    busiest = [tid for tid, d in sorted(rows, key=lambda r: -(r[1][0] + r[1][1]))][:2]
    if shutil.which("strace") and not a.skip_strace:
        work, text = observed(
            ["strace", "-f", "-c", "-p", str(pid)], workload, port, a.seconds
        )
        counts = straceCounts(text)
        if work and counts:
            total = sum(n for n, _ in counts.values())
            top = ", ".join(
                f"{call} {n / work:.2f}"
                + (f" ({errors / work:.2f} failed)" if errors else "")
                for call, (n, errors) in sorted(counts.items(), key=lambda c: -c[1][0])
                if n / work >= 0.05
            )
            print(
                f"\nstrace -f -c ({work} {unit}s under strace): {total / work:.1f} system calls per {unit}: {top}"
            )
    if shutil.which("perf") and not a.skip_perf:
        path = os.path.join(tmp, f"{workload}.perf")
        observed(
            ["perf", "record", "-g", "-o", path, "-p", str(pid)],
            workload,
            port,
            a.seconds,
        )
        print()
        print("\n".join(perfReport(path, pid, busiest)))
    spy = shutil.which("py-spy")
    if spy and not a.skip_pyspy:
        path = os.path.join(tmp, f"{workload}.pyspy")
        observed(
            [
                spy,
                "record",
                "--native",
                "--threads",
                "-r",
                str(a.rate),
                "-f",
                "raw",
                "-o",
                path,
                "-p",
                str(pid),
            ],
            workload,
            port,
            a.seconds,
        )
        if os.path.exists(path):
            phases, functions, calls, total = pyspyPhases(path, pid)
            # py-spy counts a thread blocked in epoll_wait as busy: those
            # samples are left out of the shares.
            waiting = phases.pop("waiting in epoll_wait", 0)
            busy = max(1, total - waiting)
            inPython, inCalls = sum(phases.values()), sum(calls.values())
            user, system = reactorCPU or (None, None)
            print(
                f"\npy-spy --native, main thread: {total} samples; {waiting} blocked in"
                f" epoll_wait (left out), {inCalls} in a system call, {inPython} in"
                " Python or C outside system calls"
            )
            if user is not None:
                print(
                    f"(us: the main thread's {user:.1f} us user CPU per {unit} times the"
                    f" share outside system calls; {system:.1f} us system CPU times the"
                    " share of each call)"
                )
            print("\n| phase, outside system calls | share | us per " + unit + " |")
            print("|---|---|---|")
            for phase, n in phases.most_common():
                us = "-" if user is None else f"{user * n / max(1, inPython):.1f}"
                print(f"| {phase} | {100 * n / max(1, inPython):.1f}% | {us} |")
            print("\n| system call | share | us per " + unit + " |\n|---|---|---|")
            for call, n in calls.most_common(10):
                us = "-" if system is None else f"{system * n / max(1, inCalls):.1f}"
                print(f"| {call} | {100 * n / max(1, inCalls):.1f}% | {us} |")
            print(
                "\ntop innermost Python functions of the main thread (% of busy samples):"
            )
            for fn, n in functions.most_common(15):
                print(f"    {100 * n / busy:5.1f}%  {fn}")


def startProxy(procs, tmp, proxy, workload, proto, front, backend):
    """
    C{proxy} from 127.0.0.1:C{front} to C{backend}: the pid whose threads
    do the relaying (nginx's worker, not its master).
    """
    if proxy == "nginx":
        conf = os.path.join(tmp, f"{workload}-stream.conf")
        udp = " udp" if proto == "udp" else ""
        with open(conf, "w") as f:
            f.write(
                f"load_module {nginxStreamModule()};\nworker_processes 1; daemon off;\n"
                f"pid {tmp}/stream.pid; error_log {tmp}/stream.err;\n"
                "events { worker_connections 20000; }\n"
                f"stream {{ server {{ listen 127.0.0.1:{front}{udp};"
                f" proxy_pass 127.0.0.1:{backend}; }} }}\n"
            )
        master = procs.start(["nginx", "-c", conf]).pid
        deadline = time.monotonic() + 10
        while len(processTree(master)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        return processTree(master)[-1]
    mapPath = os.path.join(tmp, f"{workload}.yaml")
    with open(mapPath, "w") as f:
        f.write(
            f"mappings:\n  - name: {workload}\n    proto: {proto}\n"
            f"    listen: 127.0.0.1:{front}\n    target: 127.0.0.1:{backend}\n"
        )
    with open(os.path.join(tmp, f"{workload}.log"), "w") as log:
        return procs.start(
            [*TWISTD, "-n", "--pidfile=", "portproxy", "-c", mapPath],
            stdout=log,
            stderr=subprocess.STDOUT,
        ).pid


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "-w",
        "--workloads",
        default="http_close,udp_pingpong",
        help="comma list of http_close, http_keepalive, udp_pingpong, tcp_pingpong",
    )
    ap.add_argument("-s", "--seconds", type=int, default=8)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples a second")
    ap.add_argument(
        "--proxy",
        default="portproxy",
        choices=["portproxy", "nginx"],
        help="nginx: the same per-thread and strace counts of nginx stream, to compare",
    )
    ap.add_argument("--skip-strace", action="store_true")
    ap.add_argument("--skip-perf", action="store_true")
    ap.add_argument("--skip-pyspy", action="store_true")
    a = ap.parse_args()
    if a.proxy != "portproxy":
        a.skip_pyspy = True
    procs, ports = Processes(), Ports()
    tmp = tempfile.mkdtemp(prefix="portproxy-wheretime-")
    if a.proxy == "nginx":
        name = "nginx stream (its worker)"
    elif os.environ.get("PORTPROXY_FASTPATH") == "0":
        name = "portproxy (pure Python)"
    else:
        name = "portproxy (compiled paths)"
    try:
        for workload in a.workloads.split(","):
            backend, front = ports.take(), ports.take()
            if workload.startswith("http_"):
                startHTTP(procs, tmp, [f"127.0.0.1:{backend}"])
                waitTCP(backend)
                proto = "tcp"
            else:
                proto = "tcp" if workload == "tcp_pingpong" else "udp"
                tcp = ["--tcp"] if proto == "tcp" else []
                procs.start(
                    ["sockperf", "server", *tcp, "-i", "127.0.0.1", "-p", str(backend)]
                )
                if proto == "tcp":
                    waitTCP(backend)
            pid = startProxy(procs, tmp, a.proxy, workload, proto, front, backend)
            if proto == "tcp":
                waitTCP(front)
            time.sleep(1.5)
            # a short warm-up, so that the first run is not the one that
            # fills the pools
            measureWork(workload, front, 1)
            report(name, pid, workload, front, a, tmp)
            procs.stopAll()
    finally:
        procs.stopAll()
    print(f"\n(raw files in {tmp})", file=sys.stderr)


if __name__ == "__main__":
    main()
