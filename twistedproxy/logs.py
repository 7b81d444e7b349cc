"""
The map's C{log_format}: what twistd writes to its log file (or standard
output), as text (the default) or as one JSON object per line.

twistd owns the log observer: C{--logfile}, C{-n} (standard output) and log
rotation are its business, and portproxy keeps them.  C{log_format: json}
changes only how twistd's file observer formats each event: portproxy
gives every file observer of the global log publisher (L{FileLogObserver},
which is what twistd installs for C{--logfile} and C{-n}) the
L{jsonLines} formatter, and gives the text one back when a reload says
C{text}.

So that the log is JSON from its first line (C{twistd ... starting up}
included) when the map says C{json} at start-up, the twistd plugin makes
twistd's file observer itself, from twistd's own options and the way twistd
does (L{twistdJSONObserver}), and gives it to twistd as the application's
C{ILogObserver}, which twistd then uses in place of making one.  Under a
C{.tac} file the switch happens when the service starts, after twistd's
first two lines.  A custom C{--logger} or C{--syslog} is left alone.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from twisted.logger import FileLogObserver, formatEvent

from twistedproxy.compat import logObservers, twistdLogObserver
from twistedproxy.model import Listener

#: Event keys that are twisted.logger's or the legacy log's own machinery,
#: not facts about the event.
_SKIPPED = frozenset(
    ("format", "message", "system", "isError", "why", "failure", "time", "accessRows")
)

#: The attribute of a L{FileLogObserver} keeping its text formatter while
#: it writes JSON.
_TEXT = "_portproxyTextFormat"


def useLogFormat(name: str) -> None:
    """
    Make the file observers of the global log publisher write C{name}
    (C{"text"} or C{"json"}).
    """
    for observer in logObservers():
        if not isinstance(observer, FileLogObserver):
            continue
        text = getattr(observer, _TEXT, None)
        if name == "json" and text is None:
            setattr(observer, _TEXT, observer.formatEvent)
            observer.formatEvent = jsonLines
        elif name == "text" and text is not None:
            observer.formatEvent = text
            delattr(observer, _TEXT)


def twistdJSONObserver(twistdOptions) -> FileLogObserver | None:
    """
    The file observer twistd would make from C{twistdOptions}, writing JSON
    lines; L{None} when twistd was told to log elsewhere (C{--logger},
    C{--syslog}).
    """
    if twistdOptions.get("logger") or twistdOptions.get("syslog"):
        return None
    observer = twistdLogObserver(twistdOptions)
    if not isinstance(observer, FileLogObserver):
        return None
    setattr(observer, _TEXT, observer.formatEvent)
    observer.formatEvent = jsonLines
    return observer


def jsonLines(event: dict) -> str | None:
    """
    An event as JSON lines: one object per flow for an access event (a
    batch of access lines too), one object for any other event.
    """
    base = {
        "time": _isoTime(event.get("log_time")),
        "level": event["log_level"].name if "log_level" in event else "info",
        "namespace": event.get("log_namespace", ""),
    }
    rows = event.get("accessRows")
    if rows is not None:
        return "".join(json.dumps(accessRecord(base, row)) + "\n" for row in rows)
    record = dict(base)
    record["message"] = formatEvent(event)
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIPPED:
            continue
        if isinstance(value, Listener):
            record.update(_listenerFields(value))
        else:
            record[key] = _jsonable(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record) + "\n"


def accessRecord(base: dict, row: tuple) -> dict:
    """
    The JSON object of one access row (L{twistedproxy.listener.ACCESS_ROW}).
    """
    flowId, listener, client, duration, bytesIn, bytesOut, peer, reason = row
    record = dict(base)
    record.update(
        event="access",
        flow=flowId,
        mapping=listener.mapping,
        proto=listener.proto,
        listen=listener.listen,
        client=client,
        target=str(listener.target),
        duration=round(duration, 6),
        bytes_in=bytesIn,
        bytes_out=bytesOut,
        reason=reason,
    )
    if peer:
        record["peer"] = peer
    return record


def _listenerFields(listener: Listener) -> dict:
    return {
        "mapping": listener.mapping,
        "proto": listener.proto,
        "listen": listener.listen,
        "target": str(listener.target),
    }


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value)


def _isoTime(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
