"""
Unit tests of the operating features: the map's C{http} and C{log_format},
the reload plan of the HTTP endpoint, the metrics collector, the JSON log
formatter and the systemd notifier, with Twisted's fakes.
"""

from __future__ import annotations

import io
import json
import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import FileLogObserver, LogLevel, formatEventAsClassicLogText

from twistedproxy import logs
from twistedproxy.config import ConfigError, parseMap
from twistedproxy.listener import connectFailureKind
from twistedproxy.logs import jsonLines, useLogFormat
from twistedproxy.metrics import DURATION_BUCKETS, Durations, ProxyCollector
from twistedproxy.model import Http, Listener, Target
from twistedproxy.plan import diff
from twistedproxy.service import ProxyService
from twistedproxy.systemd import InheritedSockets, Notifier

MAPPINGS = (
    "mappings:\n  - name: web\n    listen: 127.0.0.1:8080\n    target: 10.0.0.2:80\n"
)


def errorsOf(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parseMap(text, "map.yaml")
    return caught.value.errors


# -- the map -----------------------------------------------------------------


@pytest.mark.parametrize(
    "section, expected",
    [
        ("http: {}\n", Http("127.0.0.1", 9180)),
        ("http:\n  listen: 9999\n", Http("127.0.0.1", 9999)),
        ('http:\n  listen: "[::1]:9999"\n', Http("::1", 9999)),
        (
            "http:\n  listen: 0.0.0.0:9180\n  allow_remote: true\n",
            Http("0.0.0.0", 9180, True),
        ),
    ],
)
def test_httpSection(section: str, expected: Http) -> None:
    """
    An C{http} section listens on 127.0.0.1:9180 unless its C{listen}
    says otherwise, and only on loopback without C{allow_remote}.
    """
    assert parseMap(MAPPINGS + section, "map.yaml").http == expected


def test_noHttpSection() -> None:
    """
    Without an C{http} section, or with one whose keys are all commented
    out (as any section of the map), there is no HTTP endpoint; the log is
    text.
    """
    proxyMap = parseMap(MAPPINGS, "map.yaml")
    assert (proxyMap.http, proxyMap.logFormat) == (None, "text")
    assert parseMap(MAPPINGS + "http:\n#  listen: 9180\n", "map.yaml").http is None


@pytest.mark.parametrize(
    "section, expected",
    [
        (
            "http:\n  listen: 0.0.0.0:9180\n",
            "map.yaml:6: http.listen: 0.0.0.0 is not a loopback address;"
            " add allow_remote: true to let other hosts connect",
        ),
        (
            "http:\n  listen: 9180-9181\n",
            "map.yaml:6: http.listen: expected one port, got 9180-9181",
        ),
        (
            "http:\n  listen: 127.0.0.1:8080\n",
            "map.yaml:6: http.listen: tcp 127.0.0.1:8080 overlaps mapping 'web' (line 2)",
        ),
        (
            "http:\n  listn: 9180\n",
            "map.yaml:6: http: unknown key 'listn' (expected one of: listen, allow_remote)",
        ),
        (
            "http: [9180]\n",
            "map.yaml:5: http: expected a mapping of listen, allow_remote, got a list",
        ),
        (
            "http:\n  allow_remote: yes please\n",
            "map.yaml:6: http.allow_remote: expected true or false, got a string",
        ),
        (
            "manhole:\n  listen: 9180\n  authorized_keys: k\n  host_key: h\nhttp: {}\n",
            "map.yaml:9: http.listen: tcp 127.0.0.1:9180 overlaps the manhole (line 5)",
        ),
        (
            "log_format: yaml\n",
            "map.yaml:5: log_format: expected text or json, got 'yaml'",
        ),
        (
            "log_format: [json]\n",
            "map.yaml:5: log_format: expected text or json, got a list",
        ),
    ],
)
def test_httpAndLogFormatInvalid(section: str, expected: str) -> None:
    """
    Mistakes in C{http} and C{log_format} are reported with their line.
    """
    assert errorsOf(MAPPINGS + section) == [expected]


def test_checkSummaryNamesHttp() -> None:
    """
    C{check}'s summary line says where the HTTP endpoint listens.
    """
    from twistedproxy.__main__ import summarize

    assert summarize(parseMap(MAPPINGS + "http: {}\n", "map.yaml")) == (
        "map.yaml: OK, 1 mapping, 1 listener (1 tcp, 0 udp), no manhole, http on 127.0.0.1:9180"
    )


def test_logFormat() -> None:
    """
    C{log_format: json} is read as such.
    """
    assert parseMap(MAPPINGS + "log_format: json\n", "map.yaml").logFormat == "json"


def test_httpPlan() -> None:
    """
    A reload adds, moves, keeps and removes the HTTP endpoint as its
    section says.
    """
    none = parseMap(MAPPINGS, "map.yaml")
    default = parseMap(MAPPINGS + "http: {}\n", "map.yaml")
    moved = parseMap(MAPPINGS + "http:\n  listen: 9999\n", "map.yaml")
    assert diff(none, default).httpAction == "added"
    assert diff(default, moved).httpAction == "moved"
    assert diff(default, default).httpAction == "kept"
    assert diff(default, none).httpAction == "removed"
    assert diff(none, none).httpAction is None


# -- counters and metrics ----------------------------------------------------


def test_durationBuckets() -> None:
    """
    A duration lands in the first bucket whose bound is not below it, and
    a longer one than every bound in the last.
    """
    durations = Durations()
    for seconds in (0.001, 0.005, 0.3, 7200.0):
        durations.observe(seconds)
    assert durations.counts[0] == 2
    assert durations.counts[DURATION_BUCKETS.index(0.5)] == 1
    assert durations.counts[-1] == 1
    assert durations.sum == pytest.approx(7200.306)


@pytest.mark.parametrize(
    "reason, kind",
    [
        ("connect failed: connection refused", "connection refused"),
        ("connect failed: timed out after 5s", "timeout"),
        ("connect failed: no address for db.example", "no address"),
    ],
)
def test_connectFailureKind(reason: str, kind: str) -> None:
    """
    Connect failures are counted by a kind whose set stays small: a
    timeout whatever its length, a missing address whatever the name.
    """
    assert connectFailureKind(reason) == kind


class FakeListener:
    """
    A listener service that just waits, with the counters the collector
    reads.
    """

    proto = "tcp"

    def __init__(self, listener, reactor):
        from twistedproxy.listener import Counters

        self.listener = listener
        self.counters = Counters()
        self.durations = Durations()
        self.flows = {}
        self.active = 0
        self.bytesIn = 0
        self.bytesOut = 0

    def bind(self):
        pass

    def setServiceParent(self, parent):
        pass


def collected(proxy) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_collectorSumsListenersOfAMapping() -> None:
    """
    The metrics of a mapping are the sums over its listeners, with a zero
    for every rejection reason, connect failures by reason, and the
    duration histogram's buckets cumulative.
    """
    text = "mappings:\n  - name: web\n    listen: 8000-8001\n    target: 10.0.0.2:80\n"
    proxyMap = parseMap(text, "map.yaml")
    proxy = ProxyService(
        "map.yaml",
        proxyMap,
        reactor=MemoryReactorClock(),
        listenerTypes={"tcp": FakeListener},
        engines=lambda r: {},
    )
    for listener in proxyMap.listeners():
        service, _ = proxy._bindListener(listener)
        proxy.listeners[listener.key] = service
    services = list(proxy.listeners.values())
    for index, service in enumerate(services):
        service.counters.total = 10 + index
        service.counters.rejected = 2
        service.counters.rejectedBy = {"limit": 2}
        service.counters.connectFailed = {"connection refused": 1}
        service.bytesIn, service.bytesOut = 100, 1000
        service.active = 1
        service.durations.observe(0.2)
    web = (("mapping", "web"), ("proto", "tcp"))
    metrics = collected(proxy)
    assert metrics[("portproxy_flows_total", web)] == 10 + 11 + 12 + 13
    assert metrics[("portproxy_open", web)] == 4
    assert metrics[("portproxy_received_bytes_total", web)] == 400
    assert metrics[("portproxy_sent_bytes_total", web)] == 4000
    assert metrics[("portproxy_rejected_total", (*web, ("reason", "limit")))] == 8
    assert metrics[("portproxy_rejected_total", (*web, ("reason", "denied")))] == 0
    assert (
        metrics[
            (
                "portproxy_connect_failures_total",
                (*web, ("reason", "connection refused")),
            )
        ]
        == 4
    )
    assert metrics[("portproxy_listeners", web)] == 4

    def bucket(le: str) -> float:
        return metrics[("portproxy_flow_duration_seconds_bucket", (("le", le), *web))]

    assert (bucket("0.1"), bucket("0.25"), bucket("+Inf")) == (0, 4, 4)
    assert metrics[("portproxy_reloads_total", (("result", "ok"),))] == 0
    assert metrics[("portproxy_engine_enabled", (("engine", "tcp_relay"),))] == 0


# -- JSON logs ---------------------------------------------------------------

WEB = Listener("web", "tcp", "127.0.0.1", 8080, Target("10.0.0.2", 80))


def test_accessEventIsOneObjectPerRow() -> None:
    """
    A batched access event becomes one JSON object per flow, with the
    access line's fields (and a mutual TLS client's C{peer}).
    """
    rows = [
        (1, WEB, "127.0.0.1:5000", 0.25, 10, 20, "CN=alice", "client closed"),
        (
            2,
            WEB,
            "127.0.0.1:5001",
            1.5,
            30,
            40,
            None,
            "connect failed: connection refused",
        ),
    ]
    event = {
        "log_format": "{access}",
        "access": "a\nb",
        "flows": 2,
        "accessRows": rows,
        "log_level": LogLevel.info,
        "log_namespace": "portproxy",
        "log_time": 0.0,
    }
    lines = jsonLines(event).splitlines()
    records = [json.loads(line) for line in lines]
    assert records[1] == {
        "time": "1970-01-01T00:00:00.000+00:00",
        "level": "info",
        "namespace": "portproxy",
        "event": "access",
        "flow": 2,
        "mapping": "web",
        "proto": "tcp",
        "listen": "127.0.0.1:8080",
        "client": "127.0.0.1:5001",
        "target": "10.0.0.2:80",
        "duration": 1.5,
        "bytes_in": 30,
        "bytes_out": 40,
        "reason": "connect failed: connection refused",
    }
    assert [r["flow"] for r in records] == [1, 2]
    # A TLS client's certificate subject, only where there was one.
    assert records[0]["peer"] == "CN=alice"


def test_otherEventsCarryTheirFields() -> None:
    """
    Any other event is one object: its text as C{message}, its fields, a
    listener's fields spelled out.
    """
    event = {
        "log_format": "{listener} (added)",
        "listener": WEB,
        "log_level": LogLevel.warn,
        "log_namespace": "portproxy",
        "log_time": 1.5,
        "extra": object,
    }
    record = json.loads(jsonLines(event))
    assert record["message"] == "tcp 127.0.0.1:8080 -> 10.0.0.2:80 [web] (added)"
    assert (record["level"], record["mapping"], record["target"]) == (
        "warn",
        "web",
        "10.0.0.2:80",
    )
    assert record["extra"] == str(object)


def test_useLogFormatSwitchesFileObservers(monkeypatch) -> None:
    """
    C{json} gives the file observers the JSON formatter, and C{text} gives
    their own back; other observers are left alone.
    """
    out = io.StringIO()
    textFormat = formatEventAsClassicLogText
    fileObserver = FileLogObserver(out, textFormat)

    def other(event: dict) -> None:
        pass

    monkeypatch.setattr(logs, "logObservers", lambda: [fileObserver, other])
    useLogFormat("json")
    assert fileObserver.formatEvent is jsonLines
    useLogFormat("json")
    useLogFormat("text")
    assert fileObserver.formatEvent is textFormat


# -- systemd -----------------------------------------------------------------


class Recorder:
    """
    A bound notify socket, as systemd's.
    """

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.setblocking(False)

    def received(self) -> list[str]:
        notices = []
        while True:
            try:
                notices.append(self.socket.recv(4096).decode())
            except BlockingIOError:
                return notices


class FakeProxy:
    listeners = {"a": None, "b": None}

    def unboundListeners(self):
        return []

    def allListeners(self):
        return []


def test_notifierSequence(tmp_path) -> None:
    """
    The notifier says READY with a status, RELOADING with the monotonic
    clock and READY around a reload, WATCHDOG every half interval, and
    STOPPING, as C{sd_notify} would.
    """
    recorder = Recorder(tmp_path)
    clock = Clock()
    notifier = Notifier.fromEnvironment(
        clock, {"NOTIFY_SOCKET": recorder.path, "WATCHDOG_USEC": "4000000"}, pid=42
    )
    notifier._monotonic = lambda: 123456
    proxy = FakeProxy()
    notifier.started(proxy)
    clock.advance(2)
    notifier.reloading(proxy)
    notifier.reloaded(proxy, "reload of m: added 0")
    notifier.stopping(proxy)
    clock.advance(10)
    assert recorder.received() == [
        "READY=1\nSTATUS=2 listeners, 0 open",
        "WATCHDOG=1",
        "WATCHDOG=1",
        "RELOADING=1\nMONOTONIC_USEC=123456\nSTATUS=reloading",
        "READY=1\nSTATUS=2 listeners, 0 open; reload of m: added 0",
        "STOPPING=1\nSTATUS=stopping",
    ]


@pytest.mark.parametrize(
    "environ, address, interval",
    [
        ({}, None, None),
        ({"NOTIFY_SOCKET": "@portproxy/n"}, "\0portproxy/n", None),
        ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "3000000"}, "/run/n", 1.5),
        (
            {
                "NOTIFY_SOCKET": "/run/n",
                "WATCHDOG_USEC": "3000000",
                "WATCHDOG_PID": "7",
            },
            "/run/n",
            1.5,
        ),
        (
            {
                "NOTIFY_SOCKET": "/run/n",
                "WATCHDOG_USEC": "3000000",
                "WATCHDOG_PID": "8",
            },
            "/run/n",
            None,
        ),
    ],
)
def test_notifierFromEnvironment(environ, address, interval) -> None:
    """
    C{NOTIFY_SOCKET} names the socket (C{@} an abstract one); the watchdog
    runs at half C{WATCHDOG_USEC} when C{WATCHDOG_PID} is unset or this
    process.
    """
    notifier = Notifier.fromEnvironment(Clock(), environ, pid=7)
    if address is None:
        assert notifier is None
    else:
        assert (notifier.address, notifier.watchdogInterval) == (address, interval)


