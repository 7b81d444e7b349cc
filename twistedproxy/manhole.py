"""
The SSH manhole: a Python shell inside the running proxy, for its operator.

An SSH server (L{twisted.conch}) that lets in only the public keys listed in
the map's C{authorized_keys} file and serves Twisted's manhole shell (line
editing, history, colours) with the names of L{twistedproxy.admin} in it.
There is no password or keyboard-interactive authentication and no telnet.

Safety rules, because this is a shell running as the proxy's user:

  - The host key file is created with mode 0600 and refused when other
    users may read or write it (like sshd does), so nobody else can pose as
    the manhole.
  - Both files are trusted only as sshd's C{StrictModes} trusts a user's
    C{authorized_keys} (L{checkTrusted}): the file and every directory
    above it up to C{/} owned by root or the proxy's effective user and not
    writable by group or others, with no exception for sticky directories
    such as C{/tmp}.
  - The C{authorized_keys} file is refused (no key is let in) when it is
    not trusted so, missing or unreadable; the reason is logged and fixing
    the file then reloading recovers.  Key options
    (C{from=}, C{command=}...) are refused line by line rather than ignored,
    since ignoring a C{from=} would let in more than the operator wrote.
  - Only current algorithms are offered: curve25519 / ECDH key exchange,
    AES-CTR with HMAC-SHA2; user keys must sign with SHA-2 (no ssh-rsa
    SHA-1 signatures, no DSA).
"""

from __future__ import annotations

