"""
End-to-end tests of the map's C{http} section: a real twistd, real traffic
on loopback, and C{/metrics} read as Prometheus reads it (the exposition
format parsed by C{prometheus_client}'s parser), C{/healthz} and
C{/status.json} over HTTP.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from support import TCPEchoServer, UDPEchoServer, exchange, freePort, waitUntil


def get(port: int, path: str) -> tuple[int, str]:
    """
    The status and body of C{GET path} on the proxy's HTTP endpoint.
    """
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}{path}", timeout=10
        ) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(port: int) -> dict:
    """
    Every sample of C{/metrics}: C{{(name, ((label, value), ...)): value}}.
    """
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def waitForMetric(port: int, key: tuple, value: float, timeout: float = 10.0) -> dict:
    """
    Scrape until C{key} has C{value} (flows end asynchronously).
    """

    def scrape():
        scraped = metrics(port)
        return scraped if scraped.get(key) == value else None

    return waitUntil(scrape, timeout, what=f"{key} at {value}", interval=0.05)


def turnedAway(port: int) -> None:
    """
    Connect to C{port} and wait until the proxy closes the connection (with
    a FIN or a reset, which can come before connect() even returns).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(10) == b""
    except ConnectionResetError:
        pass


def labels(mapping: str, proto: str = "tcp", **extra) -> tuple:
    return tuple(sorted({"mapping": mapping, "proto": proto, **extra}.items()))


def test_metricsCountTraffic(proxy) -> None:
    """
    C{/metrics} counts exactly what the test sent, on both paths: flows,
    bytes each way (of open flows too), rejections over the limit, connect
    failures by reason, UDP sessions, the duration histogram, listeners,
    and whether the engines run.
    """
    http = freePort()
    web, refused, limited, dns = freePort(), freePort(), freePort(), freePort("udp")
    closed = freePort()
    with TCPEchoServer() as echo, UDPEchoServer() as udpEcho:
        proxy.start(
            f"""
http:
  listen: 127.0.0.1:{http}
mappings:
  - name: web
    listen: 127.0.0.1:{web}
    target: 127.0.0.1:{echo.port}
  - name: refused
    listen: 127.0.0.1:{refused}
    target: 127.0.0.1:{closed}
  - name: limited
    listen: 127.0.0.1:{limited}
    target: 127.0.0.1:{echo.port}
    max_connections: 1
  - name: dns
    proto: udp
    listen: 127.0.0.1:{dns}
    target: 127.0.0.1:{udpEcho.port}
"""
        )
        payloads = [b"a" * 10, b"b" * 2000, b"c" * 300000]
        for payload in payloads:
            assert exchange(web, payload) == payload
        sent = sum(len(p) for p in payloads)
        waitForMetric(http, ("portproxy_flows_total", labels("web")), 3)
        scraped = waitForMetric(
            http, ("portproxy_flow_duration_seconds_count", labels("web")), 3
        )
        assert scraped[("portproxy_received_bytes_total", labels("web"))] == sent
        assert scraped[("portproxy_sent_bytes_total", labels("web"))] == sent
        assert (
            scraped[
                ("portproxy_flow_duration_seconds_bucket", labels("web", le="+Inf"))
            ]
            == 3
        )
        assert scraped[("portproxy_open", labels("web"))] == 0

        turnedAway(refused)
        waitForMetric(
            http,
            (
                "portproxy_connect_failures_total",
                labels("refused", reason="connection refused"),
            ),
            1,
        )

        held = socket.create_connection(("127.0.0.1", limited), timeout=10)
        held.sendall(b"x" * 1234)
        assert held.recv(2000) == b"x" * 1234
        # Counted while the connection is open, from the engine's counters
        # on the fast path.
        scraped = waitForMetric(
            http, ("portproxy_received_bytes_total", labels("limited")), 1234
        )
        assert scraped[("portproxy_open", labels("limited"))] == 1
        turnedAway(limited)
        waitForMetric(
            http, ("portproxy_rejected_total", labels("limited", reason="limit")), 1
        )
        held.close()

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            for size in (100, 200):
                client.sendto(b"d" * size, ("127.0.0.1", dns))
                assert client.recv(1000) == b"d" * size
        scraped = waitForMetric(
            http, ("portproxy_sent_bytes_total", labels("dns", "udp")), 300
        )
        assert scraped[("portproxy_received_bytes_total", labels("dns", "udp"))] == 300
        assert scraped[("portproxy_open", labels("dns", "udp"))] == 1
        assert scraped[("portproxy_flows_total", labels("dns", "udp"))] == 1
        assert (
            scraped[("portproxy_udp_dropped_datagrams_total", (("mapping", "dns"),))]
            == 0
        )
        assert scraped[("portproxy_listeners", labels("dns", "udp"))] == 1
        assert scraped[("portproxy_listeners_failed", ())] == 0
        engine = 1 if proxy.fastPath else 0
        assert (
            scraped[("portproxy_engine_enabled", (("engine", "tcp_relay"),))] == engine
        )
        assert scraped[("portproxy_engine_enabled", (("engine", "udp"),))] == engine


