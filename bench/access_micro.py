#!/usr/bin/env python3
"""
What the access checks cost a new connection, in the proxy's own process:
L{ListenerService.admit}, then L{flowStarted} and L{flowEnded} (the
per-client accounting), for a listener with the --access defaults of
bench/peers.py (a 1,000-entry deny list and every per-client limit on)
and for the same listener without them.  Interleaved, best of several
repeats, so that a busy machine moves the figures less than it moves a
throughput run.

    python bench/access_micro.py
"""

import sys
import time

from peers import accessDefaults
from twisted.internet.task import Clock

from twistedproxy import listener
from twistedproxy.access import hostOf
from twistedproxy.config import parseMap
from twistedproxy.model import Listener
from twistedproxy.tcp.listener import TCPListener

FLOWS = 50000
REPEATS = 7


class Flow:
    """
    The least a flow needs for the listener's bookkeeping.
    """

    __slots__ = ("bytesIn", "bytesOut", "client", "id", "listener", "started")

    def __init__(self, flowId, settings):
        self.id = flowId
        self.client = f"127.0.0.1:{1024 + flowId % 60000}"
        self.bytesIn = self.bytesOut = 0
        self.listener = settings
        self.started = 0.0


def perConnection(service, flows):
    start = time.perf_counter()
    for flow in flows:
        if service.admit(hostOf(flow.client)) is not None:
            raise SystemExit("the benchmark's client was refused")
        service.flowStarted(flow)
        service.flowEnded(flow, "closed")
    return (time.perf_counter() - start) / len(flows)


def main():
    proxyMap = parseMap(
        accessDefaults()
        + "mappings:\n  - {name: web, listen: 127.0.0.1:8000, target: 127.0.0.1:80}\n",
        "access.yaml",
    )
    checked = next(proxyMap.listeners())
    plain = Listener(
        checked.mapping, checked.proto, checked.host, checked.port, checked.target
    )
    # The access lines are not what is measured.
    listener.accessLog.write = lambda *args: None
    best = {}
    for _ in range(REPEATS):
        for name, settings in (("plain", plain), ("access", checked)):
            service = TCPListener(settings, Clock(), backlog=1)
            flows = [Flow(i, settings) for i in range(FLOWS)]
            cost = perConnection(service, flows)
            best[name] = min(best.get(name, cost), cost)
    extra = best["access"] - best["plain"]
    print(f"admit + flowStarted + flowEnded, best of {REPEATS} x {FLOWS}:")
    print(f"  without access settings: {best['plain'] * 1e6:.2f} us per connection")
    print(
        f"  1,000-entry deny list and per-client limits: {best['access'] * 1e6:.2f} us per connection"
    )
    print(f"  the checks add {extra * 1e6:.2f} us per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
