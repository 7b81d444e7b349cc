"""
Unit tests of the manhole (L{twistedproxy.manhole}): who gets in, the host
key, the service's socket, and the shell, with Twisted's fakes.
"""

import os
import pwd
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from support import trustedTmpPath  # noqa: F401 (this module's tmp_path)
from test_admin import FakeProxy, exampleMap
from twisted.conch.insults.insults import ServerProtocol
from twisted.conch.ssh import keys
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.service import SSHService
from twisted.conch.ssh.transport import MSG_EXT_INFO
from twisted.conch.ssh.userauth import SSHUserAuthServer
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from twistedproxy.listener import Notices
from twistedproxy.manhole import (
    AuthorizedKeys,
    HostKeyError,
    ManholeFactory,
    ManholeKeyChecker,
    ManholeService,
    ManholeSession,
    ManholeTransport,
    ProxyManhole,
    fingerprint,
    loadHostKey,
    manholePortal,
)
from twistedproxy.model import Manhole


def newKey():
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def publicLine(key, comment="operator@example"):
    return key.public().toString("openssh", comment=comment.encode()) + b"\n"


def signedCredentials(key, username=b"operator"):
    """
    What an SSH client proves with C{key}: a signature over some data.
    """
    sigData = b"session id and request"
    return SSHPrivateKey(
        username, key.sshType(), key.public().blob(), sigData, key.sign(sigData)
    )


