"""
TLS for TCP listeners: the certificate files of the map, the OpenSSL
connections a listener makes from them, and the ClientHello reader of SNI
routing.

Three uses, each set per mapping (docs/tls.md):

  - C{tls:} terminates TLS from clients: L{serverFactory} wraps the
    listener's relay factory in Twisted's L{TLSMemoryBIOFactory}, with
    L{ServerConnections} choosing the certificate by the client's server
    name and asking for a client certificate when C{client_ca} is set.
  - C{target_tls:} originates TLS to the target: L{targetFactory} wraps the
    connector of each dial, with Twisted's C{optionsForClientTLS}, which
    checks the target's name or address with C{service_identity}.
  - C{sni_routes:} passthrough: L{ClientHelloPeek} reads the server name
    from the client's first bytes without taking them off the socket
    (C{MSG_PEEK}), so the relay that follows, compiled or Python, forwards
    them unchanged.

Files are read when the map is (L{readKeyPair}, L{readAuthorities}), so
C{check} and a reload report a missing or mismatched file as
C{FILE:LINE: message} and apply nothing; the PEM bytes travel in the model,
and the OpenSSL contexts are built from them once per distinct value
(L{serverContexts}, L{targetConnections}).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import lru_cache
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IReadDescriptor,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy.model import KeyPair, ServerTLS, TargetTLS

#: C{min_version} values of the map.
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

V = TypeVar("V")


# -- the files ------------------------------------------------------------------


class TLSFileError(Exception):
    """
    A certificate or key file that cannot be used; the message says why in
    a user's words.
    """


def _readFile(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFileError(
            f"cannot read {what} {path}: {(e.strerror or str(e)).lower()}"
        ) from None


def _certificates(pem: bytes, path: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSFileError(f"{path} holds no PEM certificate")
    return certificates


def _privateKey(pem: bytes, path: str):
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise TLSFileError(
            f"key {path} is encrypted; portproxy needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSFileError(f"{path} holds no PEM private key") from None


def _publicBytes(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def readKeyPair(certPath: str, keyPath: str) -> KeyPair:
    """
    Read a certificate file (the leaf first, then its chain) and its key,
    and check that the key is the certificate's.

    @raise TLSFileError: a file is missing, unreadable, not PEM, or the key
        does not match.
    """
    certPem = _readFile(certPath, "certificate")
    keyPem = _readFile(keyPath, "key")
    leaf = _certificates(certPem, certPath)[0]
    key = _privateKey(keyPem, keyPath)
    if _publicBytes(key.public_key()) != _publicBytes(leaf.public_key()):
        raise TLSFileError(f"key {keyPath} does not match certificate {certPath}")
    return KeyPair(certPath, keyPath, certPem, keyPem)


def readAuthorities(path: str) -> bytes:
    """
    Read a file of CA certificates (PEM).

    @raise TLSFileError: it is missing, unreadable or holds no certificate.
    """
    pem = _readFile(path, "CA file")
    _certificates(pem, path)
    return pem


def keyFileWarning(path: str) -> str | None:
    """
    Why key file C{path} deserves a warning (group or others can read it),
    or L{None}.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o044:
        return f"key {path} can be read by group or others (mode {mode & 0o777:o}); chmod 600 it"
    return None


# -- names ------------------------------------------------------------------------


class NameTable(Generic[V]):
    """
    Values by server name: an exact name, or C{*.suffix} for every name
    that ends in C{.suffix} (at any depth).  An exact name wins over a
    suffix, and a longer suffix over a shorter one; names compare without
    case.
    """

    def __init__(self, entries: Iterable[tuple[str, V]]) -> None:
        self._exact: dict[str, V] = {}
        suffixes: dict[str, V] = {}
        for name, value in entries:
            name = name.lower()
            if name.startswith("*."):
                suffixes.setdefault(name[1:], value)
            else:
                self._exact.setdefault(name, value)
        self._suffixes = sorted(suffixes.items(), key=lambda item: -len(item[0]))

    def __bool__(self) -> bool:
        return bool(self._exact or self._suffixes)

    def entries(self) -> list[tuple[str, V]]:
        """
        The entries in the order L{match} tries them: exact names, then
        C{*.suffix} ones, longest first (for the TLS engine's own table).
        """
        return list(self._exact.items()) + [
            ("*" + suffix, value) for suffix, value in self._suffixes
        ]

    def match(self, name: str | None) -> V | None:
        """
        The value for C{name}, or L{None} when no entry matches (or there
        is no name).
        """
        if not name:
            return None
        name = name.lower().rstrip(".")
        found = self._exact.get(name)
        if found is not None:
            return found
        for suffix, value in self._suffixes:
            if name.endswith(suffix):
                return value
        return None


# -- terminating ------------------------------------------------------------------


