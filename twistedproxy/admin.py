"""
The names an operator finds in the manhole: C{status()}, C{connections()},
C{kill(id)}, C{disable(name)}, C{enable(name)}, C{reload()}, C{help()} and
C{proxy}.

They read the root service (L{twistedproxy.service.ProxyService}) and its
listener services, and print tables sized for an 80-column terminal.  They
print to C{sys.stdout}, which the manhole points at the operator's terminal
while a typed line runs; output that arrives later (a reload finishing)
goes through the C{writeLater} callable the manhole gives L{Console}.
"""

from __future__ import annotations

import inspect
import pydoc
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.error import CannotListenError

from twistedproxy import access
from twistedproxy.access import parseNetwork
from twistedproxy.model import UDP

#: Why a flow ended, as its access log line says, when the operator killed it.
KILLED = "killed from the manhole"


def formatBytes(count: int) -> str:
    """
    A byte count for people: C{"980 B"}, C{"1.2 KiB"}, C{"34 MiB"}; never
    wider than seven characters.
    """
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        # Switching units at 1000 rather than 1024 keeps "1010 KiB" (eight
        # characters) out of the table.
        if value < 999.5 or unit == "PiB":
            break
    if value < 9.95:
        return f"{value:.1f} {unit}"
    return f"{value:.0f} {unit}"


