"""
What a TCP listener does with an established connection, written once and
run against both ways of relaying it (the C{tcpForwarding} fixture of
conftest.py): in Python, and through the compiled relay engine; on real
loopback sockets under a private epoll reactor.  What only one way has is
tested in test_tcp.py (Python, with fakes) and test_fastrelay.py (the
engine).
"""

from __future__ import annotations

import socket
import struct
import time

from fakes import messages
from zope.interface.verify import verifyObject

from twistedproxy.listener import IFlow


def sendReset(s: socket.socket) -> None:
    """
    Close C{s} with a TCP reset.
    """
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def endLine(logged) -> str:
    [line] = [m for m in messages(logged) if " in=" in m]
    return line


def test_relaysAndCounts(tcpForwarding, logged):
    """
    Bytes from the client reach the target and bytes from the target reach
    the client; the flow is an IFlow with the client's address, counting
    both ways while it runs and after it ended, with one access line.
    """
    f = tcpForwarding
    s = f.listen()
    svc = s.service
    client, target, flow = f.connect(s)
    verifyObject(IFlow, flow)
    assert flow.client == f"127.0.0.1:{client.getsockname()[1]}"
    assert flow.listener is svc.listener
    client.sendall(b"hello")
    assert f.receive(target, 5) == b"hello"
    target.sendall(b"answer!")
    assert f.receive(client, 7) == b"answer!"
    assert (flow.bytesIn, flow.bytesOut) == (5, 7)
    assert (svc.bytesIn, svc.bytesOut) == (5, 7)
    _, _, second = f.connect(s)
    assert second.id > flow.id
    client.shutdown(socket.SHUT_WR)
    assert f.receiveAll(target) == b""
    target.close()
    assert f.receiveAll(client) == b""
    f.spin(lambda: len(svc.flows) == 1, what="the flow's end")
    host, port = s.targets.getsockname()
    assert endLine(logged).startswith(f"tcp web {flow.client} -> {host}:{port} ")
    assert endLine(logged).endswith("in=5 out=7 client closed")
    assert (svc.bytesIn, svc.bytesOut) == (5, 7)
    assert (svc.active, svc.counters.total) == (1, 2)


def test_halfCloseByClient(tcpForwarding, logged):
    """
    A request, the client's FIN, then the target's answer and its end of
    stream: the target sees the FIN after the request, the answer still
    reaches the client, and the flow ends as "client closed".
    """
    f = tcpForwarding
    s = f.listen()
    client, target, _ = f.connect(s)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert f.receiveAll(target) == b"request"
    target.sendall(b"response")
    target.shutdown(socket.SHUT_WR)
    assert f.receiveAll(client) == b"response"
    f.spin(lambda: not s.service.flows, what="the flow's end")
    assert endLine(logged).endswith("in=7 out=8 client closed")


def test_halfCloseByTarget(tcpForwarding, logged):
    """
    A target that sends and ends first still receives what the client
    sends afterwards, and the flow ends as "target closed".
    """
    f = tcpForwarding
    s = f.listen()
    client, target, _ = f.connect(s)
    target.sendall(b"banner")
    target.shutdown(socket.SHUT_WR)
    assert f.receiveAll(client) == b"banner"
    client.sendall(b"more")
    assert f.receive(target, 4) == b"more"
    client.shutdown(socket.SHUT_WR)
    assert f.receiveAll(target) == b""
    f.spin(lambda: not s.service.flows, what="the flow's end")
    assert endLine(logged).endswith("in=4 out=6 target closed")


def test_resetByClientResetsTarget(tcpForwarding, logged):
    """
    A client that resets makes the proxy reset the target (not close it
    cleanly), and the access line says so.
    """
    f = tcpForwarding
    s = f.listen()
    client, target, _ = f.connect(s)
    client.sendall(b"x")
    assert f.receive(target, 1) == b"x"
    s.sockets.remove(client)
    sendReset(client)
    f.assertReset(target)
    f.spin(lambda: not s.service.flows, what="the flow's end")
    assert endLine(logged).endswith("in=1 out=0 reset by client")


def test_resetByTargetResetsClient(tcpForwarding, logged):
    """
    A target that resets makes the proxy reset the client.
    """
    f = tcpForwarding
    s = f.listen()
    client, target, _ = f.connect(s)
    s.sockets.remove(target)
    sendReset(target)
    f.assertReset(client)
    f.spin(lambda: not s.service.flows, what="the flow's end")
    assert endLine(logged).endswith("in=0 out=0 reset by target")


def test_idleTimeout(tcpForwarding, logged):
    """
    A connection with nothing sent either way for idle_timeout is reset on
    both sides, not before the timeout after its last byte, with "idle
    timeout" in its access line; a connection without one stays.
    """
    f = tcpForwarding
    s = f.listen(idle=0.5)
    forever = f.listen()
    quietClient, quietTarget, _ = f.connect(s)
    foreverClient, foreverTarget, _ = f.connect(forever)
    sent = time.monotonic()
    quietClient.sendall(b"a")
    assert f.receive(quietTarget, 1) == b"a"
    f.assertReset(quietClient)
    assert time.monotonic() - sent >= 0.5
    f.assertReset(quietTarget)
    f.spin(lambda: not s.service.flows, what="the quiet flow's end")
    assert endLine(logged).endswith("in=1 out=0 idle timeout")
    assert forever.service.active == 1
    foreverClient.sendall(b"still here")
    assert f.receive(foreverTarget, 10) == b"still here"


def test_kill(tcpForwarding, logged):
    """
    Closing a flow (the manhole's kill) resets both peers and ends it with
    the reason given and its counters; other flows go on.
    """
    f = tcpForwarding
    s = f.listen()
    client, target, flow = f.connect(s)
    otherClient, otherTarget, _ = f.connect(s)
    client.sendall(b"abc")
    assert f.receive(target, 3) == b"abc"
    flow.close("killed from the manhole")
    f.assertReset(client)
    f.assertReset(target)
    f.spin(lambda: len(s.service.flows) == 1, what="the flow's end")
    assert endLine(logged).endswith("in=3 out=0 killed from the manhole")
    assert (flow.bytesIn, flow.bytesOut) == (3, 0)
    otherClient.sendall(b"ok")
    assert f.receive(otherTarget, 2) == b"ok"
