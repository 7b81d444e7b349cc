"""
Prometheus metrics of a running proxy, read from its services when
C{/metrics} is scraped.

Nothing here runs on the relay hot paths: the byte and flow counters are
the ones the listeners (and the compiled engines, through them) keep
anyway, and a scrape reads them, as the manhole's C{status()} does.  The
only per-flow work is one L{Durations.observe} when a flow ends.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

#: Upper bounds, in seconds, of the connection duration histogram's buckets.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
)


class Durations:
    """
    The durations of a listener's ended flows, as a histogram: a count per
    bucket of L{DURATION_BUCKETS} (and one above the last), and the sum.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def observeMany(self, durations: list[float]) -> None:
        """
        L{observe} each of C{durations}.
        """
        counts = self.counts
        for seconds in durations:
            counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += sum(durations)


def mappingTotals(proxy) -> dict[tuple[str, str], dict]:
    """
    What L{ProxyCollector} and the status page report of each mapping and
    protocol: the sums over its listeners, live and draining.

    @return: C{{(mapping, proto): totals}}, each totals a C{dict} with
        C{listeners}, C{open}, C{total}, C{rejected}, C{rejectedBy},
        C{connectFailed}, C{bytesIn}, C{bytesOut}, C{dropped} and
        C{durations} (bucket counts and sum).
    """
    result: dict[tuple[str, str], dict] = {}
    for mapping in proxy.map.mappings:
        for listener in mapping.listeners:
            _totalsOf(result, mapping.name, listener.proto)
    for service in proxy.allListeners():
        listener = service.listener
        totals = _totalsOf(result, listener.mapping, listener.proto)
        if service in proxy.draining:
            totals["draining"] += 1
        else:
            totals["listeners"] += 1
        counters = service.counters
        totals["open"] += service.active
        totals["total"] += counters.total
        totals["rejected"] += counters.rejected
        _addCounts(totals["rejectedBy"], counters.rejectedBy)
        _addCounts(totals["connectFailed"], counters.connectFailed)
        totals["bytesIn"] += service.bytesIn
        totals["bytesOut"] += service.bytesOut
        totals["dropped"] += getattr(service, "dropped", 0)
        durations = totals["durations"]
        for index, count in enumerate(service.durations.counts):
            durations[0][index] += count
        durations[1] += service.durations.sum
    return result


def _totalsOf(result: dict, mapping: str, proto: str) -> dict:
    totals = result.get((mapping, proto))
    if totals is None:
        totals = result[(mapping, proto)] = {
            "listeners": 0,
            "draining": 0,
            "open": 0,
            "total": 0,
            "rejected": 0,
            "rejectedBy": {},
            "connectFailed": {},
            "bytesIn": 0,
            "bytesOut": 0,
            "dropped": 0,
            "durations": [[0] * (len(DURATION_BUCKETS) + 1), 0.0],
        }
    return totals