def outcome(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def messages(events):
    return [formatEvent(event) for event in events]


@pytest.fixture
def keyFile(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_bytes(b"")
    path.chmod(0o644)
    return path


def test_checkerAcceptsAListedKeyAndRefusesAnother(keyFile):
    """
    A key listed in authorized_keys logs in (with any user name) and a key
    that is not is refused.
    """
    listed, other = newKey(), newKey()
    keyFile.write_bytes(b"# operators\n\n" + publicLine(listed))
    authorized = AuthorizedKeys(str(keyFile))
    authorized.read()
    checker = ManholeKeyChecker(authorized)
    with capturedLogs() as events:
        assert (
            outcome(checker.requestAvatarId(signedCredentials(listed, b"anyone")))
            == b"anyone"
        )
        refused = outcome(checker.requestAvatarId(signedCredentials(other)))
    assert refused.check(UnauthorizedLogin)
    logged = messages(events)
    assert (
        f"manhole: user anyone logged in with key {fingerprint(listed)} (operator@example)"
        in logged
    )
    assert f"manhole: refused key {fingerprint(other)} for user operator" in logged


def test_checkerRefusesABadSignature(keyFile):
    """
    A listed public key with a signature made by another private key is
    refused.
    """
    listed = newKey()
    keyFile.write_bytes(publicLine(listed))
    authorized = AuthorizedKeys(str(keyFile))
    authorized.read()
    forged = signedCredentials(newKey())
    forged.blob = listed.public().blob()
    assert outcome(ManholeKeyChecker(authorized).requestAvatarId(forged)).check(
        UnauthorizedLogin
    )


def test_checkerRefusesSHA1Signatures(keyFile):
    """
    A listed RSA key is let in with an rsa-sha2-256 signature and refused
    with an ssh-rsa (SHA-1) one.
    """
    listed = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    keyFile.write_bytes(publicLine(listed))
    authorized = AuthorizedKeys(str(keyFile))
    authorized.read()
    checker = ManholeKeyChecker(authorized)

    def signedWith(algorithm):
        sigData = b"session id and request"
        return SSHPrivateKey(
            b"operator",
            algorithm,
            listed.public().blob(),
            sigData,
            listed.sign(sigData, signatureType=algorithm),
        )

    assert outcome(checker.requestAvatarId(signedWith(b"rsa-sha2-256"))) == b"operator"
    assert outcome(checker.requestAvatarId(signedWith(b"ssh-rsa"))).check(
        UnauthorizedLogin
    )


def test_onlyPublicKeyAuthenticationIsOffered(tmp_path, keyFile):
    """
    The portal has a checker for SSH keys and nothing else, so the SSH
    server offers "publickey" only (no password, no keyboard-interactive),
    and its login timeout runs on the injected reactor.
    """
    authorized = AuthorizedKeys(str(keyFile))
    portal = manholePortal(object(), authorized)
    assert portal.listCredentialsInterfaces() == [ISSHPrivateKey]
    clock = Clock()
    factory = ManholeFactory(portal, newKey(), clock, noticesOn(clock))
    transport = factory.buildProtocol(None)
    transport.isEncrypted = lambda direction: True
    server = factory.getService(transport, b"ssh-userauth")()
    server.transport = transport
    server.serviceStarted()
    assert server.supportedAuthentications == [b"publickey"]
    assert [call.getTime() for call in clock.getDelayedCalls()] == [30]
    server.serviceStopped()


def noticesOn(clock) -> Notices:
    notices = Notices()
    notices.reactor = clock
    return notices


def limitedFactory(clock, grace=30.0, startups=10) -> ManholeFactory:
    factory = ManholeFactory(
        manholePortal(object(), AuthorizedKeys("x")), newKey(), clock, noticesOn(clock)
    )
    factory.useLimits(Manhole("127.0.0.1", 2222, "k", "h", False, grace, startups))
    return factory


def accepted(factory, port=50000):
    """
    A manhole connection accepted from 127.0.0.1:C{port}, or L{None} when
    the factory refused it; and its transport.
    """
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    if protocol is None:
        return None, None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    protocol.makeConnection(transport)
    return protocol, transport


class ConnectionService(SSHService):
    name = b"ssh-connection"


class UserAuthenticated(SSHUserAuthServer):
    """
    Twisted's user authentication service once alice has authenticated
    (its login timer is gone).
    """

    user = b"alice"
    _cancelLoginTimeout = None


def test_connectionNotAuthenticatedInTimeIsClosed():
    """
    A connection that has not authenticated login_grace_time after its
    accept is closed, whether or not it sent anything, and that is logged.
    """
    clock = Clock()
    factory = limitedFactory(clock, grace=5)
    protocol, transport = accepted(factory)
    clock.advance(4.9)
    assert not transport.disconnecting
    with capturedLogs() as events:
        clock.advance(0.1)
    assert transport.disconnecting
    assert any(
        "manhole: closed a connection from 127.0.0.1: not authenticated within "
        "login_grace_time 5s" in m
        for m in messages(events)
    )
    protocol.connectionLost(Failure(ConnectionDone()))
    assert factory.unauthenticated == set() and clock.getDelayedCalls() == []


def test_authenticatedConnectionOutlivesTheGraceTime():
    """
    Once a connection has authenticated (its ssh-connection service
    starts) the grace timer is gone and it no longer counts against
    max_startups.
    """
    clock = Clock()
    factory = limitedFactory(clock, grace=5, startups=1)
    protocol, transport = accepted(factory)
    protocol.service = UserAuthenticated()
    protocol.keyBlob = newKey().public().blob()
    protocol.setService(ConnectionService())
    clock.advance(60)
    assert not transport.disconnecting
    assert factory.unauthenticated == set()
    assert accepted(factory, 50001)[0] is not None
    with capturedLogs() as events:
        protocol.connectionLost(Failure(ConnectionDone()))
    assert [m for m in messages(events) if "logged out" in m] == [
        f"manhole: user alice logged out (key {fingerprint(keys.Key.fromString(protocol.keyBlob))})"
    ]


def test_maxStartupsClosesFurtherConnectionsAtOnce():
    """
    While max_startups connections have not authenticated, further ones are
    refused at accept, counted, and logged at most once a second with the
    number left out; a closed one makes room again.
    """
    clock = Clock()
    factory = limitedFactory(clock, startups=3)
    first = [accepted(factory, 50000 + i)[0] for i in range(3)]
    with capturedLogs() as events:
        refused = [accepted(factory, 51000 + i)[0] for i in range(20)]
        clock.advance(1)
        accepted(factory, 52000)
    assert refused == [None] * 20 and factory.refusedStartups == 21
    lines = [m for m in messages(events) if "max_startups" in m]
    assert len(lines) == 2, lines
    assert lines[1].endswith("(and 19 more not logged)")
    first[0].connectionLost(Failure(ConnectionDone()))
    assert accepted(factory, 53000)[0] is not None


def test_missingAuthorizedKeysLetsNoKeyIn(tmp_path):
    """
    A missing authorized_keys file is logged as such and lets no key in.
    """
    path = tmp_path / "nowhere"
    authorized = AuthorizedKeys(str(path))
    with capturedLogs() as events:
        authorized.read()
    assert authorized.getAuthorizedKeys(b"root") == []
    assert any(
        f"cannot read authorized keys {path}: No such file or directory; no key can log in"
        in m
        for m in messages(events)
    )


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_authorizedKeysWritableByOthersLetsNoKeyIn(keyFile, mode):
    """
    An authorized_keys file that other users may write to is refused: no
    key gets in, and the log says how to fix it.
    """
    keyFile.write_bytes(publicLine(newKey()))
    keyFile.chmod(mode)
    authorized = AuthorizedKeys(str(keyFile))
    with capturedLogs() as events:
        authorized.read()
    assert authorized.getAuthorizedKeys(b"root") == []
    assert any(
        f"authorized keys {keyFile}: the file has mode {mode:04o} (writable by group "
        "or others)"
        in m
        and "no key can log in" in m
        for m in messages(events)
    )


NOBODY = pwd.getpwnam("nobody").pw_uid


def test_authorizedKeysOwnedByAnotherUserLetsNoKeyIn(keyFile):
    """
    An authorized_keys owned by another user (nobody), even mode 0644, is
    refused, and the log names the file and its owner.
    """
    keyFile.write_bytes(publicLine(newKey()))
    os.chown(keyFile, NOBODY, -1)
    authorized = AuthorizedKeys(str(keyFile))
    with capturedLogs() as events:
        authorized.read()
    assert authorized.getAuthorizedKeys(b"root") == []
    assert any(
        f"authorized keys {keyFile}: the file is owned by nobody (uid {NOBODY})" in m
        for m in messages(events)
    )


@pytest.mark.parametrize(
    "mode, owner",
    [(0o777, 0), (0o1777, 0), (0o775, 0), (0o755, NOBODY)],
    ids=[
        "world-writable",
        "sticky-world-writable",
        "group-writable",
        "owned-by-nobody",
    ],
)
def test_authorizedKeysInAnUntrustedDirectoryLetsNoKeyIn(tmp_path, mode, owner):
    """
    An authorized_keys whose directory, or any directory above it, another
    user could write to or owns is refused as sshd's StrictModes refuses
    it, a sticky world-writable directory included; the log names the
    directory, its mode or owner.
    """
    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    path = inner / "authorized_keys"
    path.write_bytes(publicLine(newKey()))
    path.chmod(0o600)
    outer.chmod(mode)
    os.chown(outer, owner, -1)
    authorized = AuthorizedKeys(str(path))
    with capturedLogs() as events:
        authorized.read()
    assert authorized.getAuthorizedKeys(b"root") == []
    problem = (
        f"has mode {mode:04o}" if owner == 0 else f"is owned by nobody (uid {NOBODY})"
    )
    assert any(f"directory {outer} {problem}" in m for m in messages(events)), messages(
        events
    )


def test_authorizedKeysFixedThenReadAgainLetsKeysIn(tmp_path):
    """
    Fixing the directory's mode and reading the file again (as a reload
    does) lets the keys in; a symbolic link is judged by its real path.
    """
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    path = shared / "authorized_keys"
    path.write_bytes(publicLine(newKey()))
    link = tmp_path / "keys-link"
    link.symlink_to(path)
    authorized = AuthorizedKeys(str(link))
    authorized.read()
    assert authorized.getAuthorizedKeys(b"root") == []
    shared.chmod(0o755)
    authorized.read()
    assert len(authorized.getAuthorizedKeys(b"root")) == 1


def test_hostKeyOwnedByAnotherUserOrInAnUntrustedDirectoryIsRefused(tmp_path):
    """
    The host key is refused when another user owns it or could write to
    a directory above it, and is not created in such a directory.
    """
    path = tmp_path / "ssh_host_key"
    loadHostKey(str(path))
    os.chown(path, NOBODY, -1)
    with pytest.raises(HostKeyError, match=r"the file is owned by nobody"):
        loadHostKey(str(path))
    os.chown(path, 0, -1)
    tmp_path.chmod(0o1777)
    with pytest.raises(HostKeyError, match=rf"directory {tmp_path} has mode 1777"):
        loadHostKey(str(path))
    with pytest.raises(HostKeyError, match=rf"directory {tmp_path} has mode 1777"):
        loadHostKey(str(tmp_path / "new_host_key"))
    assert not (tmp_path / "new_host_key").exists()


def test_authorizedKeysLinesThatAreNotPlainKeys(keyFile):
    """
    A line with key options or garbage is skipped with its line number;
    the other lines' keys, RSA and ECDSA included, are read.
    """
    ed, ecdsa = newKey(), keys.Key(ec.generate_private_key(ec.SECP256R1()))
    keyFile.write_bytes(
        publicLine(ed)
        + b'from="10.0.0.1" '
        + publicLine(newKey())
        + b"ssh-ed25519 AAAAnotbase64!\n"
        + publicLine(ecdsa, "")
    )
    authorized = AuthorizedKeys(str(keyFile))
    with capturedLogs() as events:
        authorized.read()
    assert authorized.getAuthorizedKeys(b"x") == [ed.public(), ecdsa.public()]
    logged = messages(events)
    assert (
        f"{keyFile}:2: not a key type first (key options are not supported); line skipped"
        in logged
    )
    assert any(m.startswith(f"{keyFile}:3: not a public key (") for m in logged)
    assert f"manhole: 2 authorized key(s) from {keyFile}" in logged


def test_hostKeyIsCreatedPrivateAndReused(tmp_path):
    """
    A missing host key is created as an Ed25519 key with mode 0600, and
    loading it again gives the same key.
    """
    path = tmp_path / "ssh_host_key"
    old = os.umask(0o022)
    try:
        created = loadHostKey(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert created.sshType() == b"ssh-ed25519"
    assert not created.isPublic()
    again = loadHostKey(str(path))
    assert again == created
    assert fingerprint(again) == fingerprint(created)
    assert fingerprint(again).startswith("SHA256:") and not fingerprint(again).endswith(
        "="
    )


def test_hostKeyInAMissingDirectory(tmp_path):
    """
    A host key path whose directory does not exist is a clear error.
    """
    path = tmp_path / "missing" / "ssh_host_key"
    with pytest.raises(HostKeyError) as e:
        loadHostKey(str(path))
    assert str(e.value) == (
        f"host key {path}: directory {tmp_path / 'missing'} does not exist; "
        "create it so the key can be kept there"
    )


def test_hostKeyReadableByOthersIsRefused(tmp_path):
    """
    A host key file other users may read is refused, as sshd does.
    """
    path = tmp_path / "ssh_host_key"
    loadHostKey(str(path))
    path.chmod(0o644)
    with pytest.raises(
        HostKeyError, match=r"mode 0644 lets other users read it; run chmod 600"
    ):
        loadHostKey(str(path))


def test_hostKeyThatIsNotAPrivateKey(tmp_path):
    """
    A host key file holding a public key or garbage is refused.
    """
    path = tmp_path / "ssh_host_key"
    path.write_bytes(publicLine(newKey()))
    path.chmod(0o600)
    with pytest.raises(HostKeyError, match="a public key, a private key is needed"):
        loadHostKey(str(path))
    path.write_bytes(b"hello\n")
    with pytest.raises(HostKeyError, match="not a usable private key"):
        loadHostKey(str(path))


class RecordingReactor(MemoryReactorClock):
    """
    A memory reactor whose listening ports remember being stopped.
    """

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.ports = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = MemoryReactorClock.listenTCP(
            self, port, factory, backlog, interface
        )
        listening.stopped = False
        self.ports.append(listening)

        def stopListening():
            listening.stopped = True

        listening.stopListening = stopListening
        return listening


def settingsIn(tmp_path, port=2222, host="127.0.0.1", hostKey="ssh_host_key"):
    return Manhole(
        host, port, str(tmp_path / "authorized_keys"), str(tmp_path / hostKey)
    )


def test_serviceBindsAndStops(tmp_path, keyFile):
    """
    bind() creates the host key and listens on the configured address;
    stopService() stops listening and disconnects open sessions.
    """
    reactor = RecordingReactor()
    service = ManholeService(settingsIn(tmp_path), object(), reactor)
    assert service.name == "manhole"
    assert not service.bound
    service.bind()
    assert service.bound
    [(port, factory, _, interface)] = reactor.tcpServers
    assert (port, interface) == (2222, "127.0.0.1")
    assert (tmp_path / "ssh_host_key").exists()
    transport = factory.buildProtocol(None)
    wire = StringTransport()
    transport.makeConnection(wire)
    service.startService()
    assert not reactor.ports[0].stopped
    service.stopService()
    assert not service.bound
    assert reactor.ports[0].stopped
    assert wire.disconnecting
    assert not service.running


def test_serviceStartBindsOnce(tmp_path, keyFile):
    """
    privilegedStartService binds when the root has not done so already,
    and not a second time.
    """
    reactor = RecordingReactor()
    service = ManholeService(settingsIn(tmp_path), object(), reactor)
    service.privilegedStartService()
    service.privilegedStartService()
    assert len(reactor.tcpServers) == 1


def test_unusableHostKeyIsACannotListenError(tmp_path, keyFile):
    """
    bind() with a host key it cannot create raises CannotListenError
    naming the address and the reason, and listens on nothing.
    """
    reactor = RecordingReactor()
    settings = settingsIn(tmp_path, hostKey="missing/ssh_host_key")
    service = ManholeService(settings, object(), reactor)
    with pytest.raises(CannotListenError) as e:
        service.bind()
    assert "127.0.0.1:2222" in str(e.value)
    assert "does not exist" in str(e.value)
    assert reactor.tcpServers == []


def test_reconfigureRereadsKeysAndChangesHostKey(tmp_path, keyFile):
    """
    reconfigure() reads authorized_keys again, and loads the host key
    from its new path; a host key it cannot use is logged and the old one
    kept.
    """
    reactor = RecordingReactor()
    settings = settingsIn(tmp_path)
    service = ManholeService(settings, object(), reactor)
    service.bind()
    first = service.factory.hostKey
    operator = newKey()
    keyFile.write_bytes(publicLine(operator))
    service.reconfigure(settings)
    assert service.authorizedKeys.getAuthorizedKeys(b"x") == [operator.public()]
    assert service.factory.hostKey == first

    moved = settingsIn(tmp_path, hostKey="other_host_key")
    service.reconfigure(moved)
    assert service.factory.hostKey != first
    assert service.factory.hostKey == loadHostKey(str(tmp_path / "other_host_key"))

    broken = settingsIn(tmp_path, hostKey="missing/key")
    with capturedLogs() as events:
        service.reconfigure(broken)
    assert service.factory.hostKey == loadHostKey(str(tmp_path / "other_host_key"))
    assert any("keeping the current host key" in m for m in messages(events))


def test_transportOffersCurrentAlgorithmsOnly():
    """
    The SSH server offers no SHA-1 key exchange, no CBC cipher and no
    SHA-1 or MD5 MAC, but the algorithms OpenSSH uses by default.
    """
    assert b"curve25519-sha256" in ManholeTransport.supportedKeyExchanges
    assert not [k for k in ManholeTransport.supportedKeyExchanges if b"sha1" in k]
    assert ManholeTransport.supportedCiphers == [
        b"aes256-ctr",
        b"aes192-ctr",
        b"aes128-ctr",
    ]
    assert ManholeTransport.supportedMACs == [b"hmac-sha2-512", b"hmac-sha2-256"]


def test_serverSigAlgsListsRSASHA2():
    """
    The server-sig-algs extension names rsa-sha2-256/512 and ssh-ed25519,
    so OpenSSH offers RSA and Ed25519 user keys, even with an Ed25519 host
    key.
    """
    clock = Clock()
    factory = ManholeFactory(
        manholePortal(object(), AuthorizedKeys("x")), newKey(), clock, noticesOn(clock)
    )
    transport = factory.buildProtocol(None)
    assert transport.supportedPublicKeys == [b"ssh-ed25519"]
    sent = []
    transport.sendPacket = lambda kind, payload: sent.append((kind, payload))
    transport._peerSupportsExtensions = True
    transport.sendExtInfo([(b"server-sig-algs", b"ssh-ed25519")])
    [(kind, payload)] = sent
    assert kind == MSG_EXT_INFO
    assert NS(b"server-sig-algs") in payload
    value = payload.split(NS(b"server-sig-algs"), 1)[1][4:]
    algorithms = value.split(b",")
    assert {b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-ed25519"} <= set(algorithms)
    assert b"ssh-rsa" not in algorithms and b"ssh-dss" not in algorithms


@pytest.fixture
def shell():
    """
    The manhole shell on a fake terminal, over the example map.
    """
    proxy = FakeProxy(exampleMap(), Clock())
    terminal = ServerProtocol(ProxyManhole, proxy)
    wire = StringTransport()
    terminal.makeConnection(wire)
    terminal.proxy = proxy
    return terminal, wire


def typed(terminal, wire, line):
    wire.clear()
    terminal.dataReceived(line.encode() + b"\r")
    return wire.value().decode()


def test_shellPrintsHelpersOutputToTheTerminal(shell):
    """
    What a helper prints in admin.py shows on the operator's terminal.
    """
    terminal, wire = shell
    assert "help() lists the helpers" in wire.value().decode()
    out = typed(terminal, wire, "status()")
    assert "127.0.0.1:22222" in out
    assert "172.17.0.2:22" in out


def test_shellShowsExceptionsAndKeepsGoing(shell):
    """
    An exception raised by a typed line, SystemExit included, is shown on
    the terminal and the session (and the proxy) carry on.
    """
    terminal, wire = shell
    out = typed(terminal, wire, "1/0")
    assert "ZeroDivisionError: division by zero" in out
    out = typed(terminal, wire, "raise SystemExit(3)")
    assert "SystemExit(3) stopped here: the proxy keeps running" in out
    out = typed(terminal, wire, "kill(99)")
    assert "no open connection or session with id 99" in out
    assert not wire.disconnecting


def test_shellExitEndsTheSessionOnly(shell):
    """
    exit() in the shell closes this session's terminal.
    """
    terminal, wire = shell
    typed(terminal, wire, "exit()")
    assert wire.disconnecting


def test_reloadSummaryArrivesAboveThePrompt(shell):
    """
    A reload that finishes after the line returned writes its summary to
    the terminal and draws the prompt again.
    """
    terminal, wire = shell
    d = Deferred()
    terminal.proxy.reloads.append(d)
    assert "reloading..." in typed(terminal, wire, "reload()")
    wire.clear()
    d.callback(
        "reload of map.yaml: added 0, removed 0, changed 0, unchanged 5, failed 0"
    )
    out = wire.value().decode()
    assert (
        "reload of map.yaml: added 0, removed 0, changed 0, unchanged 5, failed 0"
        in out
    )
    assert out.endswith(">>> ")


def test_sessionFollowsTheWindowAndEndsAtEOF():
    """
    A 0x0 pty (ssh -tt without a terminal) is taken as 80x24, window
    changes reach the shell, and end-of-input closes the session.
    """
    session = ManholeSession(object())
    session.getPty(b"xterm", (0, 0, 0, 0), [])
    assert (session.width, session.height) == (80, 24)

    class Terminal:
        class terminalProtocol:
            pass

        closed = False

        def loseConnection(self):
            self.closed = True

    session.terminal = Terminal()
    sizes = []
    session.terminal.terminalProtocol.terminalSize = lambda w, h: sizes.append((w, h))
    session.windowChanged((50, 132, 0, 0))
    assert sizes == [(132, 50)]
    session.eofReceived()
    assert session.terminal.closed


def test_reloadSummaryAfterTheOperatorLeftIsDropped(shell):
    """
    A reload that finishes after its session closed writes nothing and
    raises nothing.
    """
    terminal, wire = shell
    d = Deferred()
    terminal.proxy.reloads.append(d)
    typed(terminal, wire, "reload()")
    terminal.connectionLost(Failure(ConnectionDone()))
    wire.clear()
    d.callback(
        "reload of map.yaml: added 0, removed 0, changed 0, unchanged 5, failed 0"
    )
    assert wire.value() == b""
