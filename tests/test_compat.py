"""
Tests for L{twistedproxy.compat}: Twisted's private names in one place.
"""

from types import SimpleNamespace

import pytest
from twisted.internet import tcp

from twistedproxy import compat


def test_missingNameRefusesWithTheName():
    """
    A private name that is gone raises L{compat.TwistedChanged} naming the
    owner, the attribute and what portproxy uses it for.
    """
    owner = SimpleNamespace()
    with pytest.raises(compat.TwistedChanged) as caught:
        compat._require(owner, "_tempDataBuffer", "to see that a transport is idle")
    message = str(caught.value)
    assert "_tempDataBuffer is gone" in message
    assert "to see that a transport is idle" in message


def test_checkFailsWhenTwistedRenamesAName(monkeypatch):
    """
    The import-time check fails when C{tcp._reservedFD} is renamed away.
    """
    monkeypatch.delattr(tcp, "_reservedFD")
    with pytest.raises(compat.TwistedChanged, match="_reservedFD"):
        compat._check()


def test_installedTwistedPassesTheCheck():
    """
    The Twisted the tests run on has every name portproxy relies on.
    """
    compat._check()


def _transport(**changes):
    values = dict(
        connected=True,
        socket=object(),
        disconnecting=False,
        _writeDisconnecting=False,
        _writeDisconnected=False,
        _aborting=False,
        dataBuffer=b"",
        _tempDataBuffer=[],
    )
    values.update(changes)
    return SimpleNamespace(**values)


@pytest.mark.parametrize(
    "changes",
    [
        {"dataBuffer": b"x"},
        {"_tempDataBuffer": [b"x"]},
        {"_writeDisconnecting": True},
        {"_writeDisconnected": True},
        {"_aborting": True},
        {"disconnecting": True},
        {"connected": False},
    ],
)
def test_transportNotIdle(changes):
    """
    A transport with buffered bytes, or closing in any way, is not idle.
    """
    assert not compat.transportIdle(_transport(**changes))


def test_transportIdle():
    """
    A connected transport with empty buffers that is not closing is idle.
    """
    assert compat.transportIdle(_transport())
