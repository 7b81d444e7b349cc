"""
The PROXY protocol (HAProxy's C{doc/proxy-protocol.txt}), versions 1 and 2:
the header a proxy puts in front of a connection's bytes (or, in version 2,
of each datagram) to tell the next hop who the client is.

L{encode} builds the header portproxy sends for C{client_address:
proxy_protocol_v1 | proxy_protocol_v2}; L{parse} reads one from a listed
source for C{accept_proxy_protocol}, strictly: anything that starts like a
header and is not exactly one is an error, and the bytes needed are bounded
(L{V1_MAX} for version 1, 16 + its length field for version 2).
L{HeaderReader} waits for a TCP client's header without consuming a byte
past it, so that what follows is relayed untouched (also by the relay
engine, which takes the socket afterwards).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import NamedTuple, TypeAlias

from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

#: The twelve bytes every version 2 header starts with.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: What every version 1 header starts with.
V1_PREFIX = b"PROXY "

#: The longest version 1 header, CRLF included (the spec's bound).
V1_MAX = 107

#: The fixed part of a version 2 header: signature, version and command,
#: family and transport, length.
V2_FIXED = 16

#: Version 2, commands LOCAL and PROXY.
_V2_LOCAL = 0x20
_V2_PROXY = 0x21

#: Version 2 families (high nibble) and transports (low nibble).
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_STREAM, _DGRAM = 1, 2

#: Address block sizes of version 2, by family.
_ADDRESS_SIZES = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

_V2_HEAD = struct.Struct("!12sBBH")


class Addresses(NamedTuple):
    """
    A connection's two ends as a header carries them: the client
    (C{source}) and the address it connected to (C{destination}), each
    C{(host, port)}.
    """

    source: tuple[str, int]
    destination: tuple[str, int]


class HeaderError(ValueError):
    """
    Bytes that start like a PROXY header but are not a valid one.
    """


#: L{parse}'s answer while the bytes so far could still become a header.
NEED_MORE = None

#: L{parse}'s answer for bytes that are no header at all: C{(0, None)}.
NO_HEADER = (0, None)

Parsed: TypeAlias = tuple[int, Addresses | None] | None


def encode(version: int, addresses: Addresses, datagram: bool = False) -> bytes:
    """
    The PROXY header of C{version} (1 or 2) telling the next hop that
    C{addresses.source} connected to C{addresses.destination}; version 2
    only describes a datagram (C{datagram}).  The two addresses are of one
    family.
    """
    (sourceHost, sourcePort), (destinationHost, destinationPort) = addresses
    ipv6 = ":" in sourceHost
    if version == 1:
        if datagram:
            raise ValueError("PROXY protocol version 1 has no datagram form")
        family = "TCP6" if ipv6 else "TCP4"
        return (
            f"PROXY {family} {sourceHost} {destinationHost} "
            f"{sourcePort} {destinationPort}\r\n"
        ).encode("ascii")
    af = socket.AF_INET6 if ipv6 else socket.AF_INET
    addressFamily = _AF_INET6 if ipv6 else _AF_INET
    block = (
        socket.inet_pton(af, sourceHost)
        + socket.inet_pton(af, destinationHost)
        + struct.pack("!HH", sourcePort, destinationPort)
    )
    kind = addressFamily << 4 | (_DGRAM if datagram else _STREAM)
    return _V2_HEAD.pack(SIGNATURE, _V2_PROXY, kind, len(block)) + block


def parse(data: bytes) -> Parsed:
    """
    Read a PROXY header (version 1 or 2) at the start of C{data}.

    @return: L{NEED_MORE} (L{None}) while C{data} could still become a
        header; otherwise C{(length, addresses)}: the header's length in
        bytes and what it says, where C{addresses} is L{None} for a header
        that carries none to use (version 2 LOCAL, an unspecified or
        UNIX family, version 1 UNKNOWN), and C{(0, None)} (L{NO_HEADER})
        when C{data} does not start like a header at all.
    @raise HeaderError: C{data} starts like a header and is not a valid one.
    """
    if data[:12] == SIGNATURE:
        return _parseV2(data)
    if data[:6] == V1_PREFIX:
        return _parseV1(data)
    if SIGNATURE.startswith(data) or V1_PREFIX.startswith(data):
        return NEED_MORE
    return NO_HEADER


def headerBound(data: bytes) -> int:
    """
    How many bytes, C{data} included, the header that C{data} starts can
    have at most: 16 + its length field once a version 2 header's fixed
    part is in, L{V1_MAX} before.
    """
    if len(data) >= V2_FIXED and data[:12] == SIGNATURE:
        return V2_FIXED + _V2_HEAD.unpack_from(data)[3]
    return max(V1_MAX, V2_FIXED)


def _parseV2(data: bytes) -> Parsed:
    if len(data) < V2_FIXED:
        return NEED_MORE
    _, command, kind, length = _V2_HEAD.unpack_from(data)
    if command not in (_V2_LOCAL, _V2_PROXY):
        if command >> 4 != 2:
            raise HeaderError(f"PROXY v2 header of version {command >> 4}")
        raise HeaderError(f"PROXY v2 header with unknown command {command & 0xF}")
    family, transport = kind >> 4, kind & 0xF
    if family > _AF_UNIX or transport > _DGRAM:
        raise HeaderError(f"PROXY v2 header with unknown family/transport 0x{kind:02x}")
    total = V2_FIXED + length
    if len(data) < total:
        return NEED_MORE
    if command == _V2_LOCAL or family == _AF_UNSPEC or transport == 0:
        # LOCAL: the sender's own connection (a health check); UNSPEC: the
        # spec's "unknown": the receiver uses the real connection's ends.
        return total, None
    needed = _ADDRESS_SIZES[family]
    if length < needed:
        raise HeaderError(f"PROXY v2 address block of {length} bytes, {needed} needed")
    if family == _AF_UNIX:
        return total, None
    size = 4 if family == _AF_INET else 16
    af = socket.AF_INET if family == _AF_INET else socket.AF_INET6
    source = socket.inet_ntop(af, data[V2_FIXED : V2_FIXED + size])
    destination = socket.inet_ntop(af, data[V2_FIXED + size : V2_FIXED + 2 * size])
    sourcePort, destinationPort = struct.unpack_from("!HH", data, V2_FIXED + 2 * size)
    return total, Addresses((source, sourcePort), (destination, destinationPort))


def _parseV1(data: bytes) -> Parsed:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise HeaderError("PROXY v1 header without CRLF in its first 107 bytes")
        return NEED_MORE
    words = data[:end].split(b" ")
    family = words[1] if len(words) > 1 else b""
    if family == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return end + 2, None
    if family not in (b"TCP4", b"TCP6"):
        raise HeaderError(f"PROXY v1 header with unknown protocol {family[:10]!r}")
    if len(words) != 6:
        raise HeaderError("PROXY v1 header without exactly two addresses and two ports")
    af = socket.AF_INET if family == b"TCP4" else socket.AF_INET6
    try:
        source = _v1Address(af, words[2])
        destination = _v1Address(af, words[3])
    except (OSError, UnicodeDecodeError):
        raise HeaderError(
            f"PROXY v1 header with an address that is not {family.decode()}"
        ) from None
    return end + 2, Addresses(
        (source, _v1Port(words[4])), (destination, _v1Port(words[5]))
    )


def _v1Address(af: int, word: bytes) -> str:
    # Normalised through inet_pton: "::FFFF:1.2.3.4" and "::ffff:102:304"
    # are one client.
    return socket.inet_ntop(af, socket.inet_pton(af, word.decode("ascii")))


def _v1Port(word: bytes) -> int:
    if not word.isdigit() or (word[:1] == b"0" and word != b"0") or int(word) > 65535:
        raise HeaderError(f"PROXY v1 header with a bad port {word[:10]!r}")
    return int(word)


#: What a UDP session does with PROXY v2 headers at the start of its
#: client's datagrams (C{udp/_engine.c}'s C{HEADERS_*}): nothing, take them
#: off (a source in C{accept_proxy_protocol}), or refuse datagrams that
#: carry one (any other source).
HEADERS_NONE, HEADERS_TAKE, HEADERS_REFUSE = 0, 1, 2


def datagramHeader(mode: int, data: bytes) -> tuple[int, Addresses | None]:
    """
    The PROXY v2 header at the start of a client's datagram, for a
    session's C{mode}: its length (0 when there is none, or the mode takes
    none) and its addresses (L{None} when it carries none to use).

    @raise HeaderError: the datagram must be dropped: a malformed or
        truncated header, or any header when C{mode} refuses them.
    """
    if mode == HEADERS_NONE or data[:12] != SIGNATURE:
        return NO_HEADER
    if mode == HEADERS_REFUSE:
        raise HeaderError("PROXY header from a source not in accept_proxy_protocol")
    parsed = parse(data)
    if parsed is NEED_MORE:
        raise HeaderError("truncated PROXY v2 header")
    return parsed


#: What a L{HeaderReader} reports: the addresses of the header, L{None}
#: when the client keeps its own (no header, or one without addresses),
#: or a L{HeaderError} when it must be closed.
HeaderResult: TypeAlias = Addresses | HeaderError | None


@implementer(IReadDescriptor)
class HeaderReader:
    """
    Waits, in the reactor, for the PROXY header a TCP client starts with,
    and reads exactly the header: bytes are peeked first, and only those
    that belong to the header are consumed, so that the client's own bytes
    stay in the socket for whoever relays them.

    From a C{trusted} source, a header is taken, no header at all leaves
    the client its own address, and a malformed header, an end of stream
    or no bytes within C{timeout} close it.  From any other source, a
    header (or a malformed one) closes it, other bytes, and silence for
    C{timeout} (a protocol whose server speaks first), leave it be.

    @ivar done: called once with the L{HeaderResult}; L{None} once it was,
        or when cancelled.
    """

    def __init__(
        self,
        reactor,
        skt: socket.socket,
        trusted: bool,
        timeout: float,
        done: Callable[[HeaderResult], None],
    ) -> None:
        self.reactor = reactor
        self.socket = skt
        self.trusted = trusted
        self.done: Callable[[HeaderResult], None] | None = done
        self._read = b""
        self._timer = reactor.callLater(timeout, self._timedOut, timeout)

    def start(self) -> None:
        self.reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "portproxy"

    def doRead(self) -> None:
        read = self._read
        try:
            peeked = self.socket.recv(headerBound(read) - len(read), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(
                HeaderError(f"client failed before its PROXY header: {e.strerror}")
            )
            return
        if not peeked:
            self._finish(HeaderError("client closed before its PROXY header"))
            return
        data = read + peeked
        try:
            parsed = parse(data)
        except HeaderError as e:
            self._finish(e)
            return
        if parsed is NEED_MORE:
            # Every byte so far is part of the header: consumed, so that
            # the socket is not readable again until more comes.
            self._consume(len(peeked), data)
            return
        length, addresses = parsed
        if length == 0:
            if read:
                # What was consumed cannot be put back: the client's
                # stream would miss its first bytes.
                self._finish(
                    HeaderError(
                        "first bytes began like a PROXY header and were not one"
                    )
                )
            else:
                self._finish(None)
            return
        if not self.trusted:
            self._finish(
                HeaderError("PROXY header from a source not in accept_proxy_protocol")
            )
            return
        self._consume(length - len(read), data[:length])
        if self.done is not None:
            self._finish(addresses)

    def _consume(self, count: int, data: bytes) -> None:
        try:
            got = self.socket.recv(count)
        except OSError as e:
            self._finish(
                HeaderError(f"client failed before its PROXY header: {e.strerror}")
            )
            return
        if len(got) != count:
            # Peeked bytes are there to read: only a bug gets here.
            self._finish(HeaderError("PROXY header bytes vanished"))
            return
        self._read = data

    def _timedOut(self, timeout: float) -> None:
        self._timer = None
        if self.trusted or self._read:
            self._finish(HeaderError(f"no complete PROXY header within {timeout:g}s"))
        else:
            self._finish(None)

    def _finish(self, result: HeaderResult) -> None:
        done, self.done = self.done, None
        if done is not None:
            self.cancel()
            done(result)

    def cancel(self) -> None:
        """
        Stop waiting, reporting nothing.
        """
        self.done = None
        self.reactor.removeReader(self)
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason) -> None:
        self._finish(HeaderError("client connection lost before its PROXY header"))
