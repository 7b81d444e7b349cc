"""
Every private name of Twisted that portproxy relies on, in one place.

Handing a connection from a Twisted transport to the relay engine is only
safe when nothing is buffered in the transport, and Twisted keeps its write
buffers in private attributes; the TCP listener skips Twisted's per-port
log lines through a private hook; C{log_format: json} finds twistd's log
observer among the global publisher's.  A Twisted release that renamed one of
these would otherwise go unnoticed: a hand-off would then move a socket
with bytes still buffered in Python, silently losing them.  So this module
checks, when it is imported, that every name is still there, and refuses to
import (and so portproxy refuses to start) when one is not.

pyproject.toml bounds Twisted's version to the releases the tests ran
against; raise the bound only after the suite passed on the new release.
"""

from __future__ import annotations

from twisted.internet import abstract, tcp
from twisted.logger import globalLogPublisher
from twisted.scripts._twistd_unix import UnixAppLogger

from twisted import version as twistedVersion


class TwistedChanged(ImportError):
    """
    The installed Twisted lacks a private name portproxy relies on.
    """


def _require(owner: object, name: str, use: str) -> None:
    if not hasattr(owner, name):
        where = getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner)))
        raise TwistedChanged(
            f"portproxy does not work with Twisted {twistedVersion.short()}: "
            f"{where}.{name} is gone, and portproxy uses it {use}"
        )


def _check() -> None:
    _require(tcp, "_reservedFD", "to shed clients when descriptors run out")
    _require(tcp._reservedFD, "reserve", "to shed clients when descriptors run out")
    _require(
        tcp.Port, "_logConnectionLostMsg", "to leave out Twisted's per-port log line"
    )
    _require(tcp.Connection, "_aborting", "to see that a transport is being aborted")
    _require(
        tcp.Connector,
        "_makeTransport",
        "to dial a transparent target from a socket it prepares itself",
    )
    for name in ("_writeDisconnecting", "_writeDisconnected", "dataBuffer"):
        _require(abstract.FileDescriptor, name, "to see that a transport is idle")
    # An instance attribute: look at a fresh, unconnected descriptor (the
    # reactor argument is only stored).
    _require(
        abstract.FileDescriptor(reactor=object()),  # type: ignore[arg-type]
        "_tempDataBuffer",
        "to see that a transport is idle",
    )
    _require(
        globalLogPublisher, "_observers", "to find twistd's log file for log_format"
    )
    _require(
        UnixAppLogger, "_getLogObserver", "to write twistd's log file as JSON lines"
    )
    _require(tcp.Port, "_shouldShutdown", "to keep a socket from systemd listening")


_check()


def reserveDescriptor() -> None:
    """
    Keep one descriptor in reserve for Twisted's accept, which closes it to
    accept and shed a client when the process has run out of descriptors.
    """
    tcp._reservedFD.reserve()


def transportIdle(transport) -> bool:
    """
    Whether a connected TCP transport is open both ways, not closing, and
    holds no byte in its write buffers.
    """
    return (
        getattr(transport, "connected", False)
        and hasattr(transport, "socket")
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not getattr(transport, "_aborting", False)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    )


def logObservers() -> list:
    """
    The observers of the global log publisher: twistd's own (its
    C{--logfile} or standard output) among them.  C{twisted.logger} has no
    public way to list them.
    """
    return list(globalLogPublisher._observers)


def twistdLogObserver(twistdOptions):
    """
    The log observer twistd makes from its options (C{--logfile}, C{-n},
    C{--syslog}), made the way twistd makes it, log rotation included.
    """
    return UnixAppLogger(twistdOptions)._getLogObserver()


def closeWithoutShutdown(port) -> None:
    """
    Make a Twisted TCP port close its socket without C{shutdown()} first,
    as Twisted's C{adoptStreamPort} does: the listening socket is shared
    (systemd's), and a shutdown would stop it listening for every holder.
    """
    port._shouldShutdown = False