def test_inheritedSocketsOfAnotherProcess() -> None:
    """
    Sockets passed to another process (C{LISTEN_PID} not ours) are not
    taken, and the variables are removed either way.
    """
    environ = {"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b"}
    assert InheritedSockets.fromEnvironment(environ, pid=7).sockets == []
    assert environ == {}


def test_inheritedSocketMatching() -> None:
    """
    An inherited socket is taken by the listener of its protocol, address
    and port, as a new descriptor each time; one named after a mapping
    only by that mapping's.
    """
    from twistedproxy.systemd import InheritedSocket

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    inherited = InheritedSockets(
        [InheritedSocket(tcp, "dns"), InheritedSocket(udp, "x")]
    )
    tcpPort, udpPort = tcp.getsockname()[1], udp.getsockname()[1]
    target = Target("10.0.0.2", 53)
    names = frozenset(["web", "dns"])
    assert (
        inherited.take(Listener("web", "tcp", "127.0.0.1", tcpPort, target), names)
        is None
    )
    assert (
        inherited.take(Listener("dns", "udp", "127.0.0.1", tcpPort, target), names)
        is None
    )
    taken = inherited.take(Listener("dns", "tcp", "127.0.0.1", tcpPort, target), names)
    assert taken.fileno() != tcp.fileno() and taken.getsockname() == tcp.getsockname()
    assert [str(s) for s in inherited.untaken()] == [f"'x' (udp [::1]:{udpPort})"]
    again = inherited.take(Listener("web", "udp", "::1", udpPort, target), names)
    assert again.type == socket.SOCK_DGRAM
    assert inherited.untaken() == []
    for skt in (tcp, udp, taken, again):
        skt.close()
