"""
The map's C{http} section: an HTTP endpoint in the proxy process, served by
C{twisted.web}, for the tools operators point at a proxy.

    /             the status page (status.html, shipped in the package)
    /status.json  what the status page shows, refreshed by it every few seconds
    /metrics      Prometheus metrics (L{twistedproxy.metrics})
    /healthz      200 when every listener of the map is bound, 503 otherwise

Everything is read from the services when asked, except the traffic
history of the status page's graphs: one sample of each mapping's byte
totals every L{SAMPLE_INTERVAL} seconds, the last L{HISTORY} of them.
"""

from __future__ import annotations

import json
from collections import deque
from importlib.resources import files

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from twistedproxy.metrics import ProxyCollector, mappingTotals
from twistedproxy.model import Http, formatHostPort

#: Seconds between two samples of the traffic history.
SAMPLE_INTERVAL = 2.0

#: Samples kept: ten minutes of history.
HISTORY = 300


class TrafficHistory:
    """
    Each mapping's byte totals, sampled every L{SAMPLE_INTERVAL} seconds,
    and the rates between samples.

    @ivar samples: C{(time, {mapping: (bytesIn, bytesOut)})}, oldest first.
    """

    def __init__(self, proxy, reactor, size: int = HISTORY) -> None:
        self.proxy = proxy
        self.reactor = reactor
        self.samples: deque = deque(maxlen=size)

    def sample(self) -> None:
        byMapping: dict[str, tuple[int, int]] = {}
        for (mapping, _proto), totals in mappingTotals(self.proxy).items():
            bytesIn, bytesOut = byMapping.get(mapping, (0, 0))
            byMapping[mapping] = (
                bytesIn + totals["bytesIn"],
                bytesOut + totals["bytesOut"],
            )
        self.samples.append((self.reactor.seconds(), byMapping))

    def rates(self, mapping: str) -> tuple[list[float], list[float]]:
        """
        Bytes per second from and to the clients of C{mapping} between
        consecutive samples, oldest first.  A total that went down (a
        reload removed listeners) counts as no traffic.
        """
        rateIn, rateOut = [], []
        previous = None
        for when, byMapping in self.samples:
            current = byMapping.get(mapping)
            if previous is not None and current is not None and when > previous[0]:
                elapsed = when - previous[0]
                rateIn.append(max(0, current[0] - previous[1][0]) / elapsed)
                rateOut.append(max(0, current[1] - previous[1][1]) / elapsed)
            if current is not None:
                previous = (when, current)
        return rateIn, rateOut


def listenSummary(listeners) -> str:
    """
    The listen addresses of a mapping's listeners, short: each host once,
    with the port or the range of ports.
    """
    hosts: dict[str, None] = {}
    ports = set()
    for listener in listeners:
        hosts[listener.host] = None
        ports.add(listener.port)
    first, last = min(ports), max(ports)
    portText = str(first) if first == last else f"{first}-{last}"
    return ", ".join(
        f"[{host}]:{portText}" if ":" in host else f"{host}:{portText}"
        for host in hosts
    )


def statusDocument(proxy, history: TrafficHistory) -> dict:
    """
    What C{/status.json} answers: one entry per mapping of the map, and
    the process's listeners, engines and reloads.
    """
    totals = mappingTotals(proxy)
    unbound = proxy.unboundListeners()
    mappings = []
    for mapping in proxy.map.mappings:
        entry = {
            "name": mapping.name,
            "protos": "+".join(
                dict.fromkeys(listener.proto for listener in mapping.listeners)
            ),
            "listen": listenSummary(mapping.listeners),
            "target": str(mapping.listeners[0].target) if mapping.listeners else "",
            "listeners": 0,
            "unbound": sum(
                1 for listener in unbound if listener.mapping == mapping.name
            ),
            "open": 0,
            "total": 0,
            "rejected": 0,
            "bytesIn": 0,
            "bytesOut": 0,
            "dropped": 0,
        }
        for proto in ("tcp", "udp"):
            part = totals.get((mapping.name, proto))
            if part is not None:
                for key in (
                    "listeners",
                    "open",
                    "total",
                    "rejected",
                    "bytesIn",
                    "bytesOut",
                    "dropped",
                ):
                    entry[key] += part[key]
        rateIn, rateOut = history.rates(mapping.name)
        entry["rateIn"] = rateIn[-1] if rateIn else 0.0
        entry["rateOut"] = rateOut[-1] if rateOut else 0.0
        entry["history"] = {"in": rateIn, "out": rateOut}
        mappings.append(entry)
    counts = proxy.reloadCounts
    return {
        "time": proxy.reactor.seconds(),
        "interval": SAMPLE_INTERVAL,
        "config": proxy.configPath,
        "listeners": len(proxy.listeners),
        "unbound": [str(listener) for listener in unbound],
        "tcpRelayEngine": proxy.tcpEngine is not None,
        "reloads": {"ok": counts.ok, "failed": counts.failed, "last": counts.last},
        "mappings": mappings,
    }


class _JSON(Resource):
    isLeaf = True

    def __init__(self, document) -> None:
        Resource.__init__(self)
        self._document = document

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self._document()).encode("utf-8")


class _Health(Resource):
    """
    C{/healthz}: C{200 ok} when every listener of the map is bound; C{503}
    and the unbound listeners, one a line, when not.
    """

    isLeaf = True

    def __init__(self, proxy) -> None:
        Resource.__init__(self)
        self.proxy = proxy

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        unbound = self.proxy.unboundListeners()
        if not unbound:
            return b"ok\n"
        request.setResponseCode(503)
        lines = [f"not bound: {listener}" for listener in unbound]
        return ("\n".join(lines) + "\n").encode("utf-8")


class _Page(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        Resource.__init__(self)
        self.body = body

    def render_GET(self, request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.body


def statusPage() -> bytes:
    """
    The status page, from the package's data.
    """
    return files("twistedproxy").joinpath("status.html").read_bytes()


def endpoint(proxy, history: TrafficHistory) -> Resource:
    """
    The resource tree of the HTTP endpoint.
    """
    root = Resource()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    root.putChild(b"", _Page(statusPage()))
    root.putChild(b"index.html", _Page(statusPage()))
    root.putChild(b"status.json", _JSON(lambda: statusDocument(proxy, history)))
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", _Health(proxy))
    return root


class QuietSite(Site):
    """
    A site that logs nothing: no line when it starts or stops, and no
    access log (a scraper every second would fill the proxy's log).
    """

    noisy = False

    def log(self, request: Request) -> None:
        pass


class HttpService(Service):
    """
    The HTTP endpoint of the map's C{http} section, a child of the root
    service like the manhole.

    @ivar settings: its L{Http} section.
    """

    name = "http"

    def __init__(self, settings: Http, proxy, reactor) -> None:
        self.settings = settings
        self.proxy = proxy
        self.reactor = reactor
        self.history = TrafficHistory(proxy, reactor)
        self._sampler = LoopingCall(self.history.sample)
        self._sampler.clock = reactor
        self.port = None

    def bind(self) -> None:
        """
        Listen on the section's address; L{CannotListenError} when that
        fails.
        """
        site = QuietSite(endpoint(self.proxy, self.history))
        self.port = self.reactor.listenTCP(
            self.settings.port, site, interface=self.settings.host
        )

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None:
            self.bind()
        self._sampler.start(SAMPLE_INTERVAL, now=True)

    def stopService(self):
        Service.stopService(self)
        if self._sampler.running:
            self._sampler.stop()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None

    def __str__(self) -> str:
        return f"http on {formatHostPort(self.settings.host, self.settings.port)}"
