"""
Tests for L{twistedproxy.service.ProxyService}: start-up, reload and
mapping control, with fake listeners and a memory reactor.
"""

import os
import signal

import pytest
from fakes import FakeFlow, FakeListener, listener, proxyMap
from support import trustedTmpPath  # noqa: F401 (this module's tmp_path: the manhole trusts it)
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent

from twistedproxy.config import ConfigError
from twistedproxy.model import (
    ANY_IPV4,
    ANY_IPV6,
    TCP,
    UDP,
    Manhole,
)
from twistedproxy.service import ProxyService, StartupError
from twistedproxy.tcp.listener import listenBacklog


class FakeManhole(Service):
    name = "manhole"

    def __init__(self, settings, proxy, reactor):
        self.settings = settings
        self.reconfigured = []

    def bind(self):
        pass

    def reconfigure(self, settings):
        self.settings = settings
        self.reconfigured.append(settings)


class Maps:
    """
    What the fake map file holds: a map, or errors.
    """

    def __init__(self):
        self.next = None
        self.loads = 0

    def load(self, path):
        self.loads += 1
        if isinstance(self.next, ConfigError):
            raise self.next
        return self.next


@pytest.fixture(autouse=True)
def cleanFakes():
    FakeListener.busy = set()
    FakeListener.stopping = None


def makeProxy(initial, ipv6=True):
    maps = Maps()
    proxy = ProxyService(
        "map.yaml",
        initial,
        reactor=MemoryReactorClock(),
        load=maps.load,
        listenerTypes={TCP: FakeListener, UDP: FakeListener},
        manholeType=FakeManhole,
        ipv6Available=lambda: ipv6,
        engines=lambda reactor: {},
        inThread=maybeDeferred,
    )
    return proxy, maps


def started(initial, **kw):
    proxy, maps = makeProxy(initial, **kw)
    proxy.privilegedStartService()
    proxy.startService()
    return proxy, maps


def reload(proxy):
    results = []
    proxy.reload().addCallback(results.append)
    assert results, "reload did not finish"
    return results[0]


def test_reloadReadsSomaxconnAgain(tmp_path):
    """
    A reload forgets the somaxconn value read before, so the listeners it
    adds get the kernel's ceiling of now.
    """
    path = tmp_path / "somaxconn"
    path.write_text("8192\n")
    assert listenBacklog(str(path)) == 8192
    path.write_text("1024\n")
    proxy, maps = started(proxyMap(listener(1)))
    maps.next = proxyMap(listener(1), listener(2))
    try:
        assert listenBacklog(str(path)) == 8192
        assert "added 1" in reload(proxy)
        assert listenBacklog(str(path)) == 1024
    finally:
        proxy.stopService()


def test_startBindsEveryListener():
    """
    Starting the service binds and starts one child service per listener.
    """
    proxy, _ = started(proxyMap(listener(1), listener(2, proto=UDP)))
    try:
        assert set(proxy.listeners) == {(TCP, "127.0.0.1", 1), (UDP, "127.0.0.1", 2)}
        assert all(s.bound and s.running for s in proxy.listeners.values())
    finally:
        proxy.stopService()


def test_startFailureNamesTheMapping():
    """
    A listener that cannot bind stops the start-up with a message giving
    the map line, the listener and the mapping, and leaves nothing bound.
    """
    FakeListener.busy = {2}
    proxy, _ = makeProxy(proxyMap(listener(1), listener(2, name="db")))
    with pytest.raises(StartupError) as raised:
        proxy.privilegedStartService()
    assert raised.value.problems == [
        "map.yaml:2: cannot listen on tcp 127.0.0.1:2 for mapping 'db': "
        "address already in use"
    ]
    assert str(raised.value) == "1 start-up problem, listed above and in the log"
    assert proxy.listeners == {}
    assert list(proxy) == []


