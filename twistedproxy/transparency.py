"""
C{client_address: transparent}: sockets towards the target bound to the
client's own address with C{IP_TRANSPARENT} (C{IPV6_TRANSPARENT}), so that
an unmodified target sees the real client, as HAProxy's C{usesrc clientip}
and go-mmproxy do.

The option needs C{CAP_NET_ADMIN}, and the target's replies, addressed to
the client, only come back to the proxy with policy routing
(C{docs/client-address.md} has the recipe); a target on loopback cannot
answer a foreign address at all.
"""

from __future__ import annotations

import socket

# Linux values; Python 3.11 exports IP_TRANSPARENT but not IPV6_TRANSPARENT.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)

#: The bit of C{CAP_NET_ADMIN} in C{/proc/self/status}'s C{CapEff}.
CAP_NET_ADMIN = 12


def problem(status: str = "/proc/self/status") -> str | None:
    """
    Why this process cannot open transparent sockets, or L{None} when it
    can: it needs C{CAP_NET_ADMIN} (root has it).
    """
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) >> CAP_NET_ADMIN & 1:
                        return None
                    break
            else:
                return "cannot read this process's capabilities (CapEff) to check CAP_NET_ADMIN"
    except (OSError, ValueError):
        return "cannot read this process's capabilities (CapEff) to check CAP_NET_ADMIN"
    return (
        "needs CAP_NET_ADMIN (run as root, or grant the capability)"
        " to connect from the client's address"
    )


def transparentSocket(family: int, kind: int, source: tuple[str, int]) -> socket.socket:
    """
    A non-blocking socket of C{family} and C{kind} bound to the client's
    C{source} address and port, which need not be an address of this host.

    @raise OSError: when the option or the bind is refused (no
        C{CAP_NET_ADMIN}; the client's address and port are bound already).
    """
    skt = socket.socket(family, kind | socket.SOCK_NONBLOCK)
    try:
        bindTransparent(skt, source)
    except BaseException:
        skt.close()
        raise
    return skt


def bindTransparent(skt: socket.socket, source: tuple[str, int]) -> None:
    """
    Set C{IP_TRANSPARENT} (C{IPV6_TRANSPARENT}) on C{skt} and bind it to
    C{source}.
    """
    if skt.family == socket.AF_INET6:
        skt.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        skt.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    # Two flows of one client to two targets may share its address and
    # port: each connected socket is told apart by its target.
    skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    skt.bind(source)
