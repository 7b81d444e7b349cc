"""
Tests for L{twistedproxy.listener}: the access log.
"""

from twisted.logger import capturedLogs, formatEvent

from twistedproxy.listener import AccessLog


def test_accessLineIsOneEvent():
    """
    Outside a batch, each access line is one log event carrying its flow
    and reason.
    """
    access = AccessLog()
    with capturedLogs() as events:
        access.write("tcp web a -> b 1.000s in=1 out=2 client closed", 7, "client closed")
        access.write("tcp web c -> b 2.000s in=3 out=4 target closed", 8, "target closed")
    assert [formatEvent(e) for e in events] == [
        "tcp web a -> b 1.000s in=1 out=2 client closed",
        "tcp web c -> b 2.000s in=3 out=4 target closed",
    ]
    assert [(e["flow"], e["reason"]) for e in events] == [(7, "client closed"), (8, "target closed")]


def test_linesWrittenTogetherAreOneEvent():
    """
    Access lines written inside together() become one event when the
    block ends, one line per flow, and nested blocks join the outer one.
    """
    access = AccessLog()
    with capturedLogs() as events:
        with access.together():
            access.write("line one", 1, "client closed")
            with access.together():
                access.write("line two", 2, "killed")
            assert events == []
        with access.together():
            pass
    assert [formatEvent(e) for e in events] == ["line one\nline two"]
    assert events[0]["flows"] == 2


def test_batchIsWrittenWhenTheBlockFails():
    """
    Lines gathered before an exception in the block are still written.
    """
    access = AccessLog()
    with capturedLogs() as events:
        try:
            with access.together():
                access.write("written", 1, "client closed")
                raise ZeroDivisionError()
        except ZeroDivisionError:
            pass
        access.write("after", 2, "client closed")
    assert [formatEvent(e) for e in events] == ["written", "after"]
