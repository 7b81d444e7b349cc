"""
Unit tests of the manhole's namespace (L{twistedproxy.admin}) against a
fake root service holding real L{ListenerService} counters.
"""

import re

import pytest
from fakes import FakeFlow, FakeListener, FakeUDPListener
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock

from twistedproxy.admin import (
    HELPERS,
    KILLED,
    Console,
    formatAge,
    formatBytes,
    formatTable,
)
from twistedproxy.model import Listener, Mapping, ProxyMap, Target


class FakeProxy:
    """
    The parts of L{twistedproxy.service.ProxyService} the console reads.
    """

    def __init__(self, proxyMap, reactor):
        self.map = proxyMap
        self.reactor = reactor
        self.listeners = {}
        self.draining = []
        self.reloads = []
        self.published = {}
        for listener in proxyMap.listeners():
            kind = FakeUDPListener if listener.proto == "udp" else FakeListener
            self.listeners[listener.key] = service = kind(listener, reactor)
            service.bind()

    def allListeners(self):
        yield from self.listeners.values()
        yield from self.draining

    def findFlow(self, flowId):
        for service in self.allListeners():
            if flowId in service.flows:
                return service.flows[flowId]
        return None

    def disable(self, name):
        self.map.mapping(name)
        for service in self.listeners.values():
            if service.listener.mapping == name:
                service.disable()

    def enable(self, name):
        self.map.mapping(name)
        for service in self.listeners.values():
            if service.listener.mapping == name:
                service.enable()

    def reload(self):
        d = self.reloads.pop(0)
        return d


def listener(mapping, proto, host, port, target, targetPort):
    return Listener(mapping, proto, host, port, Target(target, targetPort))


def exampleMap():
    """
    The SPEC's example map, in model form.
    """
    return ProxyMap(
        "map.yaml",
        (
            Mapping(
                "ssh", (listener("ssh", "tcp", "127.0.0.1", 22222, "172.17.0.2", 22),)
            ),
            Mapping(
                "web",
                (
                    listener("web", "tcp", "0.0.0.0", 8000, "172.17.0.3", 80),
                    listener("web", "tcp", "::", 8000, "172.17.0.3", 80),
                ),
            ),
            Mapping(
                "dns",
                (
                    listener("dns", "tcp", "::1", 5353, "172.17.0.4", 53),
                    listener("dns", "udp", "::1", 5353, "172.17.0.4", 53),
                ),
            ),
        ),
    )


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def proxy(clock):
    return FakeProxy(exampleMap(), clock)


@pytest.fixture
def later():
    return []


@pytest.fixture
def console(proxy, later):
    return Console(proxy, later.append)


def service(proxy, proto, host, port):
    return proxy.listeners[(proto, host, port)]


def columnStarts(header):
    return [m.start() for m in re.finditer(r"\S+", header)]


def test_formatBytesPicksAUnitAndStaysNarrow():
    """
    Byte counts read as B, KiB, MiB... with one decimal under ten, and
    never take more than seven characters.
    """
    assert formatBytes(0) == "0 B"
    assert formatBytes(999) == "999 B"
    assert formatBytes(1000) == "1.0 KiB"
    assert formatBytes(1536) == "1.5 KiB"
    assert formatBytes(1258291) == "1.2 MiB"
    assert formatBytes(10 * 1024**2) == "10 MiB"
    assert formatBytes(1023 * 1024) == "1.0 MiB"
    assert formatBytes(5 * 1024**4) == "5.0 TiB"
    for exponent in range(0, 50):
        for mantissa in (1, 3, 7):
            assert len(formatBytes(mantissa << exponent)) <= 7


def test_formatAgeShowsTwoUnitsAtMost():
    """
    Ages read as seconds, minutes and seconds, hours and minutes, or days
    and hours.
    """
    assert formatAge(0) == "0s"
    assert formatAge(59.9) == "59s"
    assert formatAge(192) == "3m12s"
    assert formatAge(3900) == "1h05m"
    assert formatAge(2 * 86400 + 3 * 3600 + 59) == "2d03h"
    assert formatAge(-1) == "0s"


def test_formatTableAlignsColumns():
    """
    Text columns are left-aligned two spaces apart and the numeric ones
    right-aligned one space apart, with no trailing spaces.
    """
    text = formatTable(
        ("A", "LONGER", "N", "M"),
        [("xx", "y", "5", "1 B"), ("x", "yyyyyyyy", "123", "")],
        2,
    )
    assert text.splitlines() == [
        "A   LONGER      N   M",
        "xx  y           5 1 B",
        "x   yyyyyyyy  123",
    ]


