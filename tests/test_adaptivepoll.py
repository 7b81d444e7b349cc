"""
Tests of the busy-poll the compiled engines share
(C{twistedproxy/_engine.h}): over real loopback sockets, when the TCP
relay threads and the UDP engine thread poll and when they never do.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from test_fastrelay import Flow, recvAll, recvExactly
from test_fastudp import Bench, connected, nextEvents

from twistedproxy.tcp import engine as fastrelay
from twistedproxy.udp import engine as fastudp

needsEngines = pytest.mark.skipif(
    not (fastrelay.available() and fastudp.available()),
    reason="the compiled engines are not built",
)


def tcpRoundTrips(engine, flow, until, timeout=10.0) -> int:
    """
    Ping-pong 16 bytes through flow until C{until()} or for C{timeout}
    seconds; the round trips made.
    """
    deadline = time.monotonic() + timeout
    count = 0
    while not until() and time.monotonic() < deadline:
        flow.client.sendall(b"ping" * 4)
        assert recvExactly(flow.target, 16) == b"ping" * 4
        flow.target.sendall(b"pong" * 4)
        assert recvExactly(flow.client, 16) == b"pong" * 4
        count += 1
    return count


@needsEngines
def test_tcpRequestResponsePolls():
    """
    Request/response traffic through a relay thread whose ceiling covers
    the test's own turnaround makes the thread poll, and some polls catch
    the next request or answer.
    """
    engine = fastrelay.CompiledTCPEngine(threads=1, busyPoll=1000000)
    try:
        flow = Flow(engine, 1)
        tcpRoundTrips(engine, flow, lambda: engine.pollCounters()[1] > 0)
        polls, caught, preempted = engine.pollCounters()
        assert 0 < caught <= polls
        assert preempted <= polls
        flow.close()
    finally:
        engine.stop()


@needsEngines
def test_tcpPollsOnlyForFewFlows():
    """
    Request/response traffic on more flows than POLL_MAX_FLOWS at once
    keeps a relay thread from polling (the poll would take the CPU from
    the peers of so many flows; only a pause of the test's own that leaves
    fewer flows active in a window lets a poll through), where one flow
    polls after about every round trip; once only one flow is left it
    polls again.
    """
    engine = fastrelay.CompiledTCPEngine(threads=1, busyPoll=1000000)
    flows = [Flow(engine, i) for i in range(1, 9)]
    try:

        def roundRobin(seconds: float) -> int:
            deadline = time.monotonic() + seconds
            trips = 0
            while time.monotonic() < deadline:
                for flow in flows:
                    flow.client.sendall(b"ping")
                    assert recvExactly(flow.target, 4) == b"ping"
                    flow.target.sendall(b"pong")
                    assert recvExactly(flow.client, 4) == b"pong"
                trips += len(flows)
            return trips

        # Two windows of 10 ms for the count of flows to cover all eight.
        roundRobin(0.1)
        before = engine.pollCounters()
        trips = roundRobin(0.3)
        assert engine.pollCounters()[0] - before[0] <= trips // 20
        polls = engine.pollCounters()[0]
        tcpRoundTrips(engine, flows[0], lambda: engine.pollCounters()[0] > polls)
        assert engine.pollCounters()[0] > polls
    finally:
        for flow in flows:
            flow.close()
        engine.stop()


@needsEngines
def test_tcpWithoutCeilingNeverPolls():
    """
    With busyPoll=0 the relay threads sleep at once after every batch,
    however much request/response traffic passes.
    """
    engine = fastrelay.CompiledTCPEngine(busyPoll=0)
    try:
        flow = Flow(engine, 1)
        assert tcpRoundTrips(engine, flow, lambda: False, timeout=0.5) > 10
        assert engine.pollCounters() == (0, 0, 0)
        flow.close()
    finally:
        engine.stop()


@needsEngines
def test_tcpOneWayStreamNeverPolls():
    """
    A one-way stream never turns direction, so its relay thread never
    polls, whatever the ceiling: it leaves the CPU to the peers.
    """
    engine = fastrelay.CompiledTCPEngine(threads=1, busyPoll=1000000)
    try:
        flow = Flow(engine, 1)
        data = os.urandom(1024 * 1024) * 8

        def send() -> None:
            for i in range(0, len(data), 1000):
                flow.client.sendall(data[i : i + 1000])
            flow.client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        assert recvAll(flow.target) == data
        sender.join()
        assert engine.pollCounters() == (0, 0, 0)
        flow.close()
    finally:
        engine.stop()


def udpSession(busyPoll: int):
    """
    A UDP engine with the given ceiling and one adopted session: (bench,
    client socket).
    """
    b = Bench(busyPoll=busyPoll)
    client = b.client()
    client.sendto(b"hello", b.address)
    [event] = nextEvents(b.engine)
    b.engine.adopt(event[2], connected(b.target.getsockname()[:2]).detach(), 1, 30.0)
    return b, client


def udpRoundTrips(b, client, until, timeout=10.0) -> int:
    """
    Ping-pong datagrams through the session until C{until()} or for
    C{timeout} seconds; the round trips made.
    """
    assert b.target.recvfrom(100)[0] == b"hello"
    deadline = time.monotonic() + timeout
    count = 0
    while not until() and time.monotonic() < deadline:
        udpRoundTrip(b, client)
        count += 1
    return count


def udpRoundTrip(b, client) -> None:
    """
    One datagram from C{client} to the target through its session, and
    one back.
    """
    client.sendto(b"ping", b.address)
    data, session = b.target.recvfrom(100)
    assert data == b"ping"
    b.target.sendto(b"pong", session)
    assert client.recvfrom(100) == (b"pong", b.address)


@needsEngines
def test_udpRequestResponsePolls():
    """
    Requests and replies through the UDP engine thread, with a ceiling that
    covers the test's turnaround, make it poll, and some polls catch the
    next datagram.
    """
    b, client = udpSession(1000000)
    try:
        udpRoundTrips(b, client, lambda: b.engine.pollCounters()[1] > 0)
        polls, caught, preempted = b.engine.pollCounters()
        assert 0 < caught <= polls
        assert preempted <= polls
    finally:
        b.close()


@needsEngines
def test_udpPollsOnlyForFewSessions():
    """
    Requests and replies on more sessions than POLL_MAX_FLOWS at once keep
    the UDP engine thread from polling (but for a pause of the test's own,
    as for TCP above); once only one session is left it polls again.
    """
    b = Bench(busyPoll=1000000)
    try:
        clients = []
        for _ in range(8):
            client = b.client()
            client.sendto(b"hello", b.address)
            [event] = nextEvents(b.engine)
            target = connected(b.target.getsockname()[:2]).detach()
            b.engine.adopt(event[2], target, len(clients) + 1, 30.0)
            assert b.target.recvfrom(100)[0] == b"hello"
            clients.append(client)

        def roundRobin(seconds: float) -> int:
            deadline = time.monotonic() + seconds
            trips = 0
            while time.monotonic() < deadline:
                for client in clients:
                    udpRoundTrip(b, client)
                trips += len(clients)
            return trips

        # Two windows of 10 ms for the count of sessions to cover all eight.
        roundRobin(0.1)
        before = b.engine.pollCounters()
        trips = roundRobin(0.3)
        assert b.engine.pollCounters()[0] - before[0] <= trips // 20
        before = b.engine.pollCounters()
        deadline = time.monotonic() + 10
        while b.engine.pollCounters()[0] == before[0] and time.monotonic() < deadline:
            udpRoundTrip(b, clients[0])
        assert b.engine.pollCounters()[0] > before[0]
    finally:
        b.close()


@needsEngines
def test_udpWithoutCeilingNeverPolls():
    """
    With busyPoll=0 the UDP engine thread sleeps at once after every
    batch, however many requests and replies pass.
    """
    b, client = udpSession(0)
    try:
        assert udpRoundTrips(b, client, lambda: False, timeout=0.5) > 10
        assert b.engine.pollCounters() == (0, 0, 0)
    finally:
        b.close()


@needsEngines
def test_udpOneWayTrafficNeverPolls():
    """
    Datagrams that only go from the client to the target never turn, so
    the UDP engine thread never polls, whatever the ceiling.
    """
    b, client = udpSession(1000000)
    try:
        assert b.target.recvfrom(100)[0] == b"hello"
        for i in range(300):
            client.sendto(b"%d" % i, b.address)
            assert b.target.recvfrom(100)[0] == b"%d" % i
        assert b.engine.pollCounters() == (0, 0, 0)
    finally:
        b.close()


@needsEngines
def test_badCeilingRefused():
    """
    A negative ceiling, or one over a second, is refused by both engines
    with ValueError.
    """
    from twistedproxy.udp._engine import UDPEngine

    for bad in (-1, 1000001):
        with pytest.raises(ValueError, match="busyPoll"):
            fastrelay.CompiledTCPEngine(busyPoll=bad)
        with pytest.raises(ValueError, match="busyPoll"):
            UDPEngine(busyPoll=bad)