def test_startFailureWrittenToTheTerminal():
    """
    With a terminal kept (twistd's daemon mode), every start-up problem is
    written to it, one C{FILE:LINE: message} a line, and it is closed.
    """
    FakeListener.busy = {1, 2}
    proxy, _ = makeProxy(proxyMap(listener(1), listener(2, name="db")))
    readEnd, proxy.terminal = os.pipe()
    with pytest.raises(StartupError):
        proxy.privilegedStartService()
    with os.fdopen(readEnd, "rb") as terminal:
        assert terminal.read().decode().splitlines() == [
            "map.yaml:1: cannot listen on tcp 127.0.0.1:1 for mapping 'web': "
            "address already in use",
            "map.yaml:2: cannot listen on tcp 127.0.0.1:2 for mapping 'db': "
            "address already in use",
        ]
    assert proxy.terminal is None


def test_startLetsTheTerminalGo():
    """
    A start-up that binds everything writes nothing to the kept terminal
    and closes it, so a daemon does not hold its starter's terminal.
    """
    proxy, _ = makeProxy(proxyMap(listener(1)))
    readEnd, proxy.terminal = os.pipe()
    proxy.privilegedStartService()
    try:
        with os.fdopen(readEnd, "rb") as terminal:
            assert terminal.read() == b""
        assert proxy.terminal is None
    finally:
        proxy.stopService()


def test_noIPv6SkipsWildcardWithWarning(logged):
    """
    On a host without IPv6, the IPv6 half of a no-host listen is skipped
    with a warning and the IPv4 half starts.
    """
    proxy, _ = started(
        proxyMap(listener(1, host=ANY_IPV4), listener(1, host=ANY_IPV6)), ipv6=False
    )
    try:
        assert list(proxy.listeners) == [(TCP, ANY_IPV4, 1)]
        assert any("no IPv6" in e.get("log_format", "") for e in logged)
    finally:
        proxy.stopService()


def test_sighupHandlerInstalledAndRestored():
    """
    The SIGHUP handler is installed when the service starts and the
    previous one is restored when it stops.
    """
    before = signal.getsignal(signal.SIGHUP)
    proxy, _ = started(proxyMap(listener(1)))
    assert signal.getsignal(signal.SIGHUP) == proxy._sighup
    proxy.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


def test_reloadAppliesThePlan():
    """
    A reload keeps unchanged listeners' services, reconfigures changed
    ones, stops removed ones, starts added ones, and says so in one line.
    """
    proxy, maps = started(proxyMap(listener(1), listener(2), listener(3)))
    kept, changedService = (
        proxy.listeners[(TCP, "127.0.0.1", 1)],
        proxy.listeners[(TCP, "127.0.0.1", 2)],
    )
    removed = proxy.listeners[(TCP, "127.0.0.1", 3)]
    maps.next = proxyMap(listener(1), listener(2, target=81), listener(4))
    summary = reload(proxy)
    assert summary == (
        "reload of map.yaml: added 1, removed 1, changed 1, unchanged 1, failed 0"
    )
    assert proxy.listeners[(TCP, "127.0.0.1", 1)] is kept
    assert proxy.listeners[(TCP, "127.0.0.1", 2)] is changedService
    assert changedService.listener.target.port == 81
    assert not removed.running and not removed.bound
    assert proxy.listeners[(TCP, "127.0.0.1", 4)].running
    assert proxy.map is maps.next


def test_invalidMapChangesNothing(logged):
    """
    A reload of an invalid file logs every error and changes nothing.
    """
    initial = proxyMap(listener(1))
    proxy, maps = started(initial)
    service = proxy.listeners[(TCP, "127.0.0.1", 1)]
    maps.next = ConfigError(["map.yaml:3: bad one", "map.yaml:5: bad two"])
    assert reload(proxy) == "reload of map.yaml: invalid, nothing changed (2 errors)"
    assert proxy.map is initial
    assert proxy.listeners == {(TCP, "127.0.0.1", 1): service}
    messages = [e.get("error") for e in logged]
    assert "map.yaml:3: bad one" in messages and "map.yaml:5: bad two" in messages


def test_failedAddIsSkippedAndRetried():
    """
    An added listener that cannot bind is reported and skipped while the
    rest of the reload applies; the next reload tries it again.
    """
    proxy, maps = started(proxyMap(listener(1)))
    FakeListener.busy = {3}
    maps.next = proxyMap(listener(2), listener(3))
    summary = reload(proxy)
    assert summary == (
        "reload of map.yaml: added 1, removed 1, changed 0, unchanged 0, failed 1 "
        "(map.yaml:3: cannot listen on tcp 127.0.0.1:3 for mapping 'web': "
        "address already in use)"
    )
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 2)}
    FakeListener.busy = set()
    summary = reload(proxy)
    assert summary == (
        "reload of map.yaml: added 1, removed 0, changed 0, unchanged 1, failed 0"
    )
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 2), (TCP, "127.0.0.1", 3)}


