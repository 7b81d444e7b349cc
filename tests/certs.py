"""
What the TLS tests need: certificates they make for themselves (ECDSA
P-256 CAs, server certificates with subject alternative names, client
certificates, written as PEM files), a TLS echo target, and a Python
C{ssl} client.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import TCPEchoServer


def _name(commonName: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "portproxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, commonName),
        ]
    )


class Authority:
    """
    A test CA that issues server and client certificates into C{directory}.
    """

    def __init__(self, directory: Path, name: str = "test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        stem = name.replace(" ", "-")
        self.path = self.directory / f"{stem}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        commonName: str,
        names: tuple[str, ...] = (),
        client: bool = False,
    ) -> tuple[Path, Path]:
        """
        A certificate for C{names} (DNS names or IP addresses) signed by
        this CA, written as C{stem.pem} (leaf then the CA: a chain) and
        C{stem.key} (mode 0600).

        @return: the certificate and key paths.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(commonName))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        ExtendedKeyUsageOID.CLIENT_AUTH
                        if client
                        else ExtendedKeyUsageOID.SERVER_AUTH
                    ]
                ),
                critical=False,
            )
        )
        if names:
            entries = []
            for name in names:
                try:
                    entries.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    entries.append(x509.DNSName(name))
            builder = builder.add_extension(
                x509.SubjectAlternativeName(entries), critical=False
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        certPath = self.directory / f"{stem}.pem"
        keyPath = self.directory / f"{stem}.key"
        certPath.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + self.certificate.public_bytes(serialization.Encoding.PEM)
        )
        keyPath.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(keyPath, 0o600)
        return certPath, keyPath


class TLSEchoServer(TCPEchoServer):
    """
    A threaded TLS echo server on loopback, for a target: it presents
    C{certPath}, asks for a client certificate when C{clientCA} is given,
    and records the subject of each client certificate in C{clients}.
    """

    def __init__(
        self, certPath, keyPath, clientCA=None, host: str = "127.0.0.1"
    ) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certPath), str(keyPath))
        if clientCA is not None:
            self.context.load_verify_locations(str(clientCA))
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.clients: list = []
        self.errors: list[str] = []
        TCPEchoServer.__init__(self, host)

    def _echo(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tlsConn:
                peer = tlsConn.getpeercert()
                if peer:
                    self.clients.append(dict(item[0] for item in peer["subject"]))
                while data := tlsConn.recv(65536):
                    tlsConn.sendall(data)
        except (OSError, ssl.SSLError) as e:
            self.errors.append(str(e))


def tlsConnect(
    port: int, serverName: str, caPath, client=None, host: str = "127.0.0.1"
) -> ssl.SSLSocket:
    """
    A TLS connection to C{host:port} with Python's C{ssl}, checking the
    server's certificate against C{caPath} for C{serverName}; C{client}
    is a C{(cert, key)} pair to present.
    """
    context = ssl.create_default_context(cafile=str(caPath))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    conn = socket.create_connection((host, port), timeout=10.0)
    try:
        return context.wrap_socket(conn, server_hostname=serverName)
    except BaseException:
        conn.close()
        raise


def peerCommonName(conn: ssl.SSLSocket) -> str:
    """
    The common name of the certificate the server of C{conn} presented.
    """
    return dict(item[0] for item in conn.getpeercert()["subject"])["commonName"]
