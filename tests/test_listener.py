"""
Tests for L{twistedproxy.listener}: the access log.
"""

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from twistedproxy.listener import AccessLog
from twistedproxy.model import Listener, Target

WEB = Listener("web", "tcp", "127.0.0.1", 8080, Target("127.0.0.1", 80))


def row(flowId, reason):
    """
    An access row of flow C{flowId} of listener C{WEB}.
    """
    return (flowId, WEB, "127.0.0.1:5000", 1.0, 1, 2, reason)


class ShutdownClock(Clock):
    """
    A L{Clock} that records system event triggers, as a reactor would run
    them at shutdown.
    """

    def __init__(self):
        Clock.__init__(self)
        self.triggers = []

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append((phase, event, f))

    def shutDown(self):
        for phase, event, f in self.triggers:
            if (phase, event) == ("after", "shutdown"):
                f()


def test_lineOfAQuietLogIsWrittenAtOnce():
    """
    When the log has been quiet for a window, an access line is written at
    once, as its own event carrying its flow and reason.
    """
    clock = ShutdownClock()
    access = AccessLog(clock, window=0.02)
    with capturedLogs() as events:
        access.write(
            "tcp web a -> b 1.000s in=1 out=2 client closed", row(7, "client closed")
        )
        clock.advance(0.05)
        access.write(
            "tcp web c -> b 2.000s in=3 out=4 target closed", row(8, "target closed")
        )
    assert [formatEvent(e) for e in events] == [
        "tcp web a -> b 1.000s in=1 out=2 client closed",
        "tcp web c -> b 2.000s in=3 out=4 target closed",
    ]
    assert [(e["flow"], e["reason"]) for e in events] == [
        (7, "client closed"),
        (8, "target closed"),
    ]
    assert clock.getDelayedCalls() == []


def test_linesWithinAWindowAreOneEvent():
    """
    Lines that come within a window of the last write are held, and
    written as one event, one line per flow, when the window has passed.
    """
    clock = ShutdownClock()
    access = AccessLog(clock, window=0.02)
    with capturedLogs() as events:
        access.write("line one", row(1, "client closed"))
        clock.advance(0.005)
        access.write("line two", row(2, "killed"))
        access.write("line three", row(3, "target closed"))
        assert [formatEvent(e) for e in events] == ["line one"]
        clock.advance(0.014)
        assert len(events) == 1
        clock.advance(0.001)
    assert [formatEvent(e) for e in events] == ["line one", "line two\nline three"]
    assert events[1]["flows"] == 2
    assert [r[0] for r in events[1]["accessRows"]] == [2, 3]
    assert clock.getDelayedCalls() == []


def test_heldLinesAreWrittenAtShutdown():
    """
    Lines still held when the reactor shuts down are written by its
    after-shutdown trigger, so the last flows' lines (C{proxy stopped})
    are never lost.
    """
    clock = ShutdownClock()
    access = AccessLog(clock, window=10)
    with capturedLogs() as events:
        access.write("first", row(1, "client closed"))
        access.write("second", row(2, "proxy stopped"))
        access.write("third", row(3, "proxy stopped"))
        clock.shutDown()
    assert [formatEvent(e) for e in events] == ["first", "second\nthird"]
    assert clock.getDelayedCalls() == []
    assert len(clock.triggers) == 1


def test_noWindowWritesEveryLine():
    """
    With a window of 0, every line is its own event at once.
    """
    clock = ShutdownClock()
    access = AccessLog(clock, window=0)
    with capturedLogs() as events:
        for n in range(3):
            access.write(f"line {n}", row(n, "client closed"))
    assert [formatEvent(e) for e in events] == ["line 0", "line 1", "line 2"]
    assert clock.getDelayedCalls() == []