def _addCounts(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


class ReloadCounts:
    """
    What the root service's reloads came to, for C{/metrics}.

    @ivar ok: reloads that applied a valid map (even when some listener
        of it failed to bind).
    @ivar failed: reloads refused (an invalid map) or that raised.
    @ivar last: C{time.time()} at the end of the last reload, or L{None}.
    @ivar lastOk: whether the last reload applied its map.
    """

    def __init__(self, clock=time.time) -> None:
        self.ok = 0
        self.failed = 0
        self.last = None
        self.lastOk = True
        self._clock = clock

    def reloaded(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self.last = self._clock()
        self.lastOk = ok


class ProxyCollector:
    """
    A C{prometheus_client} collector of one L{ProxyService}'s metrics;
    every family is built afresh at each scrape.
    """

    def __init__(self, proxy) -> None:
        self.proxy = proxy

    def describe(self) -> list:
        # Families are only known at scrape time; an empty description
        # keeps the registry from collecting at registration.
        return []

    def collect(self) -> Iterator:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        proxy = self.proxy
        labels = ["mapping", "proto"]
        opened = GaugeMetricFamily(
            "portproxy_open", "TCP connections or UDP sessions open now.", labels=labels
        )
        total = CounterMetricFamily(
            "portproxy_flows", "TCP connections or UDP sessions opened.", labels=labels
        )
        rejected = CounterMetricFamily(
            "portproxy_rejected",
            "Clients turned away (UDP: datagrams dropped that would have opened a"
            " session), by reason.",
            labels=[*labels, "reason"],
        )
        connectFailed = CounterMetricFamily(
            "portproxy_connect_failures",
            "TCP connections closed because the target did not answer, by reason.",
            labels=[*labels, "reason"],
        )
        bytesIn = CounterMetricFamily(
            "portproxy_received_bytes", "Bytes received from clients.", labels=labels
        )
        bytesOut = CounterMetricFamily(
            "portproxy_sent_bytes", "Bytes sent to clients.", labels=labels
        )
        dropped = CounterMetricFamily(
            "portproxy_udp_dropped_datagrams",
            "Datagrams of new UDP clients lost for want of room or of a socket.",
            labels=["mapping"],
        )
        listeners = GaugeMetricFamily(
            "portproxy_listeners", "Listening sockets bound.", labels=labels
        )
        durations = HistogramMetricFamily(
            "portproxy_flow_duration_seconds",
            "How long ended TCP connections and UDP sessions lasted.",
            labels=labels,
        )
        for (mapping, proto), totals in sorted(mappingTotals(proxy).items()):
            values = [mapping, proto]
            opened.add_metric(values, totals["open"])
            total.add_metric(values, totals["total"])
            for reason in ("limit", "disabled", "denied", "header"):
                totals["rejectedBy"].setdefault(reason, 0)
            for reason, count in sorted(totals["rejectedBy"].items()):
                rejected.add_metric([*values, reason], count)
            for reason, count in sorted(totals["connectFailed"].items()):
                connectFailed.add_metric([*values, reason], count)
            bytesIn.add_metric(values, totals["bytesIn"])
            bytesOut.add_metric(values, totals["bytesOut"])
            if proto == "udp":
                dropped.add_metric([mapping], totals["dropped"])
            listeners.add_metric(values, totals["listeners"])
            counts, seconds = totals["durations"]
            buckets, cumulative = [], 0
            for bound, count in zip(
                (*DURATION_BUCKETS, float("inf")), counts, strict=True
            ):
                cumulative += count
                buckets.append(
                    ("+Inf" if bound == float("inf") else repr(bound), cumulative)
                )
            durations.add_metric(values, buckets, seconds)
        yield from (opened, total, rejected, connectFailed, bytesIn, bytesOut, dropped)
        yield from (listeners, durations)

        failedBinds = GaugeMetricFamily(
            "portproxy_listeners_failed",
            "Listeners of the map that are not bound (they failed to bind).",
        )
        failedBinds.add_metric([], len(proxy.unboundListeners()))
        yield failedBinds

        reloads = CounterMetricFamily(
            "portproxy_reloads", "Reloads of the map, by result.", labels=["result"]
        )
        counts = proxy.reloadCounts
        reloads.add_metric(["ok"], counts.ok)
        reloads.add_metric(["failed"], counts.failed)
        yield reloads
        if counts.last is not None:
            last = GaugeMetricFamily(
                "portproxy_last_reload_timestamp_seconds",
                "When the last reload ended (Unix time).",
            )
            last.add_metric([], counts.last)
            yield last
            lastOk = GaugeMetricFamily(
                "portproxy_last_reload_success", "1 if the last reload applied its map."
            )
            lastOk.add_metric([], 1 if counts.lastOk else 0)
            yield lastOk

        engines = GaugeMetricFamily(
            "portproxy_engine_enabled",
            "1 where a compiled engine carries the traffic, 0 where Python does.",
            labels=["engine"],
        )
        engines.add_metric(["tcp_relay"], 0 if proxy.tcpEngine is None else 1)
        udpServices = [s for s in proxy.allListeners() if s.proto == "udp"]
        engines.add_metric(
            ["udp"],
            1 if udpServices and all(s.forwarder.compiled for s in udpServices) else 0,
        )
        yield engines
        if proxy.tcpEngine is not None:
            engineFlows = GaugeMetricFamily(
                "portproxy_tcp_relay_flows",
                "TCP connections the compiled relay engine carries.",
            )
            engineFlows.add_metric([], proxy.tcpEngine.flowCount())
            yield engineFlows