def test_statusListsEveryListenerWithItsCounters(console, proxy, capsys):
    """
    status() prints one row per listener, in map order, with its name,
    protocol, listen address, target, open, total, rejected and (UDP only)
    dropped counts and the bytes each way, open flows included.
    """
    ssh = service(proxy, "tcp", "127.0.0.1", 22222)
    ssh.counters.total = 41
    ssh.counters.rejected = 2
    ssh.counters.bytesIn = 1000
    ssh.counters.bytesOut = 3 * 1024**2
    FakeFlow(ssh, 7, "127.0.0.1:50000", 0.0, bytesIn=24, bytesOut=0)
    service(proxy, "udp", "::1", 5353).dropped = 17
    console.status()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "PROTO",
        "LISTEN",
        "TARGET",
        "OPEN",
        "TOTAL",
        "REJ",
        "DRP",
        "IN",
        "OUT",
    ]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["ssh", "tcp", "127.0.0.1:22222", "172.17.0.2:22"],
        ["web", "tcp", "0.0.0.0:8000", "172.17.0.3:80"],
        ["web", "tcp", "[::]:8000", "172.17.0.3:80"],
        ["dns", "tcp", "[::1]:5353", "172.17.0.4:53"],
        ["dns", "udp", "[::1]:5353", "172.17.0.4:53"],
    ]
    assert lines[1].split()[4:] == ["1", "42", "2", "-", "1.0", "KiB", "3.0", "MiB"]
    assert lines[2].split()[4:] == ["0", "0", "0", "-", "0", "B", "0", "B"]
    assert lines[5].split()[4:] == ["0", "0", "0", "17", "0", "B", "0", "B"]


def test_statusFitsEightyColumnsAndAligns(console, proxy, capsys):
    """
    status() of the SPEC's example map fits an 80-column terminal with
    six-digit counts and seven-character byte counts both ways, and every
    row's columns line up with the header's.
    """
    for s in proxy.listeners.values():
        s.counters.total = 123456
        s.counters.bytesIn = 987654321
        s.counters.bytesOut = 1258291
    service(proxy, "udp", "::1", 5353).dropped = 999
    console.status()
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = lines[0]
    # Left-aligned columns start with their header; right-aligned ones end
    # with it.
    starts = columnStarts(header)
    for line in lines[1:]:
        for start in starts[1:4]:
            assert line[start] != " " and line[start - 1] == " "
        assert len(line) == len(header)


def test_statusNamesDisabledAndDrainingListeners(console, proxy, capsys):
    """
    status() says which mappings are disabled and which removed listeners
    still drain connections.
    """
    proxy.disable("web")
    old = FakeListener(
        listener("old", "tcp", "127.0.0.1", 9000, "10.0.0.1", 90), proxy.reactor
    )
    FakeFlow(old, 3, "127.0.0.1:40000", 0.0)
    proxy.draining.append(old)
    console.status()
    out = capsys.readouterr().out
    assert "disabled (not accepting): web\n" in out
    assert (
        "removed, draining: tcp 127.0.0.1:9000 -> 10.0.0.1:90 [old], 1 still open\n"
        in out
    )


def test_connectionsListsOpenFlows(console, proxy, clock, capsys):
    """
    connections() prints one row per open connection or session, draining
    ones included, by id, with its mapping, client, target, age and bytes.
    """
    clock.advance(1000)
    FakeFlow(service(proxy, "udp", "::1", 5353), 12, "[::1]:40000", 1000 - 192, 1500, 3)
    FakeFlow(
        service(proxy, "tcp", "127.0.0.1", 22222), 4, "127.0.0.1:50000", 999.5, 0, 2048
    )
    old = FakeListener(listener("old", "tcp", "127.0.0.1", 9000, "10.0.0.1", 90), clock)
    FakeFlow(old, 9, "127.0.0.1:40001", 0)
    proxy.draining.append(old)
    console.connections()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ID",
        "MAPPING",
        "PROTO",
        "CLIENT",
        "TARGET",
        "AGE",
        "IN",
        "OUT",
    ]
    assert [line.split() for line in lines[1:]] == [
        [
            "4",
            "ssh",
            "tcp",
            "127.0.0.1:50000",
            "172.17.0.2:22",
            "0s",
            "0",
            "B",
            "2.0",
            "KiB",
        ],
        [
            "9",
            "old",
            "tcp",
            "127.0.0.1:40001",
            "10.0.0.1:90",
            "16m40s",
            "0",
            "B",
            "0",
            "B",
        ],
        [
            "12",
            "dns",
            "udp",
            "[::1]:40000",
            "172.17.0.4:53",
            "3m12s",
            "1.5",
            "KiB",
            "3",
            "B",
        ],
    ]
    assert len({len(line) for line in lines}) == 1


def test_connectionsOfOneMapping(console, proxy, capsys):
    """
    connections(name) lists only that mapping's flows, and says so when it
    has none.
    """
    FakeFlow(service(proxy, "tcp", "127.0.0.1", 22222), 4, "127.0.0.1:50000", 0)
    FakeFlow(service(proxy, "tcp", "0.0.0.0", 8000), 5, "127.0.0.1:50001", 0)
    console.connections("web")
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["5"]
    console.connections("dns")
    assert capsys.readouterr().out == "no open connections or sessions on dns\n"


