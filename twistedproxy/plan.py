"""
What a reload must do: the difference between the running map and the new
one, by listener key (protocol, address, port).
"""

from __future__ import annotations

from dataclasses import dataclass

from twistedproxy.model import Http, Listener, Manhole, ProxyMap


@dataclass(frozen=True)
class Plan:
    """
    The listeners of a reload, sorted into what happens to them.

    @ivar added: listeners to start, in map order.
    @ivar removed: running listeners the new map no longer has.
    @ivar changed: new settings for running listeners whose target,
        timeouts, limit or mapping name changed.
    @ivar kept: running listeners whose settings are the same.
    @ivar manhole: the manhole's new settings, or L{None} when the new map
        has none.
    @ivar manholeAction: C{"added"}, C{"removed"}, C{"moved"} (a new
        address, so a new socket), C{"changed"} (same socket, other keys
        or host key) or C{"kept"}; L{None} when neither map has a manhole.
    @ivar http: the HTTP endpoint's new settings, or L{None}.
    @ivar httpAction: as C{manholeAction}, for the HTTP endpoint.
    """

    added: tuple[Listener, ...]
    removed: tuple[Listener, ...]
    changed: tuple[Listener, ...]
    kept: tuple[Listener, ...]
    manhole: Manhole | None = None
    manholeAction: str | None = None
    http: Http | None = None
    httpAction: str | None = None


def diff(old: ProxyMap, new: ProxyMap) -> Plan:
    """
    Compare two maps listener by listener.
    """
    running = {listener.key: listener for listener in old.listeners()}
    wanted = {listener.key: listener for listener in new.listeners()}
    added, changed, kept = [], [], []
    for key, listener in wanted.items():
        before = running.get(key)
        if before is None:
            added.append(listener)
        elif before == listener:
            kept.append(listener)
        else:
            changed.append(listener)
    removed = [listener for key, listener in running.items() if key not in wanted]
    return Plan(
        added=tuple(added),
        removed=tuple(removed),
        changed=tuple(changed),
        kept=tuple(kept),
        manhole=new.manhole,
        manholeAction=_sectionAction(old.manhole, new.manhole),
        http=new.http,
        httpAction=_sectionAction(old.http, new.http),
    )


def _sectionAction(old, new) -> str | None:
    """
    What a reload does to a section with a socket of its own (the manhole,
    the HTTP endpoint): see L{Plan.manholeAction}.
    """
    if old is None:
        return None if new is None else "added"
    if new is None:
        return "removed"
    if (old.host, old.port, old.allowRemote) != (new.host, new.port, new.allowRemote):
        return "moved"
    return "kept" if old == new else "changed"
