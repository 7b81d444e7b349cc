"""
Tests for L{twistedproxy.plan.diff}: how a reload sorts listeners.
"""

from fakes import listener, proxyMap

from twistedproxy.model import (
    TCP,
    UDP,
    Manhole,
    Timeouts,
)
from twistedproxy.plan import diff


def test_sortsListenersByKey():
    """
    Listeners are added, removed, changed or kept by protocol, address and
    port, whatever their mapping's name.
    """
    old = proxyMap(listener(1), listener(2), listener(3), listener(4, proto=UDP))
    new = proxyMap(
        listener(1),
        listener(2, target=81),
        listener(4, proto=TCP),
        listener(5),
    )
    plan = diff(old, new)
    assert [each.port for each in plan.kept] == [1]
    assert [(each.port, each.target.port) for each in plan.changed] == [(2, 81)]
    assert [(each.proto, each.port) for each in plan.added] == [(TCP, 4), (TCP, 5)]
    assert [(each.proto, each.port) for each in plan.removed] == [(TCP, 3), (UDP, 4)]


def test_timeoutsLimitAndNameAreChanges():
    """
    New timeouts, a new connection limit or a new mapping name make a
    listener changed, not kept; the map line it was read from does not.
    """
    old = proxyMap(listener(1), listener(2), listener(3), listener(4, line=3))
    new = proxyMap(
        listener(1, timeouts=Timeouts(connect=1)),
        listener(2, maxConnections=5),
        listener(3, name="other"),
        listener(4, line=9),
    )
    plan = diff(old, new)
    assert [each.port for each in plan.changed] == [1, 2, 3]
    assert [each.port for each in plan.kept] == [4]


def test_manholeActions():
    """
    The manhole is added, removed, moved (new socket) or changed (same
    socket, other key files) by a reload.
    """
    a = Manhole("127.0.0.1", 2222, "keys", "host")
    assert diff(proxyMap(), proxyMap()).manholeAction is None
    assert diff(proxyMap(), proxyMap(manhole=a)).manholeAction == "added"
    assert diff(proxyMap(manhole=a), proxyMap()).manholeAction == "removed"
    moved = Manhole("127.0.0.1", 2223, "keys", "host")
    assert diff(proxyMap(manhole=a), proxyMap(manhole=moved)).manholeAction == "moved"
    changed = Manhole("127.0.0.1", 2222, "other-keys", "host")
    assert (
        diff(proxyMap(manhole=a), proxyMap(manhole=changed)).manholeAction == "changed"
    )
    assert diff(proxyMap(manhole=a), proxyMap(manhole=a)).manholeAction == "kept"