def test_connectionsWithoutFlowsOrOfAnUnknownMapping(console, capsys):
    """
    connections() says when nothing is open, and names the known mappings
    when asked for one that does not exist.
    """
    console.connections()
    assert capsys.readouterr().out == "no open connections or sessions\n"
    console.connections("nope")
    assert (
        capsys.readouterr().out == "no mapping named 'nope' (mappings: ssh, web, dns)\n"
    )


def test_killClosesTheFlow(console, proxy, capsys):
    """
    kill(id) closes that flow with a reason naming the manhole and says
    which one it closed.
    """
    flow = FakeFlow(service(proxy, "tcp", "127.0.0.1", 22222), 4, "127.0.0.1:50000", 0)
    console.kill(4)
    assert flow.closedWith == KILLED
    assert (
        capsys.readouterr().out
        == "closed 4: tcp ssh 127.0.0.1:50000 -> 172.17.0.2:22\n"
    )
    assert proxy.findFlow(4) is None


def test_killOfAnUnknownId(console, capsys):
    """
    kill() of an id that is not open says so and raises nothing.
    """
    console.kill(404)
    assert capsys.readouterr().out == "no open connection or session with id 404\n"


def test_disableAndEnable(console, proxy, capsys):
    """
    disable(name) and enable(name) switch every listener of that mapping
    and say what they did.
    """
    web = [s for s in proxy.listeners.values() if s.listener.mapping == "web"]
    console.disable("web")
    assert [s.enabled for s in web] == [False, False]
    assert service(proxy, "tcp", "127.0.0.1", 22222).enabled
    assert (
        capsys.readouterr().out
        == "web: disabled, not accepting new connections or sessions\n"
    )
    console.enable("web")
    assert [s.enabled for s in web] == [True, True]
    assert capsys.readouterr().out == "web: enabled\n"


def test_disableOfAnUnknownMapping(console, capsys):
    """
    disable() and enable() of a name the map does not have print the
    mappings there are instead of a traceback.
    """
    console.disable("wbe")
    assert (
        capsys.readouterr().out == "no mapping named 'wbe' (mappings: ssh, web, dns)\n"
    )
    console.enable("wbe")
    assert (
        capsys.readouterr().out == "no mapping named 'wbe' (mappings: ssh, web, dns)\n"
    )


def test_enableThatCannotListenAgain(console, proxy, capsys):
    """
    enable() says so when a listener cannot take its port back, instead
    of a traceback.
    """

    def enable(name):
        raise CannotListenError(
            "127.0.0.1", 8000, OSError(98, "Address already in use")
        )

    proxy.enable = enable
    console.enable("web")
    out = capsys.readouterr().out
    assert out.startswith("web: cannot accept again: Couldn't listen on 127.0.0.1:8000")


def test_reloadThatFinishesAtOncePrintsItsSummary(console, proxy, later, capsys):
    """
    reload() prints the summary line of a reload that finished during the
    call.
    """
    summary = "reload of map.yaml: added 1, removed 0, changed 0, unchanged 3, failed 0"
    proxy.reloads.append(succeed(summary))
    assert console.reload() is None
    assert capsys.readouterr().out == summary + "\n"
    assert later == []


def test_reloadThatWaitsWritesItsSummaryLater(console, proxy, later, capsys):
    """
    A reload that finishes after reload() returned has its summary written
    through writeLater.
    """
    d = Deferred()
    proxy.reloads.append(d)
    console.reload()
    assert capsys.readouterr().out == "reloading...\n"
    assert later == []
    d.callback("reload of map.yaml: invalid, nothing changed (2 errors)")
    assert later == ["reload of map.yaml: invalid, nothing changed (2 errors)"]
    assert capsys.readouterr().out == ""


def test_reloadThatFails(console, proxy, capsys):
    """
    A reload that fails instead of reporting shows the error rather than
    nothing.
    """
    proxy.reloads.append(fail(RuntimeError("boom")))
    console.reload()
    assert capsys.readouterr().out == "reload failed: boom\n"


def test_helpListsEveryHelper(console, capsys):
    """
    help() lists each helper with its signature and one-line doc, within
    80 columns.
    """
    console.help()
    out = capsys.readouterr().out
    for name in HELPERS:
        doc = getattr(console, name).__doc__.strip()
        assert "\n" not in doc
        assert re.search(rf"^  {name}\(.*?\)\s+{re.escape(doc)}$", out, re.M), name
    assert "connections(name=None)" in out
    assert "\n  proxy " in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_helpOfOneHelper(console, capsys):
    """
    help(thing) prints that thing's documentation as plain text.
    """
    console.help(console.kill)
    out = capsys.readouterr().out
    assert "kill(id" in out
    assert "Close the connection or session with this id." in out


def test_namespace(console, proxy):
    """
    The namespace holds every helper, help and the root service as proxy.
    """
    names = console.namespace()
    assert set(names) == set(HELPERS) | {"help", "proxy"}
    assert names["proxy"] is proxy
