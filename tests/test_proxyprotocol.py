"""
Unit tests of L{twistedproxy.proxyprotocol}: byte-exact headers as HAProxy's
doc/proxy-protocol.txt lays them out, strict parsing of good, garbage,
truncated and oversize input, and L{HeaderReader} reading exactly the
header from a real socket pair.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.task import Clock

from twistedproxy.model import ClientIdentity
from twistedproxy.proxyprotocol import (
    NEED_MORE,
    NO_HEADER,
    SIGNATURE,
    V1_MAX,
    Addresses,
    HeaderError,
    HeaderReader,
    encode,
    parse,
)

V4 = Addresses(("192.168.0.1", 56324), ("192.168.0.11", 443))
V6 = Addresses(("2001:db8::1", 1), ("2001:db8::2", 65535))


def test_v1Exact():
    """
    Version 1 is the spec's text line: protocol, addresses, ports, CRLF.
    """
    assert encode(1, V4) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode(1, V6) == b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"


def test_v2Exact():
    """
    Version 2 is the signature, 0x21 (v2, PROXY), 0x11 / 0x21 (TCP over
    IPv4 / IPv6) or 0x12 / 0x22 (UDP), the address block's length, then
    source, destination, source port, destination port in network order.
    """
    assert bytes.fromhex("0D0A0D0A000D0A515549540A") == SIGNATURE
    assert encode(2, V4) == (
        SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([192, 168, 0, 1, 192, 168, 0, 11])
        + b"\xdc\x04\x01\xbb"
    )
    dgram = encode(2, V4, datagram=True)
    assert dgram[12:16] == b"\x21\x12\x00\x0c"
    six = encode(2, V6)
    assert six[12:16] == b"\x21\x21\x00\x24" and len(six) == 52
    assert encode(2, V6, datagram=True)[13] == 0x22


def test_v1HasNoDatagramForm():
    """
    Asking for a version 1 datagram header is a bug.
    """
    with pytest.raises(ValueError):
        encode(1, V4, datagram=True)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("addresses", [V4, V6])
def test_roundTrip(version, addresses):
    """
    What L{encode} writes, L{parse} reads back, with the header's length.
    """
    header = encode(version, addresses)
    assert parse(header + b"rest") == (len(header), addresses)


def test_needMoreForEveryPrefix():
    """
    Every proper prefix of a header asks for more bytes.
    """
    for header in (encode(1, V6), encode(2, V6)):
        for cut in range(len(header)):
            assert parse(header[:cut]) is NEED_MORE


def test_noHeader():
    """
    Bytes that do not start like a header are no header: length 0.
    """
    assert parse(b"GET / HTTP/1.1\r\n") == NO_HEADER
    assert parse(b"\r\n\r\nX") == NO_HEADER
    assert parse(b"PROXZ") == NO_HEADER


def test_localAndUnknownCarryNoAddress():
    """
    v2 LOCAL, v2 UNSPEC, and v1 UNKNOWN (with whatever precedes its CRLF)
    are headers whose addresses are not used.
    """
    local = SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(local + b"x") == (16, None)
    unspec = SIGNATURE + b"\x21\x00\x00\x03abc"
    assert parse(unspec) == (19, None)
    assert parse(b"PROXY UNKNOWN\r\n") == (15, None)
    assert parse(b"PROXY UNKNOWN 1.2.3.4 junk\r\nx") == (28, None)


def test_v2TLVsAreSkipped():
    """
    A v2 header's length covers TLVs after the addresses; they are read
    and skipped.
    """
    header = encode(2, V4)
    withTlv = (
        header[:14] + (12 + 5).to_bytes(2, "big") + header[16:] + b"\x04\x00\x02ab"
    )
    assert parse(withTlv + b"data") == (len(withTlv), V4)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF only
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY " + b"A" * V1_MAX,  # no CRLF in 107 bytes: oversize
        SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # unknown command
        SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),  # unknown family
        SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),  # unknown transport
        SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),  # address block too short
        SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # IPv6 in 12 bytes
    ],
)
def test_garbageIsAnError(data):
    """
    Anything that starts like a header and is not exactly one is an error.
    """
    with pytest.raises(HeaderError):
        parse(data)


def test_v1Bound():
    """
    The longest valid v1 header (107 bytes) is accepted; no CRLF within
    107 bytes is an error whatever follows.
    """
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(longest) == V1_MAX
    assert parse(longest) == (V1_MAX, None)
    with pytest.raises(HeaderError):
        parse(longest[:-2] + b"xx\r\n")


def test_trusts():
    """
    ClientIdentity.trusts matches a host against the accepted networks.
    """
    identity = ClientIdentity("", ("10.0.0.0/8", "fd00::/8"))
    assert identity.trusts("10.1.2.3") and identity.trusts("fd00::5")
    assert not identity.trusts("127.0.0.1") and not identity.trusts("fe80::1")


class ReaderBench:
    """
    A L{HeaderReader} on one end of a real socket pair, with a fake
    reactor that only records readers and a clock.
    """

    def __init__(self, trusted=True):
        self.clock = Clock()
        self.readers = set()
        self.clock.addReader = self.readers.add
        self.clock.removeReader = self.readers.discard
        self.near, self.far = socket.socketpair()
        self.near.setblocking(False)
        self.results = []
        self.reader = HeaderReader(
            self.clock, self.near, trusted, 3.0, self.results.append
        )
        self.reader.start()

    def feed(self, data):
        self.far.sendall(data)
        self.reader.doRead()

    def close(self):
        self.near.close()
        self.far.close()


def test_readerConsumesOnlyTheHeader():
    """
    The reader consumes the header's bytes, also when they come in
    pieces, and leaves what follows in the socket.
    """
    bench = ReaderBench()
    header = encode(2, V6)
    bench.feed(header[:5])
    bench.feed(header[5:20])
    assert bench.results == []
    bench.feed(header[20:] + b"payload")
    assert bench.results == [V6]
    assert bench.near.recv(100) == b"payload"
    assert bench.readers == set()
    bench.close()


def test_readerNoHeaderKeepsEverything():
    """
    From a listed source, bytes that are no header leave the client its
    own address and stay in the socket.
    """
    bench = ReaderBench()
    bench.feed(b"hello")
    assert bench.results == [None]
    assert bench.near.recv(100) == b"hello"
    bench.close()


def test_readerUnlistedHeaderRefused():
    """
    From a source not listed, a header is an error; silence for the
    timeout lets the client go on as itself.
    """
    bench = ReaderBench(trusted=False)
    bench.feed(encode(1, V4))
    assert isinstance(bench.results[0], HeaderError)
    bench.close()
    quiet = ReaderBench(trusted=False)
    quiet.clock.advance(3.0)
    assert quiet.results == [None]
    quiet.close()


def test_readerTimeoutAndEnd():
    """
    From a listed source, no header within the timeout, or the end of
    stream before it, is an error; the result is reported once.
    """
    bench = ReaderBench()
    bench.feed(b"PROXY TCP4")
    bench.clock.advance(3.0)
    assert len(bench.results) == 1 and "within 3s" in str(bench.results[0])
    bench.close()
    ended = ReaderBench()
    ended.far.close()
    ended.reader.doRead()
    assert len(ended.results) == 1 and isinstance(ended.results[0], HeaderError)
    ended.near.close()


def test_readerOversizeV1():
    """
    107 bytes without a CRLF from a listed source is an error, read in
    bounded pieces.
    """
    bench = ReaderBench()
    bench.feed(b"PROXY " + b"1" * 200)
    bench.reader.doRead()
    assert len(bench.results) == 1 and isinstance(bench.results[0], HeaderError)
    bench.close()


def test_readerPrefixThatIsNoHeaderCloses():
    """
    Bytes that began like a header, consumed while waiting for the rest,
    and then turn out not to be one close the client: they cannot be
    relayed any more.
    """
    bench = ReaderBench()
    bench.feed(b"PROX")
    assert bench.results == []
    bench.feed(b"IMA")
    assert len(bench.results) == 1 and isinstance(bench.results[0], HeaderError)
    bench.close()


def test_trustsMatchesAsTheAccessListsDo():
    """
    accept_proxy_protocol's networks match an IPv4-mapped IPv6 client (how
    a dual-stack socket sees an IPv4 one) as its IPv4 address, as allow and
    deny do, and nothing that is not an IP literal.
    """
    from twistedproxy.model import ClientIdentity

    identity = ClientIdentity(acceptProxyProtocol=("10.0.0.0/8", "fd00::/8"))
    assert identity.trusts("10.1.2.3")
    assert identity.trusts("::ffff:10.1.2.3")
    assert identity.trusts("fd00::1")
    assert not identity.trusts("11.0.0.1")
    assert not identity.trusts("::ffff:11.0.0.1")
    assert not identity.trusts("db.internal")