def formatAge(seconds: float) -> str:
    """
    A duration for people, two units at most: C{"42s"}, C{"3m12s"},
    C{"1h05m"}, C{"2d03h"}.
    """
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def formatTable(
    headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: int
) -> str:
    """
    Align C{rows} under C{headers}.  The last C{numeric} columns are
    right-aligned and one space apart (their headers keep them legible);
    the others are left-aligned and two spaces apart.  No trailing spaces.
    """
    table = [list(headers)] + [list(row) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    firstNumeric = len(headers) - numeric
    lines = []
    for row in table:
        text = "  ".join(
            cell.ljust(width)
            for cell, width in zip(
                row[:firstNumeric], widths[:firstNumeric], strict=True
            )
        )
        numbers = " ".join(
            cell.rjust(width)
            for cell, width in zip(
                row[firstNumeric:], widths[firstNumeric:], strict=True
            )
        )
        lines.append(f"{text}  {numbers}".rstrip())
    return "\n".join(lines)


class Console:
    """
    The manhole's helpers, bound to one running proxy.

    @ivar proxy: the root L{twistedproxy.service.ProxyService}.
    @ivar writeLater: called with a line of text that is ready only after
        the helper returned (the summary of a reload that had to wait); the
        manhole writes it above the prompt.
    """

    def __init__(self, proxy, writeLater: Callable[[str], None]) -> None:
        self.proxy = proxy
        self.writeLater = writeLater

    def namespace(self) -> dict:
        """
        The names the operator's shell starts with.
        """
        names = {name: getattr(self, name) for name in HELPERS}
        names["help"] = self.help
        names["proxy"] = self.proxy
        return names

    def _mappingNames(self) -> list[str]:
        published = [
            self.proxy.listeners[key].listener.mapping for key in self.proxy.published
        ]
        return [mapping.name for mapping in self.proxy.map.mappings] + published

    def _unknownMapping(self, name: str) -> None:
        known = ", ".join(self._mappingNames()) or "none"
        print(f"no mapping named {name!r} (mappings: {known})")

    def status(self):
        """Print each listener with its counters and traffic."""
        order = {
            listener.key: i for i, listener in enumerate(self.proxy.map.listeners())
        }
        live = sorted(
            self.proxy.listeners.values(),
            key=lambda service: (
                order.get(service.listener.key, len(order)),
                str(service.listener.key),
            ),
        )
        if not live:
            print("no listeners")
        else:
            print(
                formatTable(
                    (
                        "NAME",
                        "PROTO",
                        "LISTEN",
                        "TARGET",
                        # DRP as in netstat's RX-DRP: four letters would
                        # push the table past 80 columns.
                        "OPEN",
                        "TOTAL",
                        "REJ",
                        "DRP",
                        "IN",
                        "OUT",
                    ),
                    (
                        (
                            s.listener.mapping,
                            s.listener.proto,
                            s.listener.listen,
                            str(s.listener.target),
                            str(s.active),
                            str(s.counters.total),
                            str(s.refused),
                            _dropped(s),
                            formatBytes(s.bytesIn),
                            formatBytes(s.bytesOut),
                        )
                        for s in live
                    ),
                    numeric=6,
                )
            )
        if self.proxy.published:
            print(
                f"@name: published through the control socket ({len(self.proxy.published)})"
            )
        disabled = sorted({s.listener.mapping for s in live if not s.enabled})
        if disabled:
            print("disabled (not accepting): " + ", ".join(disabled))
        for service in self.proxy.draining:
            print(f"removed, draining: {service.listener}, {service.active} still open")

    def connections(self, name=None):
        """Print open connections and sessions (of one mapping)."""
        flows = [
            flow
            for service in self.proxy.allListeners()
            for flow in service.flows.values()
            if name is None or flow.listener.mapping == name
        ]
        if not flows:
            if name is not None and name not in self._mappingNames():
                self._unknownMapping(name)
            elif name is None:
                print("no open connections or sessions")
            else:
                print(f"no open connections or sessions on {name}")
            return
        flows.sort(key=lambda flow: flow.id)
        now = self.proxy.reactor.seconds()
        print(
            formatTable(
                ("ID", "MAPPING", "PROTO", "CLIENT", "TARGET", "AGE", "IN", "OUT"),
                (
                    (
                        str(flow.id),
                        flow.listener.mapping,
                        flow.listener.proto,
                        _clientText(flow),
                        str(flow.listener.target),
                        formatAge(now - flow.started),
                        formatBytes(flow.bytesIn),
                        formatBytes(flow.bytesOut),
                    )
                    for flow in flows
                ),
                numeric=3,
            )
        )

    def kill(self, id):
        """Close the connection or session with this id."""
        flow = self.proxy.findFlow(id)
        if flow is None:
            print(f"no open connection or session with id {id!r}")
            return
        flow.close(KILLED)
        print(
            f"closed {flow.id}: {flow.listener.proto} {flow.listener.mapping} "
            f"{flow.client} -> {flow.listener.target}"
        )

    def disable(self, name):
        """Stop accepting on a mapping; its sockets stay open."""
        try:
            self.proxy.disable(name)
        except KeyError:
            self._unknownMapping(name)
        else:
            print(f"{name}: disabled, not accepting new connections or sessions")

    def enable(self, name):
        """Accept again on a mapping after disable(name)."""
        try:
            self.proxy.enable(name)
        except KeyError:
            self._unknownMapping(name)
        except CannotListenError as e:
            # Another process took the port while it was disabled.
            print(f"{name}: cannot accept again: {e}")
        else:
            print(f"{name}: enabled")

    def block(self, cidr, kill=False):
        """Refuse a CIDR's new clients; kill=True: open ones too."""
        try:
            network = parseNetwork(str(cidr))
        except ValueError as e:
            print(f"cannot block: {e}")
            return
        if access.blocklist.block(network):
            print(f"blocked {network} on every listener (until unblock or restart)")
        else:
            print(f"{network} is blocked already")
        if kill:
            closed = 0
            for service in list(self.proxy.allListeners()):
                for flow in list(service.flows.values()):
                    if _clientIn(flow.client, network):
                        flow.close(f"{KILLED} (block {network})")
                        closed += 1
            print(f"closed {closed} open connections or sessions of {network}")

    def unblock(self, cidr):
        """Accept a CIDR blocked with block(cidr) again."""
        try:
            network = parseNetwork(str(cidr))
        except ValueError as e:
            print(f"cannot unblock: {e}")
            return
        if access.blocklist.unblock(network):
            print(f"unblocked {network}")
        else:
            blocked = ", ".join(str(n) for n in access.blocklist.networks) or "none"
            print(f"{network} is not blocked (blocked: {blocked})")

    def blocked(self):
        """Print run-time blocks and refusals by reason."""
        networks = access.blocklist.networks
        if networks:
            print("blocked from the manhole: " + ", ".join(str(n) for n in networks))
        else:
            print("nothing blocked from the manhole")
        lists = sorted(
            {
                (
                    s.listener.mapping,
                    len(s.listener.access.deny),
                    len(s.listener.access.allow),
                )
                for s in self.proxy.listeners.values()
                if s.listener.access.deny or s.listener.access.allow
            }
        )
        for mapping, deny, allow in lists:
            print(f"map: {mapping}: deny {deny} CIDRs, allow {allow or 'everyone'}")
        counts = dict(access.refusalLog.byReason)
        limited = sum(
            s.refused - s.counters.rejected for s in self.proxy.allListeners()
        )
        if limited:
            counts["datagrams_per_client"] = limited
        if counts:
            print(
                "refused since start: "
                + ", ".join(
                    f"{reason} {count}" for reason, count in sorted(counts.items())
                )
            )

    def reload(self):
        """Re-read the map file like SIGHUP; print the summary."""
        # A reload that finishes while this line runs is printed here; one
        # that has to wait is written above the prompt when it finishes.
        write: list[Callable[[str], None]] = [print]
        d = self.proxy.reload()
        d.addBoth(lambda result: self._reported(result, write[0]))
        if not d.called:
            print("reloading...")
        write[0] = self.writeLater

    @staticmethod
    def _reported(result, write: Callable[[str], None]) -> None:
        if isinstance(result, str):
            write(result)
        else:
            # A reload that fails rather than reporting is a bug in the
            # proxy; the operator sees it here.
            write(f"reload failed: {result.getErrorMessage()}")

    def help(self, thing=None):
        """List the helpers, or print the documentation of one thing."""
        if thing is not None:
            print(pydoc.plain(pydoc.render_doc(thing, title="%s")))
            return
        print("portproxy manhole: a Python shell inside the running proxy.")
        for name in HELPERS:
            helper = getattr(self, name)
            print(f"  {_signature(name, helper):<24}{_summary(helper)}")
        print(f"  {'proxy':<24}the running root service, for anything else")
        print("help(status) shows one helper's documentation; Ctrl-D leaves.")


#: The helpers, in the order help() lists them.
HELPERS = (
    "status",
    "connections",
    "kill",
    "disable",
    "enable",
    "block",
    "unblock",
    "blocked",
    "reload",
)


def _clientIn(client: str, network) -> bool:
    """
    Whether the client C{host:port} is in C{network}.
    """
    try:
        key = access.clientKey(access.hostOf(client))
    except OSError:
        return False
    return key in access.AddressSet([network])


def _clientText(flow) -> str:
    """
    A flow's client address, with the subject of its TLS client
    certificate when it sent one.
    """
    peer = getattr(flow, "peer", None)
    return f"{flow.client} ({peer})" if peer else flow.client


def _dropped(service) -> str:
    """
    A listener's DRP cell: the datagrams of new clients a UDP listener
    dropped; TCP has no such count.
    """
    return str(service.dropped) if service.proto == UDP else "-"


def _signature(name: str, helper) -> str:
    parameters = inspect.signature(helper).parameters.values()
    shown = ", ".join(
        p.name if p.default is p.empty else f"{p.name}={p.default!r}"
        for p in parameters
    )
    return f"{name}({shown})"


def _summary(helper) -> str:
    return (helper.__doc__ or "").strip().splitlines()[0]
