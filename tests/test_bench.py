"""
The arithmetic and parsing of the benchmark harness in bench/: the figures
of docs/PERFORMANCE.md are only as good as these.
"""

import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

import peers
import wheretime

IPERF_PARALLEL = """\
[SUM]   0.00-3.00   sec  1.50 GBytes  4.29 Gbits/sec                  sender
[  5]   0.00-3.00   sec   192 MBytes   537 Mbits/sec                  receiver
[SUM]   0.00-3.00   sec  1.49 GBytes  4.27 Gbits/sec                  receiver
"""

SOCKPERF = """\
sockperf: [Total Run] RunTime=3.002 sec; Warm up time=400 msec; SentMessages=62001; ReceivedMessages=62000
sockperf: [Valid Duration] RunTime=2.549 sec; SentMessages=53394; ReceivedMessages=53394
sockperf: ---> percentile 99.000 =   39.819
sockperf: ---> percentile 50.000 =   24.161
"""

STRACE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.004000           1      4000           epoll_wait
 30.00    0.003000           1      4000      2000 recvfrom
 30.00    0.003000           1      2000           sendmsg
------ ----------- ----------- --------- --------- ----------------
100.00    0.010000           1     10000      2000 total
"""


def test_bulkFigureAndAmountFromIperfSumLine(monkeypatch):
    """
    With parallel streams the rate and the amount come from the receiver's
    [SUM] line, the amount in GB (10^9 bytes) from iperf3's binary GBytes.
    """
    monkeypatch.setattr(peers, "run", lambda argv, seconds: IPERF_PARALLEL)
    rate, gbytes = peers.measureWork("tcp_bulk8", 1, 3)
    assert rate == 4.27
    assert gbytes == pytest.approx(1.49 * 2**30 / 1e9)


def test_pingPongFigureAndRoundTripsFromSockperf(monkeypatch):
    """
    A ping-pong gives its median and the round trips of the whole run
    (warm-up included: the proxy's CPU counts them too).
    """
    monkeypatch.setattr(peers, "run", lambda argv, seconds: SOCKPERF)
    assert peers.measureWork("udp_pingpong", 1, 3) == (24.161, 62000)


def test_failedLoadGivesNothing(monkeypatch):
    """
    A load tool that printed nothing usable gives no figure and no work,
    so that no CPU figure is divided by it.
    """
    monkeypatch.setattr(peers, "run", lambda argv, seconds: "")
    for workload in peers.WORKLOADS:
        assert peers.measureWork(workload, 1, 1) == (None, None)


def test_bestPeerIsChosenPerRound():
    """
    The ratio to the best peer takes, in each round, the best of the other
    proxies only (not direct, not another portproxy column), and the median
    over rounds; for a latency or CPU figure the best is the lowest.
    """
    results = {
        "direct": [100, 100, 100],
        "haproxy": [10, 20, None],
        "nginx": [20, 10, 10],
        "portproxy-python": [50, 50, 50],
        "portproxy": [10, 30, 5],
    }
    assert peers.bestPeerRatios(results, "portproxy", True) == 0.5
    assert peers.bestPeerRatios(results, "portproxy", False) == 1.0


def test_engineThreadColumns():
    """
    --engine-threads 1,2 gives plain portproxy with the first count and a
    portproxy-t2 column with the second, each through the environment;
    portproxy-python turns the compiled paths off.
    """
    assert peers.portproxyVariants([1, 2], python=True) == [
        ("portproxy", {"PORTPROXY_ENGINE_THREADS": "1"}),
        ("portproxy-t2", {"PORTPROXY_ENGINE_THREADS": "2"}),
        ("portproxy-python", {"PORTPROXY_FASTPATH": "0"}),
    ]
    assert peers.portproxyVariants() == [("portproxy", {})]
    assert not peers.isPeer("portproxy-t2") and peers.isPeer("haproxy")


def test_machineTableBoundsTheRateByUserTime(monkeypatch, capsys):
    """
    The --machine table gives per connection the machine's, the proxy's and
    its system CPU in microseconds, and bounds portproxy's rate over the
    best peer's by the best peer's machine CPU over portproxy's less its
    user time.
    """
    for name in ("haproxy", "nginx", "portproxy"):
        monkeypatch.setitem(peers.PIDS, name, [1])
    names = ["direct", "haproxy", "nginx", "portproxy"]
    w = "http_close"
    machine = {
        w: {
            "direct": [120e-6],
            "haproxy": [250e-6],
            "nginx": [260e-6],
            "portproxy": [280e-6],
        }
    }
    cpu = {
        w: {
            "direct": [None],
            "haproxy": [120e-6],
            "nginx": [125e-6],
            "portproxy": [145e-6],
        }
    }
    system = {
        w: {
            "direct": [None],
            "haproxy": [100e-6],
            "nginx": [110e-6],
            "portproxy": [120e-6],
        }
    }
    peers.printMachineTable([w], names, cpu, system, machine)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == w and cells[1] == "120.0 / - / -"
    assert cells[4] == "280.0 / 145.0 / 120.0"
    assert cells[-1] == f"{250 / (280 - 25):.2f}"


def test_peerCPUCountsChildProcesses(monkeypatch):
    """
    A peer's CPU time includes the processes below the one it was started
    as (nginx's workers, socat's forks).
    """
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run([sys.executable, '-c',"
            " 'import time\\nend = time.process_time() + 0.5\\n"
            "while time.process_time() < end: pass\\ntime.sleep(30)'])",
        ]
    )
    try:
        monkeypatch.setitem(peers.PIDS, "busy", [parent.pid])
        deadline = time.monotonic() + 20
        while (peers.peerCPU("busy") or 0) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(peers.processTree(parent.pid)) == 2
        assert peers.peerCPU("busy") >= 0.4
    finally:
        for pid in reversed(peers.processTree(parent.pid)):
            os.kill(pid, 9)
        parent.wait()


def test_straceTableCounts():
    """
    strace -c's table gives each system call's calls and failures, not the
    total line.
    """
    assert wheretime.straceCounts(STRACE) == {
        "epoll_wait": (4000, 0),
        "recvfrom": (4000, 2000),
        "sendmsg": (2000, 0),
    }


def test_pyspyPhasesOfTheMainThread(tmp_path):
    """
    A sample in a system call is counted by the call's name, another by
    the phase of its innermost matching frame; other threads' samples are
    left out and epoll_wait is counted apart.
    """
    loop = "thread (7): MainThread;EPollReactor.doPoll (twisted/internet/epollreactor.py:244)"
    accept = loop + ";ListeningPort.doRead (twistedproxy/tcp.py:385)"
    dial = (
        accept
        + ";TCPListener.dial (twistedproxy/tcp.py:496);Dial.start (twistedproxy/tcp.py:1374)"
    )
    raw = tmp_path / "raw"
    raw.write_text(
        f"{loop};select_epoll_poll (selectmodule.c:1);epoll_wait (libc.so.6) 5\n"
        f"{accept};accept4 (libc.so.6) 2\n"
        f"{dial};socket (libc.so.6) 3\n"
        f"{dial};ListenerService.flowStarted (twistedproxy/listener.py:1) 1\n"
        "thread (8): other;run (x.py:1) 9\n"
    )
    phases, functions, calls, total = wheretime.pyspyPhases(str(raw), 7)
    assert total == 11
    assert phases == {
        "waiting in epoll_wait": 5,
        "dial (with admission and the flow object)": 1,
    }
    assert functions["Dial.start (twistedproxy/tcp.py)"] == 3
    assert calls == {"accept4": 2, "socket": 3}