def _privateCertificate(pair: KeyPair) -> dict:
    """
    C{CertificateOptions} arguments for C{pair}: key, leaf and chain.
    """
    certificates = _certificates(pair.certPem, pair.cert)
    return dict(
        privateKey=crypto.PKey.from_cryptography_key(
            _privateKey(pair.keyPem, pair.key)
        ),
        certificate=crypto.X509.from_cryptography(certificates[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in certificates[1:]],
    )


def _trustRoot(pem: bytes):
    return ssl.trustRootFromCertificates(
        [
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in x509.load_pem_x509_certificates(pem)
        ]
    )


def _noApplicationProtocol(
    connection: SSL.Connection, offered: list[bytes]
) -> SSL._NoOverlappingProtocols:  # the type of pyOpenSSL's "choose none"
    return SSL.NO_OVERLAPPING_PROTOCOLS


class ServerContexts:
    """
    The OpenSSL contexts of one C{tls:} setting: one per certificate, the
    default one choosing among the others by the client's server name.
    """

    def __init__(self, settings: ServerTLS) -> None:
        self.default = self._context(settings, settings.default)
        self.byName = NameTable(
            (name, self._context(settings, pair)) for name, pair in settings.byName
        )
        if self.byName:
            self.default.set_tlsext_servername_callback(self._serverName)

    @staticmethod
    def _context(settings: ServerTLS, pair: KeyPair) -> SSL.Context:
        extra = {}
        if settings.clientCAPem is not None:
            # A trust root makes Twisted require and verify the client's
            # certificate.
            extra["trustRoot"] = _trustRoot(settings.clientCAPem)
        options = ssl.CertificateOptions(
            raiseMinimumTo=VERSIONS[settings.minVersion],
            **_privateCertificate(pair),
            **extra,
        )
        context = options.getContext()
        # The proxy cannot know which application protocols the target
        # speaks, so it selects none (Twisted's own callback would answer a
        # client's ALPN offer with an empty choice, a fatal alert); a
        # client then speaks its default, HTTP/1.1 for HTTP.
        context.set_alpn_select_callback(_noApplicationProtocol)
        return context

    def _serverName(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if name is not None:
            context = self.byName.match(name.decode("ascii", "replace"))
            if context is not None:
                connection.set_context(context)


#: Built once per distinct setting: a range of 1000 ports with one
#: certificate shares one set of contexts, and a reload that changed the
#: files makes a new value, so new contexts.
serverContexts = lru_cache(maxsize=64)(ServerContexts)


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnections:
    """
    Makes the TLS side of each client a listener accepts, from the
    listener's settings at that moment: a reload with new certificates
    changes what the next client gets, and nothing for open connections.
    """

    def __init__(self, service) -> None:
        self.service = service

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(
            serverContexts(self.service.listener.tls.terminate).default, None
        )


class TLSTransport(TLSMemoryBIOProtocol):
    """
    Twisted's TLS transport as the relay needs it: never handed to the
    relay engine, and with a half-close.
    """

    #: L{twistedproxy.tcp.relay.canHandOff} refuses TLS transports: their
    #: bytes on the socket are not the bytes the relay moves.
    TLS = True

    #: Whether the TCP connection under it ended with a FIN (rather than a
    #: reset), known once it is lost.
    closedCleanly = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closedCleanly = reason.check(ConnectionDone) is not None
        TLSMemoryBIOProtocol.connectionLost(self, reason)

    def loseWriteConnection(self) -> None:
        """
        End sending with a TLS close_notify, and keep reading until the
        peer answers with its own (TLS's half-close); a bare TCP FIN under
        TLS would be a truncation.
        """
        self.loseConnection()


def _tlsFactory(creator, isClient: bool, wrapped, reactor) -> TLSMemoryBIOFactory:
    factory = TLSMemoryBIOFactory(creator, isClient, wrapped, clock=reactor)
    factory.protocol = TLSTransport
    return factory


def serverFactory(service, wrapped) -> TLSMemoryBIOFactory:
    """
    Wrap a listener's relay factory so that its clients speak TLS to it.
    """
    return _tlsFactory(ServerConnections(service), False, wrapped, service.reactor)


# -- originating ------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    C{verify: false}: TLS to the target without checking its certificate;
    the server name is still sent.
    """

    def __init__(self, options: ssl.CertificateOptions, name: str) -> None:
        self._context = options.getContext()
        self._name = None if _isAddress(name) else name.encode("idna")

    def clientConnectionForTLS(self, protocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._name is not None:
            connection.set_tlsext_host_name(self._name)
        return connection


def _isAddress(host: str) -> bool:
    return isIPAddress(host) or isIPv6Address(host)


@lru_cache(maxsize=256)
def targetConnections(settings: TargetTLS, host: str):
    """
    The connection creator for TLS to a target reached as C{host} (the
    name in the map, or its address): it sends and checks C{server_name},
    or C{host}.
    """
    name = settings.serverName or host
    extra: dict = {"raiseMinimumTo": VERSIONS[settings.minVersion]}
    if not settings.verify:
        if settings.client is not None:
            extra.update(_privateCertificate(settings.client))
        return _Unverified(ssl.CertificateOptions(verify=False, **extra), name)
    client = None
    if settings.client is not None:
        pair = _privateCertificate(settings.client)
        extra["extraCertChain"] = pair["extraCertChain"]
        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(pair["certificate"]), ssl.KeyPair(pair["privateKey"])
        )
    trust = (
        _trustRoot(settings.caPem)
        if settings.caPem is not None
        else ssl.platformTrust()
    )
    return ssl.optionsForClientTLS(
        name, trustRoot=trust, clientCertificate=client, extraCertificateOptions=extra
    )


def targetFactory(
    settings: TargetTLS, host: str, wrapped, reactor
) -> TLSMemoryBIOFactory:
    """
    Wrap the connector of one dial to C{host} so that the target is
    spoken to in TLS.
    """
    return _tlsFactory(targetConnections(settings, host), True, wrapped, reactor)


# -- what went wrong ----------------------------------------------------------------


def failureText(reason: Failure) -> str:
    """
    A TLS failure in a user's words: the certificate name mismatch
    C{service_identity} found, or OpenSSL's reasons.
    """
    error = reason.value
    if isinstance(error, VerificationError):
        names = []
        for mismatch in error.errors:
            wanted = getattr(mismatch.mismatched_id, "hostname", None) or getattr(
                mismatch.mismatched_id, "ip", mismatch.mismatched_id
            )
            if isinstance(wanted, bytes):
                wanted = wanted.decode("ascii", "replace")
            names.append(str(wanted))
        return f"the target's certificate is not valid for {' or '.join(names)}"
    if isinstance(error, SSL.Error):
        reasons = []
        for item in (
            error.args[0] if error.args and isinstance(error.args[0], list) else ()
        ):
            if isinstance(item, tuple) and item and item[-1] not in reasons:
                reasons.append(item[-1])
        return "; ".join(reasons) or str(error) or "tls error"
    return reason.getErrorMessage()


def endReason(transport, reason: Failure) -> Failure:
    """
    Why a TLS transport's connection ended, as the relay tells it: a peer
    that closed TCP without sending a TLS close_notify first (Python's
    C{ssl} and many servers do) ended cleanly, not with a reset, although
    Twisted reports a lost connection.
    """
    if (
        isTLSTransport(transport)
        and transport.closedCleanly
        and reason.check(ConnectionLost)
        and not reason.check(ConnectionDone)
    ):
        return Failure(ConnectionDone("closed without a TLS close_notify"))
    return reason


def isTLSFailure(reason: Failure) -> bool:
    """
    Whether C{reason} is a failed TLS handshake or certificate check.
    """
    return reason.check(SSL.Error, VerificationError) is not None


class HandshakeFailed(Exception):
    """
    The TLS handshake with a target failed; the message says why.
    """


def isTLSTransport(transport) -> bool:
    """
    Whether C{transport} is one of the proxy's TLS transports.
    """
    return isinstance(transport, TLSTransport)


def peerSubject(transport) -> str | None:
    """
    The subject of the certificate the peer of a TLS transport sent, as
    RFC 4514 text (C{CN=alice,O=Example}), or L{None}.
    """
    try:
        certificate = transport.getPeerCertificate()
    except (AttributeError, SSL.Error):
        return None
    if certificate is None:
        return None
    return certificate.to_cryptography().subject.rfc4514_string()


# -- SNI routing ------------------------------------------------------------------

#: The most of a client's first bytes read for its ClientHello: the
#: largest handshake record and a little.
PEEK_LIMIT = 16 * 1024 + 5 + 4096

#: How long to wait before peeking again at a ClientHello that has not
#: arrived whole (the socket stays readable, so waiting for readability
#: would spin).
PEEK_AGAIN = 0.005

_RECORD_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXTENSION_SERVER_NAME = 0x0000
_HOST_NAME = 0x00


class NotClientHello(ValueError):
    """
    A client's first bytes are not a TLS ClientHello (the message says
    why).
    """


def clientHelloServerName(data: bytes) -> tuple[bool, str | None]:
    """
    Read the server name (SNI) of the ClientHello at the start of C{data},
    which may span several TLS records.

    @return: C{(False, None)} while C{data} does not hold the whole
        ClientHello yet; C{(True, name)} once it does, C{name} being
        L{None} when the client sent none.
    @raise NotClientHello: C{data} does not start a TLS handshake with a
        ClientHello, or it is malformed.
    """
    handshake = b""
    offset = 0
    while True:
        if len(data) - offset < 5:
            return False, None
        kind, major, length = (
            data[offset],
            data[offset + 1],
            struct.unpack_from("!H", data, offset + 3)[0],
        )
        if kind != _RECORD_HANDSHAKE or major != 3:
            raise NotClientHello("not a TLS handshake")
        if length == 0 or length > 16384 + 2048:
            raise NotClientHello("bad TLS record length")
        if len(data) - offset - 5 < length:
            return False, None
        handshake += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                raise NotClientHello("the first handshake message is not a ClientHello")
            size = int.from_bytes(handshake[1:4], "big")
            if size > PEEK_LIMIT:
                raise NotClientHello("ClientHello too large")
            if len(handshake) >= 4 + size:
                return True, _serverName(handshake[4 : 4 + size])


def _serverName(hello: bytes) -> str | None:
    try:
        at = 2 + 32  # version, random
        at += 1 + hello[at]  # session id
        at += 2 + struct.unpack_from("!H", hello, at)[0]  # cipher suites
        at += 1 + hello[at]  # compression methods
        if at == len(hello):
            return None  # no extensions
        end = at + 2 + struct.unpack_from("!H", hello, at)[0]
        at += 2
        if end > len(hello):
            raise NotClientHello("malformed ClientHello")
        while at + 4 <= end:
            kind, length = struct.unpack_from("!HH", hello, at)
            at += 4
            if kind == _EXTENSION_SERVER_NAME:
                listEnd = at + 2 + struct.unpack_from("!H", hello, at)[0]
                at += 2
                while at + 3 <= listEnd:
                    nameType, nameLength = (
                        hello[at],
                        struct.unpack_from("!H", hello, at + 1)[0],
                    )
                    at += 3
                    if nameType == _HOST_NAME:
                        return hello[at : at + nameLength].decode("ascii", "replace")
                    at += nameLength
                return None
            at += length
        return None
    except (IndexError, struct.error):
        raise NotClientHello("malformed ClientHello") from None


@implementer(IReadDescriptor)
class ClientHelloPeek:
    """
    Waits for a client's ClientHello and reads its server name without
    taking a byte off the socket, then calls C{done(name, None)}, or
    C{done(None, problem)} when the client sent something else or closed.

    The client's transport must not be reading meanwhile (the relay pauses
    it): this object watches the same descriptor.
    """

    def __init__(
        self,
        reactor,
        skt: socket.socket,
        done: Callable[[str | None, str | None], None],
    ) -> None:
        self.reactor = reactor
        self._socket = skt
        self._done: Callable | None = done
        self._again = None
        self._reading = False

    def start(self) -> None:
        self._again = None
        self._reading = True
        self.reactor.addReader(self)

    def stop(self) -> None:
        """
        Stop waiting; C{done} is not called.
        """
        self._done = None
        self._unwatch()

    def _unwatch(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)
        again, self._again = self._again, None
        if again is not None and again.active():
            again.cancel()

    def _finish(self, name: str | None, problem: str | None) -> None:
        done, self._done = self._done, None
        self._unwatch()
        if done is not None:
            done(name, problem)

    # -- IReadDescriptor -----------------------------------------------------------

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "portproxy"

    def doRead(self) -> None:
        try:
            data = self._socket.recv(PEEK_LIMIT, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(
                None,
                f"reset by client before its ClientHello ({(e.strerror or str(e)).lower()})",
            )
            return
        if not data:
            self._finish(None, "client closed before its ClientHello")
            return
        try:
            complete, name = clientHelloServerName(data)
        except NotClientHello as e:
            self._finish(None, f"sni_routes: {e}")
            return
        if complete:
            self._finish(name, None)
        elif len(data) >= PEEK_LIMIT:
            self._finish(None, "ClientHello too large")
        else:
            self._unwatch()
            self._again = self.reactor.callLater(PEEK_AGAIN, self.start)

    def connectionLost(self, reason: Failure) -> None:
        self._reading = False
        self._finish(None, "proxy stopped")


class SNIRouter:
    """
    The routes of one listener: for a server name, the listener settings
    with that route's target (the listener's own target when no route
    matches), one value per target so that their access line parts are
    built once.
    """

    def __init__(self, listener) -> None:
        self.default = listener
        byTarget = {listener.target: listener}
        for _, target in listener.tls.sniRoutes:
            if target not in byTarget:
                byTarget[target] = replace(listener, target=target)
        self.routes = NameTable(
            (name, byTarget[t]) for name, t in listener.tls.sniRoutes
        )

    def route(self, name: str | None):
        found = self.routes.match(name)
        return self.default if found is None else found


sniRouter = lru_cache(maxsize=256)(SNIRouter)
