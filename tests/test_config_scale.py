"""
How C{python -m twistedproxy check} scales: the hostile maps of issue 17
finish in well under a second with bounded memory (they took 29-42 s and
0.9-2.9 GB), and a valid 100,000-mapping map is checked in seconds.  Each
runs in a subprocess with a time bound and an address-space limit, so
that a regression fails the test instead of swapping the machine.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import proxyEnvironment

#: Generous bounds, in seconds of processor time, for a slow shared CI
#: machine; the figures measured are in docs/PERFORMANCE.md.
HOSTILE_SECONDS = 10.0
HOSTILE_MEMORY = 1 << 30
BIG_SECONDS = 10.0
BIG_MEMORY = 2 << 30

#: Checking a valid 100,000-mapping map, in seconds of processor time on
#: the 2-core build machine when quiet: issue 17 wants 3 s; this tree takes
#: 2.2-2.4 s there (docs/PERFORMANCE.md), the trees before 3.3-3.9 s and
#: 6.3-7.3 s.
HUNDRED_THOUSAND_SECONDS = 3.0
#: A loop of pure Python, and the processor time it takes on that machine
#: when quiet (the least of many runs; 0.94-1.25 s while six sessions
#: shared its 2 cores).
REFERENCE = "for i in range(3 * 10**7): pass"
QUIET_REFERENCE = 0.95
#: How much more a big check's processor time grows on a busy machine than
#: the reference loop's: the check walks 400 MB that other processes push
#: out of the shared caches, the loop a few bytes.  Measured: at load
#: average 7 on the 2 cores the old check took 7.9-9.2 s against 6.3-7.3 s
#: quiet, while the reference loop took 0.94-1.4 s.
CONTENTION = 1.3


def processorTime(command: list[str]) -> float:
    """
    The processor time (user and system) C{command} takes.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def check(path: Path, memory: int) -> tuple[subprocess.CompletedProcess, float]:
    """
    Run C{check} on C{path} with at most C{memory} bytes of address space;
    its result and the processor time it took (user and system: unlike the
    time on the clock, hardly changed by other work on a busy machine).
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "twistedproxy", "check", str(path)],
        capture_output=True,
        text=True,
        env=proxyEnvironment(),
        preexec_fn=limit,
        timeout=120,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    took = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(
        f"{path.name}: {took:.2f} s of processor time, {time.monotonic() - started:.2f} s on the clock"
    )
    return result, took


def writeMap(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text("\n".join(["mappings:", *lines]) + "\n")
    return path


def assertRefused(
    result: subprocess.CompletedProcess, took: float, more: int
) -> list[str]:
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 101
    assert lines[-1].endswith(f": and {more} more errors, from this line on")
    assert took < HOSTILE_SECONDS
    return lines


def test_sameListenFourThousandTimes(tmp_path) -> None:
    """
    4,000 mappings on one address and port: one overlap line each, the
    first 100 listed; in seconds, not the 42 s and 2.8 GB of one line per
    pair.
    """
    path = writeMap(
        tmp_path,
        [
            f"  - {{name: m{i}, listen: 127.0.0.1:8080, target: 127.0.0.1:80}}"
            for i in range(4000)
        ],
    )
    result, took = check(path, HOSTILE_MEMORY)
    lines = assertRefused(result, took, 3899)
    assert (
        lines[0]
        == f"{path}:3: listen: tcp 127.0.0.1:8080 overlaps mapping 'm0' (line 2)"
    )


def test_fourThousandAliasesOfOneMapping(tmp_path) -> None:
    """
    4,000 aliases (C{- *m}) of one mapping are one error, read once.
    """
    path = writeMap(
        tmp_path,
        [
            "  - &m {name: m, listen: 127.0.0.1:8080, target: 127.0.0.1:80}",
            *["  - *m"] * 4000,
        ],
    )
    result, took = check(path, HOSTILE_MEMORY)
    assert result.returncode == 1 and took < HOSTILE_SECONDS
    assert result.stderr.splitlines() == [
        f"{path}:2: mappings[0]: an alias repeats it as mappings[1] and 3999 more;"
        " list each mapping once"
    ]


def test_twentyFullRangesBothProtocols(tmp_path) -> None:
    """
    20 mappings of C{proto: [tcp, udp]} and C{listen: 1-65535} (5.2 million
    listeners if expanded) are checked as intervals: one line for each
    later mapping, counting its 262,140 colliding listeners.
    """
    path = writeMap(
        tmp_path,
        [
            f"  - {{name: m{i}, proto: [tcp, udp], listen: 1-65535, target: 127.0.0.1:1-65535}}"
            for i in range(20)
        ],
    )
    result, took = check(path, HOSTILE_MEMORY)
    assert result.returncode == 1 and took < HOSTILE_SECONDS
    lines = result.stderr.splitlines()
    assert len(lines) == 19
    assert lines[0] == (
        f"{path}:3: listen: tcp 0.0.0.0:1 overlaps mapping 'm0' (line 2);"
        " 262139 more of its listeners overlap earlier mappings"
    )


def test_manyErrorsOfEveryKind(tmp_path) -> None:
    """
    20,000 mappings each with several errors (bad numbers, huge integers,
    control characters) list 100 lines and a count, quickly.
    """
    bad = '{name: "m\\n%d", listen: 017, target: "db:%s", idle_timeout: 1:30, max_connections: %s}'
    huge = "9" * 5000
    path = writeMap(
        tmp_path,
        [
            f"  - {bad % (i, huge if i < 20 else 80, huge if i < 20 else '+1')}"
            for i in range(20000)
        ],
    )
    result, took = check(path, HOSTILE_MEMORY)
    lines = assertRefused(result, took, 79920)
    assert all(line.isprintable() and len(line) < 1000 for line in lines)


def hundredThousandMappings() -> list[str]:
    """
    The lines of 100,000 valid one-line mappings over 250 loopback
    addresses, as C{bench/bigmap.py} writes them.
    """
    lines = []
    for i in range(100_000):
        host, port = 1 + i % 250, 10000 + i // 250
        lines.append(
            f"  - {{name: m{i}, listen: 127.0.0.{host}:{port},"
            f" target: 127.0.1.{host}:{port}}}"
        )
    return lines


@pytest.mark.slow
def test_hundredThousandMappings(tmp_path) -> None:
    """
    A valid map of 100,000 mappings is checked within
    HUNDRED_THOUSAND_SECONDS of processor time on the quiet build machine:
    the bound grows with how much slower than there a reference loop of
    pure Python runs here, just before and after (the slower of the two),
    and by CONTENTION when the machine is busy.
    """
    path = writeMap(tmp_path, hundredThousandMappings())
    reference = [sys.executable, "-c", REFERENCE]
    before = processorTime(reference)
    result, took = check(path, BIG_MEMORY)
    slower = max(before, processorTime(reference)) / QUIET_REFERENCE
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{path}: OK, 100000 mappings, 100000 listeners")
    bound = HUNDRED_THOUSAND_SECONDS * max(1.0, slower)
    if slower > 1.1 or os.getloadavg()[0] > os.cpu_count():
        bound *= CONTENTION
    print(f"bound {bound:.2f} s (reference {slower:.2f} times the quiet one)")
    assert took < bound


@pytest.mark.slow
def test_fullRangeBuilt(tmp_path) -> None:
    """
    A valid C{proto: [tcp, udp]}, C{listen: 1-65535} mapping is built into
    its 262,140 listeners within BIG_SECONDS (about half a second).
    """
    path = writeMap(
        tmp_path, ["  - {proto: [tcp, udp], listen: 1-65535, target: db:1-65535}"]
    )
    result, took = check(path, BIG_MEMORY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "262140 listeners (131070 tcp, 131070 udp)" in result.stdout
    assert took < BIG_SECONDS