import os
import pwd
import stat
from functools import partial

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import Service
from twisted.conch import error as conchError
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults.insults import ServerProtocol
from twisted.conch.interfaces import IConchUser
from twisted.conch.manhole import ColoredManhole, ManholeInterpreter
from twisted.conch.manhole_ssh import TerminalRealm, TerminalSession, TerminalUser
from twisted.conch.ssh import connection, keys, session, userauth
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.transport import (
    DISCONNECT_BY_APPLICATION,
    SSHServerTransport,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import fail
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy import admin
from twistedproxy.listener import Notices
from twistedproxy.model import Manhole

log = Logger(namespace="portproxy")

#: What the manhole's conch objects log through instead of their own
#: loggers: nothing.  Twisted logs every connection's key exchange,
#: services, channel and loss ("kex alg=...", "NEW KEYS", "starting
#: service", "channel open", "connection lost"), some at info level; the
#: manhole writes its own line per login and logout instead (a publisher
#: without observers drops every event).
_conchLog = Logger(observer=LogPublisher())

#: Key exchanges, ciphers and MACs offered (in Twisted's order of
#: preference).  Twisted also implements SHA-1 and CBC variants; a root
#: shell has no client old enough to need them.  Each list is intersected
#: with what this Twisted and cryptography support.
KEY_EXCHANGES = (
    b"mlkem768x25519-sha256",
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)
CIPHERS = (b"aes256-ctr", b"aes192-ctr", b"aes128-ctr")
MACS = (b"hmac-sha2-512", b"hmac-sha2-256")

#: How the key types of an authorized_keys line begin; anything else first
#: on a line is a key option or garbage.
KEY_TYPE_PREFIXES = (b"ssh-", b"ecdsa-", b"sk-")

#: User key signatures refused, as OpenSSH 8.8 and later refuse them: RSA
#: with SHA-1, and DSA.
SHA1_SIGNATURES = (b"ssh-rsa", b"ssh-dss")


class UntrustedFile(Exception):
    """
    A key file that other users could have written; the message says which
    file or directory, its owner and its mode.
    """


def _ownerName(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _untrustedBy(st: os.stat_result, uid: int) -> str | None:
    """
    What makes C{st} untrusted for a process of effective user C{uid}, or
    L{None}.
    """
    if st.st_uid not in (0, uid):
        return f"is owned by {_ownerName(st.st_uid)}"
    if st.st_mode & 0o022:
        return f"has mode {stat.S_IMODE(st.st_mode):04o} (writable by group or others)"
    return None


def checkTrusted(what: str, path: str, fileStat: os.stat_result | None = None) -> None:
    """
    Refuse a key file that someone other than root and this process's
    effective user could have written, as sshd's C{StrictModes} does
    (OpenSSH's C{safe_path()}): the file must be a regular file, and it and
    every directory of its real path up to C{/} owned by root or the
    effective user and not writable by group or others.  Unlike sshd
    (which stops at the user's home directory) the walk always goes to
    C{/}; like sshd, a sticky world-writable directory (C{/tmp}) is refused
    too: anyone may create the name there first.

    @param what: how messages name the file (C{"authorized keys"}).
    @param fileStat: the file's C{fstat}, when it is open already (so the
        file checked is the file read); otherwise it is C{stat}ed.
    @raise UntrustedFile: the first thing that is not trusted.
    """
    uid = os.geteuid()
    st = os.stat(os.path.realpath(path)) if fileStat is None else fileStat
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedFile(f"{what} {path}: not a regular file")
    problem = _untrustedBy(st, uid)
    if problem:
        raise UntrustedFile(
            f"{what} {path}: the file {problem}; it must be owned by root or "
            f"{_ownerName(uid)} and not writable by group or others"
        )
    checkDirectories(what, path)


def checkDirectories(what: str, path: str) -> None:
    """
    The directory half of L{checkTrusted}: every directory above C{path}'s
    real path, up to C{/}.

    @raise UntrustedFile: the first directory that is not trusted.
    """
    uid = os.geteuid()
    directory = os.path.realpath(path)
    while directory != "/":
        directory = os.path.dirname(directory)
        problem = _untrustedBy(os.stat(directory), uid)
        if problem:
            raise UntrustedFile(
                f"{what} {path}: directory {directory} {problem}; every "
                f"directory above the file must be owned by root or "
                f"{_ownerName(uid)} and not writable by group or others"
            )


class HostKeyError(Exception):
    """
    The host key file cannot be used; the message says why and where.
    """


def fingerprint(key: keys.Key) -> str:
    """
    The key's fingerprint as OpenSSH prints it (C{SHA256:...}).
    """
    digest = key.fingerprint(format=keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + digest.rstrip("=")


def loadHostKey(path: str) -> keys.Key:
    """
    The manhole's private host key, read from C{path}; when there is no
    file there, a new Ed25519 key written there with mode 0600.

    @raise HostKeyError: the directory is missing, the file is not a
        private key, others may read or write it, or it cannot be read or
        written.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _createHostKey(path)
    except OSError as e:
        raise HostKeyError(f"host key {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        fileStat = os.fstat(f.fileno())
        try:
            checkTrusted("host key", path, fileStat)
        except (UntrustedFile, OSError) as e:
            raise HostKeyError(str(e)) from None
        mode = fileStat.st_mode
        if mode & 0o077:
            raise HostKeyError(
                f"host key {path}: mode {stat.S_IMODE(mode):04o} lets other "
                f"users read it; run chmod 600 {path}"
            )
        data = f.read()
    try:
        key = keys.Key.fromString(data)
    except (keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
        raise HostKeyError(f"host key {path}: not a usable private key ({e})") from None
    if key.isPublic():
        raise HostKeyError(f"host key {path}: a public key, a private key is needed")
    if key.type() == "DSA":
        raise HostKeyError(
            f"host key {path}: a DSA key, which OpenSSH clients refuse; "
            "remove it to get a new Ed25519 key"
        )
    return key


def _createHostKey(path: str) -> keys.Key:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise HostKeyError(
            f"host key {path}: directory {directory} does not exist; "
            "create it so the key can be kept there"
        )
    try:
        checkDirectories("host key", path)
    except UntrustedFile as e:
        raise HostKeyError(str(e)) from None
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    try:
        # O_EXCL: never write through a file or link someone put there since.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise HostKeyError(f"host key {path}: cannot create it: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        # The umask may only have narrowed 0600; make it exactly that.
        os.fchmod(f.fileno(), 0o600)
        f.write(key.toString("openssh"))
    log.info(
        "manhole: created host key {path} ({fingerprint})",
        path=path,
        fingerprint=fingerprint(key),
    )
    return key


@implementer(IAuthorizedKeysDB)
class AuthorizedKeys:
    """
    The public keys let into the manhole, read from an OpenSSH
    C{authorized_keys} file by L{read} and kept until the next L{read}; the
    SSH user name does not matter.

    @ivar keys: the keys and their comments, as C{(Key, str)} pairs.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys: tuple[tuple[keys.Key, str], ...] = ()

    def read(self) -> None:
        """
        Read the file again.  A file that is missing, unreadable or
        that other users could have written (L{checkTrusted}) lets no key
        in; a line that is not a plain
        public key is skipped.  Either is logged with its place.
        """
        try:
            found = tuple(self._parse())
        except OSError as e:
            log.error(
                "manhole: cannot read authorized keys {path}: {reason}; "
                "no key can log in",
                path=self.path,
                reason=e.strerror,
            )
            found = ()
        except UntrustedFile as e:
            log.error("manhole: {reason}; no key can log in", reason=str(e))
            found = ()
        self.keys = found
        log.info(
            "manhole: {count} authorized key(s) from {path}",
            count=len(found),
            path=self.path,
        )

    def _parse(self):
        with open(self.path, "rb") as f:
            checkTrusted("authorized keys", self.path, os.fstat(f.fileno()))
            lines = f.read().splitlines()
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            fields = line.split(None, 2)
            try:
                key = keys.Key.fromString(b" ".join(fields[:2]))
                if not key.isPublic():
                    raise keys.BadKeyError("a private key")
            except Exception as e:
                if not fields[0].startswith(KEY_TYPE_PREFIXES):
                    reason = "not a key type first (key options are not supported)"
                else:
                    reason = f"not a public key ({e})"
                log.error(
                    "{path}:{line}: {reason}; line skipped",
                    path=self.path,
                    line=number,
                    reason=reason,
                )
                continue
            comment = fields[2].decode("utf-8", "replace") if len(fields) > 2 else ""
            yield key, comment

    def getAuthorizedKeys(self, username: bytes):
        return [key for key, comment in self.keys]

    def describe(self, key: keys.Key) -> str:
        """
        The key's fingerprint, and its comment when it is listed.
        """
        for listed, comment in self.keys:
            if listed == key and comment:
                return f"{fingerprint(key)} ({comment})"
        return fingerprint(key)


class ManholeKeyChecker(SSHPublicKeyChecker):
    """
    Public-key checking against L{AuthorizedKeys} that logs who got in and
    which keys were refused.
    """

    def __init__(self, authorizedKeys: AuthorizedKeys) -> None:
        SSHPublicKeyChecker.__init__(self, authorizedKeys)
        self.authorizedKeys = authorizedKeys

    def requestAvatarId(self, credentials):
        if credentials.algName in SHA1_SIGNATURES:
            d = fail(
                UnauthorizedLogin(f"{credentials.algName!r} signatures are refused")
            )
        else:
            d = SSHPublicKeyChecker.requestAvatarId(self, credentials)

        def accepted(avatarId):
            log.info(
                "manhole: user {user} logged in with key {key}",
                user=credentials.username.decode("utf-8", "replace"),
                key=self.authorizedKeys.describe(keys.Key.fromString(credentials.blob)),
            )
            return avatarId

        def refused(failure):
            # ValidPublicKey only says "send a signature now".
            if failure.check(UnauthorizedLogin) and not failure.check(
                conchError.ValidPublicKey
            ):
                log.info(
                    "manhole: refused key {key} for user {user}",
                    user=credentials.username.decode("utf-8", "replace"),
                    key=fingerprint(keys.Key.fromString(credentials.blob)),
                )
            return failure

        d.addCallbacks(accepted, refused)
        return d


class ManholeInterpreterWithExit(ManholeInterpreter):
    """
    The manhole's interpreter, except that C{SystemExit} raised by what the
    operator typed is shown like any other exception instead of escaping
    into the SSH connection.
    """

    def runcode(self, *a, **kw):
        try:
            ManholeInterpreter.runcode(self, *a, **kw)
        except SystemExit as e:
            self.write(
                f"SystemExit({e.code!r}) stopped here: the proxy keeps running; "
                "exit() or Ctrl-D ends this session\n"
            )


class ProxyManhole(ColoredManhole):
    """
    Twisted's manhole shell with the L{admin.Console} names, a greeting,
    and C{exit()} / C{quit()} ending the session (not the proxy).
    """

    connected = False

    def __init__(self, proxy) -> None:
        ColoredManhole.__init__(self)
        self.proxy = proxy

    def connectionMade(self) -> None:
        self.connected = True
        console = admin.Console(self.proxy, self.writeLater)
        self.namespace = console.namespace()
        self.namespace["exit"] = self.namespace["quit"] = self.endSession
        ColoredManhole.connectionMade(self)
        self.interpreter = ManholeInterpreterWithExit(self, self.namespace)

    def initializeScreen(self) -> None:
        self.terminal.reset()
        self.terminal.write(
            b"portproxy manhole. help() lists the helpers: status(), "
            b"connections(), kill(id),\ndisable(name), enable(name), "
            b"reload(), proxy. Ctrl-D or exit() leaves.\n"
        )
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def writeLater(self, text: str) -> None:
        """
        Show C{text} above the prompt, after the line that asked for it has
        finished; drop it when the operator has left meanwhile.
        """
        if self.connected:
            self.addOutput(text + "\n", isAsync=True)

    def connectionLost(self, reason) -> None:
        self.connected = False
        ColoredManhole.connectionLost(self, reason)

    def endSession(self, status=None) -> None:
        """End this manhole session; the proxy keeps running."""
        # status: exit(1) and quit(0) work as at any Python prompt.
        self.terminal.loseConnection()


class ManholeSession(TerminalSession):
    """
    A shell session with a terminal: no commands, window resizes followed,
    and end-of-input from the client ending the session.
    """

    terminal = None
    # Without a pty request (ssh -T) the shell still needs a size.
    width = 80
    height = 24

    def getPty(self, term, windowSize, attrs) -> None:
        # A client without a terminal of its own (ssh -tt < file) reports
        # 0x0; recvline needs a real width to draw its line.
        rows, columns = windowSize[:2]
        self.height = rows or 24
        self.width = columns or 80

    def openShell(self, proto) -> None:
        self.terminal = self.chainedProtocolFactory()
        self.transportFactory(
            proto, self.terminal, IConchUser(self.original), self.width, self.height
        )

    def execCommand(self, proto, cmd):
        raise conchError.ConchError("the manhole runs no commands; use a shell")

    def windowChanged(self, newWindowSize) -> None:
        rows, columns = newWindowSize[:2]
        if self.terminal is not None and self.terminal.terminalProtocol is not None:
            self.terminal.terminalProtocol.terminalSize(columns or 80, rows or 24)

    def eofReceived(self) -> None:
        if self.terminal is not None:
            self.terminal.loseConnection()


#: The signature algorithms a user key may use, announced as RFC 8308's
#: server-sig-algs: what Twisted verifies, less the SHA-1 ones.
USER_KEY_ALGORITHMS = [
    a for a in SSHServerTransport.supportedPublicKeys if a not in SHA1_SIGNATURES
]


class ManholeTransport(SSHServerTransport):
    """
    The server side of one SSH connection to the manhole.

    @ivar user: the user name once authenticated, else L{None}.
    @ivar keyBlob: the public key the client last offered.
    """

    _log = _conchLog
    factory: ManholeFactory
    user: str | None = None
    keyBlob: bytes | None = None

    supportedKeyExchanges = [
        k for k in SSHServerTransport.supportedKeyExchanges if k in KEY_EXCHANGES
    ]
    supportedCiphers = [c for c in SSHServerTransport.supportedCiphers if c in CIPHERS]
    supportedMACs = [m for m in SSHServerTransport.supportedMACs if m in MACS]

    def sendExtInfo(self, extensions) -> None:
        # Twisted announces the host key's own algorithms as the
        # server-sig-algs that user keys may sign with; OpenSSH would then
        # not offer an RSA user key at all (ssh-rsa is off by default).
        # Announce every algorithm the checker can verify instead.
        extensions = [
            (
                name,
                b",".join(USER_KEY_ALGORITHMS) if name == b"server-sig-algs" else value,
            )
            for name, value in extensions
        ]
        SSHServerTransport.sendExtInfo(self, extensions)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # A client saying goodbye is how every session ends, not an error.
        if reasonCode == DISCONNECT_BY_APPLICATION:
            return
        SSHServerTransport.receiveError(self, reasonCode, description)

    #: Closes the connection when it has not authenticated in time.
    _graceTimer = None

    def connectionMade(self) -> None:
        SSHServerTransport.connectionMade(self)
        self._graceTimer = self.factory.reactor.callLater(
            self.factory.loginGraceTime, self._graceExpired
        )

    def setService(self, service) -> None:
        # ssh-connection is only started once the user has authenticated,
        # by the user authentication service, which knows the user.
        if service.name == b"ssh-connection":
            self._cancelGrace()
            assert isinstance(self.service, userauth.SSHUserAuthServer)
            user = self.service.user
            assert user is not None
            self.user = user.decode("utf-8", "replace")
            self.factory.authenticated(self)
        SSHServerTransport.setService(self, service)

    def _graceExpired(self) -> None:
        self._graceTimer = None
        self.factory.graceExpired(self)
        assert self.transport is not None
        self.transport.loseConnection()

    def _cancelGrace(self) -> None:
        timer, self._graceTimer = self._graceTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancelGrace()
        if self.user is not None:
            log.info(
                "manhole: user {user} logged out (key {key})",
                user=self.user,
                key=fingerprint(keys.Key.fromString(self.keyBlob)),
            )
        SSHServerTransport.connectionLost(self, reason)
        self.factory.sessions.discard(self)
        self.factory.unauthenticated.discard(self)


class ManholeUserAuth(userauth.SSHUserAuthServer):
    """
    Twisted's user authentication service, quiet, remembering the key a
    client offers for the logout line.
    """

    _log = _conchLog
    transport: ManholeTransport | None

    def auth_publickey(self, packet: bytes):
        # hasSig (one byte), algorithm name, key blob, ...
        assert self.transport is not None
        self.transport.keyBlob = getNS(packet[1:], 2)[1]
        return userauth.SSHUserAuthServer.auth_publickey(self, packet)


class ManholeConnection(connection.SSHConnection):
    """
    Twisted's connection service, quiet.
    """

    _log = _conchLog


class ManholeChannel(session.SSHSession):
    """
    Twisted's session channel, quiet (it logs "channel open" and
    "requesting shell" per session).
    """

    _log = _conchLog

    def request_shell(self, data: bytes) -> int:
        # Twisted's own logs the request, then does this.
        return self._shellOrCommand(
            prepare=lambda: True,
            complete=lambda pp, ignored: self._session.openShell(pp),
        )


class ManholeUser(TerminalUser):
    """
    The avatar of a logged-in operator: sessions are L{ManholeChannel}s.
    """

    def __init__(self, original, avatarId) -> None:
        TerminalUser.__init__(self, original, avatarId)
        self.channelLookup[b"session"] = ManholeChannel


def _peerHost(transport: ManholeTransport) -> str:
    """
    The client address of a manhole connection.
    """
    assert transport.transport is not None
    peer = transport.transport.getPeer()
    # The manhole listens on TCP only.
    assert isinstance(peer, IPv4Address | IPv6Address)
    return peer.host


class ManholeFactory(SSHFactory):
    """
    Builds L{ManholeTransport}s with one host key, and keeps them so the
    manhole can close them when it stops; applies the pre-authentication
    limits, as sshd's C{LoginGraceTime} and C{MaxStartups} (without the
    random early drop): a connection that has not authenticated
    L{loginGraceTime} seconds after its accept is closed, and while
    L{maxStartups} connections are unauthenticated a new one is closed at
    accept (counted in L{refusedStartups}, logged at a bounded rate).

    @ivar sessions: the open SSH connections.
    @ivar unauthenticated: the connections that have not authenticated yet.
    """

    loginGraceTime = 30.0
    maxStartups = 10

    # The offered key exchanges use no Diffie-Hellman group file.
    primes = None
    # ManholeService logs the one line that matters.
    noisy = False

    def __init__(
        self, portal: Portal, hostKey: keys.Key, reactor: IReactorTime, notices: Notices
    ) -> None:
        self.portal = portal
        self.reactor = reactor
        self.notices = notices
        self.sessions: set[ManholeTransport] = set()
        self.unauthenticated: set[ManholeTransport] = set()
        self.refusedStartups = 0
        self.useHostKey(hostKey)

    def useLimits(self, settings: Manhole) -> None:
        """
        Apply C{settings}' pre-authentication limits to connections
        accepted from now on.
        """
        self.loginGraceTime = settings.loginGraceTime
        self.maxStartups = settings.maxStartups

    def useHostKey(self, hostKey: keys.Key) -> None:
        """
        Offer C{hostKey} to connections made from now on.
        """
        self.hostKey = hostKey
        self.privateKeys = {hostKey.sshType(): hostKey}
        self.publicKeys = {hostKey.sshType(): hostKey.public()}

    # Twisted's SSHFactory types buildProtocol as always building a
    # transport; IProtocolFactory allows None, which the port answers by
    # closing the accepted socket, and that is what refusing needs.
    def buildProtocol(self, addr) -> ManholeTransport | None:  # type: ignore[override]
        if self.maxStartups and len(self.unauthenticated) >= self.maxStartups:
            # None: Twisted closes the accepted socket at once.
            self.refusedStartups += 1
            self.notices.notice(
                "startups",
                "manhole: closed a connection from {client}: {count} connections "
                "have not authenticated yet (max_startups); {refused} closed so far",
                client=addr.host,
                count=len(self.unauthenticated),
                refused=self.refusedStartups,
            )
            return None
        transport = ManholeTransport()
        transport.factory = self
        transport.supportedPublicKeys = self.hostKey.supportedSignatureAlgorithms()
        self.sessions.add(transport)
        self.unauthenticated.add(transport)
        return transport

    def authenticated(self, transport: ManholeTransport) -> None:
        self.unauthenticated.discard(transport)

    def graceExpired(self, transport: ManholeTransport) -> None:
        self.notices.notice(
            "grace",
            "manhole: closed a connection from {client}: not authenticated within "
            "login_grace_time {grace:g}s",
            client=_peerHost(transport),
            grace=self.loginGraceTime,
        )

    def getService(self, transport, service):
        serviceClass = SSHFactory.getService(self, transport, service)
        if serviceClass is userauth.SSHUserAuthServer:
            return self._userAuth
        if serviceClass is connection.SSHConnection:
            return ManholeConnection
        return serviceClass

    def _userAuth(self) -> userauth.SSHUserAuthServer:
        server = ManholeUserAuth()
        server.clock = self.reactor
        # The grace timer from accept ends the connection first.  (Twisted
        # infers int from its default; callLater takes any float.)
        server.loginTimeout = self.loginGraceTime  # type: ignore[assignment]
        return server

    def dropSessions(self) -> None:
        """
        Disconnect every open SSH connection.
        """
        for transport in list(self.sessions):
            transport.sendDisconnect(DISCONNECT_BY_APPLICATION, b"manhole stopped")


def manholePortal(proxy, authorizedKeys: AuthorizedKeys) -> Portal:
    """
    A portal that lets in the keys of C{authorizedKeys}, and nothing else,
    to a shell on C{proxy}.
    """
    return Portal(ManholeRealm(proxy), [ManholeKeyChecker(authorizedKeys)])


@implementer(IRealm)
class ManholeRealm(TerminalRealm):
    """
    Twisted's terminal realm (which provides L{IRealm} without declaring
    it) with the manhole's users, sessions and shell on C{proxy}.
    """

    userFactory = ManholeUser
    sessionFactory = ManholeSession

    def __init__(self, proxy) -> None:
        TerminalRealm.__init__(self)
        # Twisted infers the type of this factory from its default, the
        # class ServerProtocol; any callable returning one will do.
        self.chainedProtocolFactory = partial(  # type: ignore[assignment]
            ServerProtocol, ProxyManhole, proxy
        )


class ManholeService(Service, Notices):
    """
    The manhole's listening socket, as the root service's child named
    C{"manhole"}.

    @ivar settings: the map's current L{Manhole} section.
    """

    name = "manhole"

    def __init__(self, settings: Manhole, proxy, reactor) -> None:
        Notices.__init__(self)
        self.settings = settings
        self.proxy = proxy
        self.reactor = reactor
        self.authorizedKeys = AuthorizedKeys(settings.authorizedKeys)
        self.factory: ManholeFactory | None = None
        self._hostKeyPath: str | None = None
        self._port = None

    @property
    def bound(self) -> bool:
        return self._port is not None

    def bind(self) -> None:
        """
        Load (or create) the host key, read the authorized keys and listen.

        @raise CannotListenError: the address cannot be bound or the host
            key cannot be used.
        """
        try:
            hostKey = loadHostKey(self.settings.hostKey)
        except HostKeyError as e:
            raise CannotListenError(self.settings.host, self.settings.port, e) from None
        self._hostKeyPath = self.settings.hostKey
        self.authorizedKeys.read()
        self.factory = ManholeFactory(
            manholePortal(self.proxy, self.authorizedKeys), hostKey, self.reactor, self
        )
        self.factory.useLimits(self.settings)
        self._port = self.reactor.listenTCP(
            self.settings.port, self.factory, interface=self.settings.host
        )
        log.info(
            "manhole listening on {listen}, host key {fingerprint}",
            listen=self.settings.listen,
            fingerprint=fingerprint(hostKey),
        )

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if not self.bound:
            self.bind()

    def stopService(self):
        """
        Stop listening and disconnect the open sessions.
        """
        Service.stopService(self)
        port, self._port = self._port, None
        if self.factory is not None:
            self.factory.dropSessions()
        if port is not None:
            return port.stopListening()
        return None

    def reconfigure(self, settings: Manhole) -> None:
        """
        Read the authorized keys again (from C{settings}' file), and load
        the host key again when its path changed; a host key that cannot
        be used is logged and the current one kept.  Open sessions stay.
        """
        self.settings = settings
        self.authorizedKeys.path = settings.authorizedKeys
        self.authorizedKeys.read()
        if self.factory is not None:
            self.factory.useLimits(settings)
        if self.factory is None or settings.hostKey == self._hostKeyPath:
            return
        try:
            hostKey = loadHostKey(settings.hostKey)
        except HostKeyError as e:
            log.error("manhole: {reason}; keeping the current host key", reason=str(e))
            return
        self.factory.useHostKey(hostKey)
        self._hostKeyPath = settings.hostKey
        log.info(
            "manhole: host key now {path} ({fingerprint})",
            path=settings.hostKey,
            fingerprint=fingerprint(hostKey),
        )