def test_reloadsDuringAReloadAreMerged():
    """
    Reload requests made while a reload runs are merged into exactly one
    more reload after it, and every request gets a summary.
    """
    proxy, maps = started(proxyMap(listener(1)))
    FakeListener.stopping = Deferred()
    maps.next = proxyMap(listener(2))
    results = []
    for _ in range(5):
        proxy.reload().addCallback(results.append)
    assert maps.loads == 1 and results == []
    FakeListener.stopping.callback(None)
    assert maps.loads == 2
    assert len(results) == 5
    assert results[0].startswith("reload of map.yaml: added 1, removed 1")
    assert (
        results[1:]
        == ["reload of map.yaml: added 0, removed 0, changed 0, unchanged 1, failed 0"]
        * 4
    )


def test_removedListenerDrains():
    """
    A removed listener with open connections stays visible in draining
    until its last connection ends.
    """
    proxy, maps = started(proxyMap(listener(1)))
    service = proxy.listeners[(TCP, "127.0.0.1", 1)]
    flow = FakeFlow(service, 77)
    maps.next = proxyMap()
    reload(proxy)
    assert proxy.listeners == {}
    assert proxy.draining == [service]
    assert proxy.findFlow(77) is flow
    service.flowEnded(flow, "client closed")
    assert proxy.draining == []
    assert proxy.findFlow(77) is None


def test_disableEnableByMappingName():
    """
    disable and enable act on every listener of the named mapping, and an
    unknown name is a KeyError.
    """
    proxy, _ = started(
        proxyMap(
            listener(1, name="a"),
            listener(2, name="a", proto=UDP),
            listener(3, name="b"),
        )
    )
    proxy.disable("a")
    assert [s.enabled for s in proxy.listeners.values()] == [False, False, True]
    proxy.enable("a")
    assert all(s.enabled for s in proxy.listeners.values())
    with pytest.raises(KeyError):
        proxy.disable("nope")


def test_manholeFollowsReload():
    """
    A reload adds, re-reads, moves and removes the manhole as the map says.
    """
    keys = Manhole("127.0.0.1", 2222, "keys", "host")
    proxy, maps = started(proxyMap(listener(1)))
    assert proxy.manhole is None
    maps.next = proxyMap(listener(1), manhole=keys)
    reload(proxy)
    first = proxy.manhole
    assert first.settings == keys and first.running
    reload(proxy)
    assert proxy.manhole is first and first.reconfigured == [keys]
    moved = Manhole("127.0.0.1", 2223, "keys", "host")
    maps.next = proxyMap(listener(1), manhole=moved)
    reload(proxy)
    assert proxy.manhole is not first and not first.running
    assert proxy.manhole.settings == moved
    maps.next = proxyMap(listener(1))
    reload(proxy)
    assert proxy.manhole is None


def test_enableTriesEveryListener():
    """
    When one of a mapping's listeners cannot listen again, the others are
    still enabled and the error is raised.
    """
    proxy, _ = started(
        proxyMap(listener(1, name="a"), listener(2, name="a"), listener(3, name="a"))
    )
    proxy.disable("a")
    FakeListener.busy = {2}
    with pytest.raises(CannotListenError):
        proxy.enable("a")
    assert [s.enabled for s in proxy.listeners.values()] == [True, False, True]


def test_reloadLogsEveryListener(logged):
    """
    A reload logs one line per listener of either map, saying whether it
    was added, changed, removed or left unchanged.
    """
    proxy, maps = started(proxyMap(listener(1), listener(2), listener(3)))
    maps.next = proxyMap(listener(1), listener(2, target=81), listener(4))
    del logged[:]
    reload(proxy)
    lines = sorted(
        formatEvent(e)
        for e in logged
        if e.get("log_format", "").startswith("{listener}")
    )
    assert lines == [
        "tcp 127.0.0.1:1 -> 127.0.0.2:80 [web] (unchanged)",
        "tcp 127.0.0.1:2 -> 127.0.0.2:81 [web] (changed)",
        "tcp 127.0.0.1:3 -> 127.0.0.2:80 [web] (removed)",
        "tcp 127.0.0.1:4 -> 127.0.0.2:80 [web] (added)",
    ]


