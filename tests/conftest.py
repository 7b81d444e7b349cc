import pytest
from support import ProxyProcess


@pytest.fixture(params=["fastpath", "python"])
def proxy(request, tmp_path):
    """
    A portproxy twistd process in its own directory, stopped after the
    test: once with the compiled fast paths (where they are built) and once
    with the pure-Python relays, so that both stay tested.
    """
    process = ProxyProcess(tmp_path, fastPath=request.param == "fastpath")
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def accessLinesAtOnce(monkeypatch):
    """
    In-process tests drive fake reactors whose clocks the process's access
    log does not share: there it writes every line at once (its window is
    tested in test_listener.py, and by the twistd processes of the
    end-to-end tests).
    """
    from twistedproxy.listener import accessLog

    monkeypatch.setattr(accessLog, "window", 0)


@pytest.fixture(autouse=True)
def freshAccessState(monkeypatch):
    """
    Every test starts with no run-time blocks, no per-client counts and an
    empty refusal log, as a new process does.
    """
    from twistedproxy import access

    monkeypatch.setattr(access, "blocklist", access.Blocklist())
    monkeypatch.setattr(access, "clientTables", access.ClientTables())
    monkeypatch.setattr(access, "refusalLog", access.RefusalLog())