def test_healthzAndReload(proxy, tmp_path) -> None:
    """
    C{/healthz} says 200 while every listener is bound and 503, naming
    it, after a reload added one that could not bind; C{/metrics} counts
    the reloads; a reload moves the endpoint and removes it.
    """
    http, web, taken = freePort(), freePort(), freePort()
    mapping = f"""
mappings:
  - name: web
    listen: 127.0.0.1:{web}
    target: 127.0.0.1:9
"""
    proxy.start(f"http:\n  listen: 127.0.0.1:{http}\n" + mapping)
    assert get(http, "/healthz") == (200, "ok\n")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen(1)
        summary = proxy.reload(
            f"http:\n  listen: 127.0.0.1:{http}\n"
            + mapping
            + f"  - name: blocked\n    listen: 127.0.0.1:{taken}\n    target: 127.0.0.1:9\n"
        )
        assert "failed 1" in summary
        status, body = get(http, "/healthz")
        assert (status, body) == (
            503,
            f"not bound: tcp 127.0.0.1:{taken} -> 127.0.0.1:9 [blocked]\n",
        )
        scraped = metrics(http)
        assert scraped[("portproxy_listeners_failed", ())] == 1
        assert scraped[("portproxy_reloads_total", (("result", "ok"),))] == 1
        assert scraped[("portproxy_last_reload_success", ())] == 1
    proxy.writeMap("http: [\n")
    assert "invalid" in proxy.reload()
    scraped = metrics(http)
    assert scraped[("portproxy_reloads_total", (("result", "failed"),))] == 1
    assert scraped[("portproxy_last_reload_success", ())] == 0

    moved = freePort()
    assert "failed 0" in proxy.reload(f"http:\n  listen: 127.0.0.1:{moved}\n" + mapping)
    assert get(moved, "/healthz") == (200, "ok\n")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", http)) != 0
    proxy.reload(mapping)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", moved)) != 0


def test_statusJSON(proxy) -> None:
    """
    C{/status.json}, which the status page shows, has one entry per
    mapping with its listeners and counters, and the status page itself
    is served from the package with no outside asset.
    """
    http, web = freePort(), freePort()
    with TCPEchoServer() as echo:
        proxy.start(
            f"http:\n  listen: 127.0.0.1:{http}\nmappings:\n"
            f"  - name: web\n    proto: [tcp, udp]\n    listen: 127.0.0.1:{web}\n"
            f"    target: 127.0.0.1:{echo.port}\n"
        )
        assert exchange(web, b"hello") == b"hello"

        def counted():
            status, body = get(http, "/status.json")
            entry = json.loads(body)["mappings"][0]
            return (status, entry) if entry["total"] == 1 else None

        status, entry = waitUntil(counted, what="the connection counted", interval=0.05)
    assert status == 200
    assert {
        k: entry[k]
        for k in (
            "name",
            "protos",
            "listen",
            "listeners",
            "total",
            "bytesIn",
            "bytesOut",
        )
    } == {
        "name": "web",
        "protos": "tcp+udp",
        "listen": f"127.0.0.1:{web}",
        "listeners": 2,
        "total": 1,
        "bytesIn": 5,
        "bytesOut": 5,
    }
    status, page = get(http, "/")
    assert status == 200 and "<svg" not in page.split("<script>")[0]
    assert "status.json" in page
    for outside in ("http://", "https://", "//cdn"):
        assert outside not in page