def test_onlyPortproxyLogsItsListeningPorts(logged):
    """
    Real TCP and UDP listeners, started and stopped, log portproxy's one
    line each and none of Twisted's per-port lines ("... starting on
    PORT", "(TCP Port PORT Closed)").
    """
    proxy = ProxyService(
        "map.yaml",
        proxyMap(listener(0, name="web"), listener(0, name="dns", proto=UDP)),
        reactor=MemoryReactorClock(),
        ipv6Available=lambda: True,
        engines=lambda reactor: {},
    )
    proxy.privilegedStartService()
    proxy.startService()
    ports = [
        service.port.socket.getsockname()[1] for service in proxy.listeners.values()
    ]
    proxy.stopService()
    lines = [formatEvent(e) for e in logged]
    assert "tcp 127.0.0.1:0 -> 127.0.0.2:80 [web]" in lines
    assert "udp 127.0.0.1:0 -> 127.0.0.2:80 [dns]" in lines
    for port in ports:
        assert not [line for line in lines if f"starting on {port}" in line]
        assert not [line for line in lines if f"Port {port} Closed" in line]


def test_reloadLoadsOffTheReactorThread():
    """
    A reload reads and checks the map through C{inThread} (by default the
    reactor's thread pool) and changes nothing until that load is done;
    then it applies the map.
    """
    proxy, maps = started(proxyMap(listener(1)))
    calls = []

    def inThread(f, *args):
        calls.append((f, args, Deferred()))
        return calls[-1][2]

    proxy._inThread = inThread
    maps.next = proxyMap(listener(2))
    results = []
    proxy.reload().addCallback(results.append)
    assert [(f, args) for f, args, d in calls] == [(maps.load, ("map.yaml",))]
    assert maps.loads == 0 and results == []
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 1)}
    f, args, d = calls[0]
    d.callback(f(*args))
    assert results == [
        "reload of map.yaml: added 1, removed 1, changed 0, unchanged 0, failed 0"
    ]
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 2)}


def test_defaultLoadUsesReactorThreadPool():
    """
    Without C{inThread}, the load runs in the reactor's thread pool and its
    result comes back to the reactor thread.
    """
    from twisted.python.threadpool import ThreadPool

    pools = []

    class ThreadedReactor(MemoryReactorClock):
        def getThreadPool(self):
            pool = ThreadPool(1, 1)
            pool.start()
            pools.append(pool)
            return pool

        def callFromThread(self, f, *args, **kw):
            self.fromThread = (f, args, kw)

    fakeReactor = ThreadedReactor()
    proxy = ProxyService(
        "map.yaml",
        proxyMap(),
        reactor=fakeReactor,
        load=lambda path: proxyMap(listener(5)),
        listenerTypes={TCP: FakeListener, UDP: FakeListener},
        engines=lambda reactor: {},
    )
    proxy.startService()
    try:
        results = []
        proxy.reload().addCallback(results.append)
        pools[0].stop()  # waits for the load to finish in its thread
        f, args, kw = fakeReactor.fromThread
        f(*args, **kw)
        assert results == [
            "reload of map.yaml: added 1, removed 0, changed 0, unchanged 0, failed 0"
        ]
    finally:
        proxy.stopService()


def test_invalidReloadSummaryCountsAllErrors(logged):
    """
    A refused reload logs the (capped) error lines and its summary counts
    every error, also those beyond the cap.
    """
    proxy, maps = started(proxyMap(listener(1)))
    lines = [f"map.yaml:{n}: bad" for n in range(1, 101)] + [
        "map.yaml:101: and 3900 more errors, from this line on"
    ]
    maps.next = ConfigError(lines, count=4000)
    assert reload(proxy) == "reload of map.yaml: invalid, nothing changed (4000 errors)"
    assert [e["error"] for e in logged if "error" in e] == lines


