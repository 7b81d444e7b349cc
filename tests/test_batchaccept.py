"""
Tests for the batch path of the compiled TCP engine over real loopback
sockets: C{acceptBatch} (every waiting client in one call) and
C{TCPEngine.dial} (connect, PROXY header and adopt for a batch of
clients, failures reported back).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import pytest
from support import unansweringTarget

from twistedproxy.tcp import engine as fastrelay

pytestmark = pytest.mark.skipif(
    not fastrelay.available(), reason="twistedproxy.tcp._engine is not built"
)


@pytest.fixture
def engine():
    """
    A compiled engine with two relay threads, stopped after the test.
    """
    made = fastrelay.CompiledTCPEngine(threads=2)
    yield made
    made.stop()


@pytest.fixture
def listening():
    """
    A non-blocking listening socket on loopback (the proxy's).
    """
    skt = socket.socket()
    skt.bind(("127.0.0.1", 0))
    skt.listen(64)
    skt.setblocking(False)
    yield skt
    skt.close()


@pytest.fixture
def target():
    """
    A listening socket on loopback (the target).
    """
    skt = socket.socket()
    skt.bind(("127.0.0.1", 0))
    skt.listen(64)
    skt.settimeout(10)
    yield skt
    skt.close()


def connectClients(listening: socket.socket, count: int) -> list[socket.socket]:
    """
    C{count} clients connected to C{listening}, waiting in its queue.
    """
    clients = []
    for _ in range(count):
        client = socket.create_connection(listening.getsockname())
        client.settimeout(10)
        clients.append(client)
    return clients


def waitReports(engine, count: int, timeout: float = 10.0) -> list[tuple]:
    """
    The engine's end reports, until C{count} came.
    """
    reports: list[tuple] = []
    deadline = time.monotonic() + timeout
    while len(reports) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {reports} after {timeout}s"
        select.select([engine.fileno()], [], [], left)
        reports.extend(engine.reports())
    return reports


def relayOnce(
    clients: list[socket.socket], addresses: list[str], target: socket.socket
) -> None:
    """
    For each of C{addresses} (as the engine accepted them), in order: the
    target accepts its flow, 4 bytes go from the client and 5 back, and
    both ends close.
    """
    byPort = {c.getsockname()[1]: c for c in clients}
    for address in addresses:
        client = byPort[int(address.rpartition(":")[2])]
        served, _ = target.accept()
        client.sendall(b"ping")
        assert served.recv(4) == b"ping"
        served.sendall(b"pong!")
        assert client.recv(5) == b"pong!"
        served.close()
        client.close()


def freeLoopbackPort() -> int:
    """
    A loopback port nothing listens on (bound, then closed).
    """
    skt = socket.socket()
    skt.bind(("127.0.0.1", 0))
    port = skt.getsockname()[1]
    skt.close()
    return port


def test_acceptBatchTakesEveryWaitingClient(listening) -> None:
    """
    One call accepts every waiting client, each as a non-blocking
    descriptor with its address as the access line writes it, and says
    the queue ended cleanly (errno 0); an empty queue gives none.
    """
    clients = connectClients(listening, 5)
    try:
        accepted, error = fastrelay.acceptClients(listening.fileno(), 100)
        assert error == 0
        assert sorted(address for _, address in accepted) == sorted(
            f"127.0.0.1:{c.getsockname()[1]}" for c in clients
        )
        for fd, _ in accepted:
            assert os.get_blocking(fd) is False
            os.close(fd)
        assert fastrelay.acceptClients(listening.fileno(), 100) == ([], 0)
    finally:
        for c in clients:
            c.close()


def test_acceptBatchTakesAtMostTheLimit(listening) -> None:
    """
    C{most} bounds a batch; the clients left wait for the next call.
    """
    clients = connectClients(listening, 4)
    try:
        first, error = fastrelay.acceptClients(listening.fileno(), 3)
        assert (len(first), error) == (3, 0)
        rest, error = fastrelay.acceptClients(listening.fileno(), 3)
        assert (len(rest), error) == (1, 0)
        for fd, _ in first + rest:
            os.close(fd)
    finally:
        for c in clients:
            c.close()


def test_acceptBatchReportsTheErrorThatStoppedIt() -> None:
    """
    A descriptor that is not a listening socket stops the batch with its
    errno, for the caller to handle after the clients it got.
    """
    r, w = os.pipe()
    try:
        assert fastrelay.acceptClients(r, 10) == ([], errno.ENOTSOCK)
    finally:
        os.close(r)
        os.close(w)


def test_dialAdoptsEveryClientOfABatch(engine, listening, target) -> None:
    """
    One C{dial} connects a target socket for each client of a batch and
    hands each pair to the engine (result 0), which relays both ways
    and reports each flow's end under its id.
    """
    clients = connectClients(listening, 3)
    accepted, _ = fastrelay.acceptClients(listening.fileno(), 10)
    ids = [101, 102, 103]
    results = engine.dial(
        [fd for fd, _ in accepted], ids, "127.0.0.1", target.getsockname()[1], 0.0
    )
    assert results == [0, 0, 0]
    relayOnce(clients, [address for _, address in accepted], target)
    reports = waitReports(engine, 3)
    assert sorted((r[0], r[1], r[2]) for r in reports) == [
        (101, 4, 5),
        (102, 4, 5),
        (103, 4, 5),
    ]


def waitFinished(engine, count: int, now: float, timeout: float = 10.0) -> tuple:
    """
    What C{finished(now)} returned, until the reports or group flows of
    C{count} flows came: the plain reports and the groups, each in one
    list.
    """
    plain: list[tuple] = []
    groups: list[tuple] = []
    deadline = time.monotonic() + timeout
    while len(plain) + sum(len(g[1]) for g in groups) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {plain} and {groups} after {timeout}s"
        select.select([engine.fileno()], [], [], left)
        more, moreGroups = engine.finished(now)
        plain.extend(more)
        groups.extend(moreGroups)
    return plain, groups


def test_finishedWritesTheAccessLines(engine, listening, target) -> None:
    """
    Flows dialed with an access tag come back from C{finished} grouped by
    it, with the access line Python would write for each (head, client,
    arrow, duration to three places, bytes, reason), its row, its
    duration and the bytes summed; a flow adopted without one comes back
    as C{reports} gives it.
    """
    clients = connectClients(listening, 3)
    accepted, _ = fastrelay.acceptClients(listening.fileno(), 10)
    listener = object()
    tag = ("service", listener, "tcp web ", " -> 127.0.0.1:80 ")
    addresses = [address for _, address in accepted]
    results = engine.dial(
        [fd for fd, _ in accepted[:2]],
        [701, 702],
        "127.0.0.1",
        target.getsockname()[1],
        0.0,
        None,
        tag,
        addresses[:2],
        1000.0,
    )
    assert results == [0, 0]
    assert engine.dial(
        [accepted[2][0]], [703], "127.0.0.1", target.getsockname()[1], 0.0
    ) == [0]
    relayOnce(clients, addresses, target)
    plain, groups = waitFinished(engine, 3, 1001.2345)
    assert [(r[0], r[1], r[2]) for r in plain] == [(703, 4, 5)]
    ids = [i for g in groups for i in g[1]]
    lines = "\n".join(g[2] for g in groups).split("\n")
    rows = [row for g in groups for row in g[3]]
    assert sorted(ids) == [701, 702]
    assert {g[0] for g in groups} == {"service"}
    assert sum(g[5] for g in groups) == 8 and sum(g[6] for g in groups) == 10
    for flowId, line, row in zip(ids, lines, rows, strict=True):
        client = addresses[flowId - 701]
        reason = row[-1]
        assert reason in ("client closed", "target closed")
        duration = 1001.2345 - 1000.0
        assert row == (flowId, listener, client, duration, 4, 5, None, reason)
        assert line == (
            f"tcp web {client} -> 127.0.0.1:80 {duration:.3f}s in=4 out=5 {reason}"
        )
    assert [d for g in groups for d in g[4]] == [1001.2345 - 1000.0] * 2


def test_dialRefusesABadAccessTag(engine, listening, target) -> None:
    """
    An access tag that is not (tag, listener, head, arrow) with one client
    each is refused before any socket is opened.
    """
    clients = connectClients(listening, 1)
    accepted, _ = fastrelay.acceptClients(listening.fileno(), 10)
    fd = accepted[0][0]
    port = target.getsockname()[1]
    try:
        with pytest.raises(ValueError):
            engine.dial([fd], [801], "127.0.0.1", port, 0.0, None, ("t",), ["c"], 0.0)
        with pytest.raises(ValueError):
            engine.dial([fd], [801], "127.0.0.1", port, 0.0, None, (1, 2, "h", "a"), [])
        with pytest.raises(TypeError):
            engine.dial(
                [fd], [801], "127.0.0.1", port, 0.0, None, (1, 2, "h", "a"), [5], 0.0
            )
    finally:
        os.close(fd)
        clients[0].close()


def test_dialSendsTheHeaderFirst(engine, listening, target) -> None:
    """
    With C{headers}, each target receives its own header before any byte
    of its client.
    """
    clients = connectClients(listening, 2)
    accepted, _ = fastrelay.acceptClients(listening.fileno(), 10)
    headers = [b"HEADER-ONE\r\n", b"HEADER-TWO\r\n"]
    results = engine.dial(
        [fd for fd, _ in accepted],
        [201, 202],
        "127.0.0.1",
        target.getsockname()[1],
        0.0,
        headers,
    )
    assert results == [0, 0]
    received = []
    for _ in clients:
        served, _ = target.accept()
        served.settimeout(10)
        received.append(served.recv(12))
        served.close()
    assert sorted(received) == sorted(headers)
    for c in clients:
        c.close()
    waitReports(engine, 2)


def test_dialReportsARefusedConnect(engine, listening) -> None:
    """
    A target that refuses gives the access line's words for it; the
    client's descriptor is still the caller's, and the engine has no
    flow.
    """
    (client,) = connectClients(listening, 1)
    accepted, _ = fastrelay.acceptClients(listening.fileno(), 10)
    ((fd, _),) = accepted
    results = engine.dial([fd], [301], "127.0.0.1", freeLoopbackPort(), 0.0)
    assert results == [os.strerror(errno.ECONNREFUSED).lower()]
    os.fstat(fd)  # still open, still ours
    os.close(fd)
    client.close()
    assert engine.flowCount() == 0


def test_dialRefusedByAStoppedEngine(engine, listening, target) -> None:
    """
    A stopped engine takes no flow: the result is None and the client's
    descriptor is still the caller's.
    """
    engine.stop()
    (client,) = connectClients(listening, 1)
    accepted, _ = fastrelay.acceptClients(listening.fileno(), 10)
    ((fd, _),) = accepted
    assert engine.dial([fd], [401], "127.0.0.1", target.getsockname()[1], 0.0) == [None]
    os.fstat(fd)
    os.close(fd)
    client.close()


def test_dialChecksItsArguments(engine) -> None:
    """
    A target that is not an IP address, mismatched lists or a header that
    is not bytes raise before any socket is opened.
    """
    with pytest.raises(ValueError, match="IP address"):
        engine.dial([5], [1], "localhost", 80, 0.0)
    with pytest.raises(ValueError, match="one flow id"):
        engine.dial([5, 6], [1], "127.0.0.1", 80, 0.0)
    with pytest.raises(TypeError):
        engine.dial([5], [1], "127.0.0.1", 80, 0.0, ["text"])
    with pytest.raises(ValueError, match="idleTimeout"):
        engine.dial([5], [1], "127.0.0.1", 80, -1.0)


def test_dialToIPv6(engine) -> None:
    """
    An IPv6 target is dialed as well as an IPv4 one.
    """
    server = socket.socket(socket.AF_INET6)
    server.bind(("::1", 0))
    server.listen(4)
    server.settimeout(10)
    proxyEnd, client = socket.socketpair()
    proxyEnd.setblocking(False)
    try:
        results = engine.dial(
            [proxyEnd.detach()], [501], "::1", server.getsockname()[1], 0.0
        )
        assert results == [0]
        served, _ = server.accept()
        client.sendall(b"six")
        served.settimeout(10)
        assert served.recv(3) == b"six"
        served.close()
        client.close()
        waitReports(engine, 1)
    finally:
        server.close()


def test_dialHandsBackAConnectUnderWay(engine, listening) -> None:
    """
    A target whose accept queue is full drops the SYN: the connect is
    under way, and C{dial} hands its socket's descriptor back (an int)
    for the caller to wait on; the client's is still the caller's.
    """
    with unansweringTarget() as (host, port):
        (client,) = connectClients(listening, 1)
        accepted, _ = fastrelay.acceptClients(listening.fileno(), 10)
        ((fd, _),) = accepted
        (result,) = engine.dial([fd], [601], host, port, 0.0)
        assert isinstance(result, int) and result > 0
        assert os.get_blocking(result) is False
        skt = socket.socket(fileno=result)
        assert skt.type == socket.SOCK_STREAM
        skt.close()
        os.close(fd)
        client.close()
        assert engine.flowCount() == 0