def test_unexpectedBindErrorFailsOneListener():
    """
    A listener whose start raises something unexpected fails alone, like a
    bind that fails: the rest of the reload applies, the map is the new
    one, and the next reload tries that listener again.
    """

    class Broken(FakeListener):
        broken = True

        def bind(self):
            if Broken.broken and self.listener.port == 3:
                raise RuntimeError("boom")
            FakeListener.bind(self)

    proxy, maps = makeProxy(proxyMap(listener(1)))
    proxy._listenerTypes = {TCP: Broken, UDP: Broken}
    proxy.privilegedStartService()
    proxy.startService()
    maps.next = proxyMap(listener(2), listener(3))
    assert reload(proxy) == (
        "reload of map.yaml: added 1, removed 1, changed 0, unchanged 0, failed 1 "
        "(map.yaml:3: cannot listen on tcp 127.0.0.1:3 for mapping 'web': "
        "unexpected RuntimeError: boom)"
    )
    assert proxy.map is maps.next
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 2)}
    Broken.broken = False
    assert reload(proxy) == (
        "reload of map.yaml: added 1, removed 0, changed 0, unchanged 1, failed 0"
    )


def test_manholeFailureDoesNotHalfApply():
    """
    When the running manhole cannot re-read its files, the listeners'
    changes still apply, the map is the new one, and the summary counts
    the manhole as failed.
    """
    keys = Manhole("127.0.0.1", 2222, "keys", "host")
    proxy, maps = started(proxyMap(listener(1), manhole=keys))

    def broken(settings):
        raise ValueError("embedded null byte")

    proxy.manhole.reconfigure = broken
    maps.next = proxyMap(listener(2), manhole=keys)
    assert reload(proxy) == (
        "reload of map.yaml: added 1, removed 1, changed 0, unchanged 0, failed 1 "
        "(map.yaml:0: manhole not reconfigured: unexpected ValueError: embedded null byte)"
    )
    assert proxy.map is maps.next
    assert set(proxy.listeners) == {(TCP, "127.0.0.1", 2)}


def test_reloadWithUnusablePathChangesNothing(tmp_path):
    """
    A reload of a map whose manhole host key path has a NUL byte is refused
    by the map check: nothing changes (it used to swap the listeners, then
    crash in the manhole and leave the old map in place).
    """
    from twistedproxy.config import loadMap

    (tmp_path / "keys").write_text("")
    (tmp_path / "keys").chmod(0o600)
    path = tmp_path / "map.yaml"
    manhole = "manhole: {listen: 2222, authorized_keys: keys, host_key: %s}\n"
    path.write_text(
        "mappings: [{listen: '127.0.0.1:1', target: 'db:80'}]\n" + manhole % "host"
    )
    initial = loadMap(str(path))
    proxy = ProxyService(
        str(path),
        initial,
        reactor=MemoryReactorClock(),
        listenerTypes={TCP: FakeListener, UDP: FakeListener},
        ipv6Available=lambda: True,
        engines=lambda reactor: {},
        inThread=maybeDeferred,
    )
    proxy.privilegedStartService()
    proxy.startService()
    try:
        before = dict(proxy.listeners)
        path.write_text(
            "mappings: [{listen: '127.0.0.1:2', target: 'db:80'}]\n"
            + manhole % '"ho\\0st"'
        )
        results = []
        proxy.reload().addCallback(results.append)
        assert results == [f"reload of {path}: invalid, nothing changed (1 error)"]
        assert proxy.listeners == before and proxy.map is initial
    finally:
        proxy.stopService()


def test_summaryNamesTenFailures():
    """
    A reload where many listeners fail names the first ten in its summary
    and counts the rest (each has its own log line).
    """
    proxy, maps = started(proxyMap())
    FakeListener.busy = set(range(1, 13))
    maps.next = proxyMap(*[listener(port) for port in range(1, 13)])
    summary = reload(proxy)
    assert summary.startswith(
        "reload of map.yaml: added 0, removed 0, changed 0, unchanged 0, failed 12 ("
    )
    assert summary.count("cannot listen") == 10
    assert summary.endswith("; and 2 more)")
