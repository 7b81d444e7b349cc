"""
The map file: YAML text in, a frozen L{twistedproxy.model.ProxyMap} out.

Every rule of the map (docs/MAP.md) is checked before anything is returned,
and every mistake is reported at once as C{FILE:LINE: message}, so that a
user fixes a map in one round and a reload applies either a whole valid map
or nothing.  The YAML is read with C{yaml.compose}, not C{safe_load}: the
node tree keeps the line of every key and value, and shows the duplicate
keys that C{safe_load} silently folds into one.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Optional

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from twistedproxy import tls, transparency
from twistedproxy.access import parseNetwork
from twistedproxy.model import (
    ANY_IPV4,
    ANY_IPV6,
    CLIENT_ADDRESS_MODES,
    OPEN,
    PROTOCOLS,
    PROXY_PROTOCOL_V1,
    Control,
    TCP,
    UDP,
    AccessPolicy,
    ClientIdentity,
    KeyPair,
    Listener,
    ListenerKey,
    LOG_FORMATS,
    Http,
    Manhole,
    Mapping,
    ProxyMap,
    Rate,
    ServerTLS,
    Target,
    TargetTLS,
    Timeouts,
    TLSSettings,
    formatHostPort,
)

TOP_KEYS = ("defaults", "mappings", "manhole", "http", "log_format", "control")
SETTING_KEYS = ("connect_timeout", "idle_timeout", "udp_timeout", "max_connections")
#: Who the client is and how the target learns it (model.ClientIdentity).
IDENTITY_KEYS = ("client_address", "accept_proxy_protocol")
#: Who may connect (twistedproxy.access); settings like the others.
ACCESS_KEYS = (
    "allow",
    "deny",
    "max_connections_per_client",
    "new_connections_per_client",
    "datagrams_per_client",
)
PER_CLIENT_KEYS = ACCESS_KEYS[2:]
SETTING_KEYS += IDENTITY_KEYS + ACCESS_KEYS
TLS_MAPPING_KEYS = ("tls", "target_tls", "sni_routes")
MAPPING_KEYS = ("name", "proto", "listen", "target") + SETTING_KEYS + TLS_MAPPING_KEYS
TLS_KEYS = ("cert", "key", "sni", "client_ca", "min_version")
TARGET_TLS_KEYS = ("ca", "server_name", "verify", "cert", "key", "min_version")
MANHOLE_KEYS = (
    "listen", "authorized_keys", "host_key", "allow_remote", "login_grace_time", "max_startups",
)
HTTP_KEYS = ("listen", "allow_remote")

#: Where the HTTP endpoint listens when the section gives no C{listen}.
HTTP_LISTEN = "127.0.0.1:9180"
CONTROL_KEYS = ("socket", "mode")

#: The longest path a unix socket address holds (C{sun_path} less its NUL).
UNIX_PATH_MAX = 107

#: Where the manhole listens when its C{listen} gives only a port.
MANHOLE_HOST = "127.0.0.1"

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PORTS = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Host name labels: letters, digits and '-' as RFC 1123 says, and '_' too,
# because Docker's embedded DNS answers for container and Compose service
# names such as "my_db".
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")

_LISTEN_FORM = "[HOST:]PORT or [HOST:]FIRST-LAST"
_DURATION_FORMS = "seconds as a number, or a number with ms, s, m or h: 250ms, 5s, 2m, 1h"
_RATE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)/s")
_RATE_FORMS = "N/s, as in 20/s, or {rate: N/s, burst: B}"

#: What a rate of 0 (no limit) reads as, told apart from a bad value.
_UNLIMITED = object()

# Only its scalar constructors are used; they keep no state between calls.
_scalars = SafeConstructor()


class ConfigError(Exception):
    """
    A map file that cannot be used.

    @ivar errors: every problem found, each a line C{FILE:LINE: message}
        (or C{FILE: message} when the file cannot be read at all).
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)


def loadMap(path: str) -> ProxyMap:
    """
    Read and check the map file at C{path}.

    @raise ConfigError: the file cannot be read, is not YAML, or breaks a
        rule of the map; the error lists every problem.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            [f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})"]
        ) from None
    return parseMap(text, path)


def parseMap(text: str, path: str) -> ProxyMap:
    """
    Check the map in C{text}; C{path} names it in messages and in the
    result, and relative manhole paths are resolved against its directory.

    @raise ConfigError: the text is not YAML or breaks a rule of the map;
        the error lists every problem.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        raise ConfigError([f"{path}:{_yamlErrorLine(e)}: {_yamlErrorMessage(e)}"]) from None
    except yaml.reader.ReaderError as e:
        # The reader rejects control characters before any mark exists.
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(
            [f"{path}:{line}: not valid YAML: character #x{e.character:04x} is not allowed"]
        ) from None
    except RecursionError:
        # PyYAML's composer recurses once per level of nesting.
        raise ConfigError([f"{path}:1: not valid YAML: nested too deeply"]) from None
    return _MapReader(path).read(root)


def _yamlErrorLine(e: yaml.MarkedYAMLError) -> int:
    mark = e.problem_mark or e.context_mark
    return mark.line + 1 if mark is not None else 1


def _yamlErrorMessage(e: yaml.MarkedYAMLError) -> str:
    if e.problem and "'\\t'" in e.problem:
        return "not valid YAML: a tab where YAML expects spaces (indent with spaces only)"
    if e.problem and e.context and e.problem.startswith("but "):
        # "expected a single document in the stream" / "but found another document"
        return f"not valid YAML: {e.context}, {e.problem}"
    message = f"not valid YAML: {e.problem or e.context}"
    if e.problem and e.context and e.context_mark is not None:
        message += f" ({e.context} on line {e.context_mark.line + 1})"
    elif e.problem and e.context:
        message += f" ({e.context})"
    return message


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _describe(node: Node) -> str:
    """
    Say what kind of YAML value C{node} is, for "expected X, got Y".
    """
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return {
        _STR: "a string",
        _INT: "an integer",
        _FLOAT: "a number",
        _BOOL: "a boolean",
        _NULL: "no value",
    }.get(node.tag, f"a value tagged {node.tag}")


def _isLoopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _isAddressLiteral(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _overlaps(a: str, b: str) -> bool:
    """
    Whether sockets bound to hosts C{a} and C{b} (normalized IP literals)
    on one protocol and port would collide: the same address, or a
    wildcard and an address of its family.  Listeners set C{IPV6_V6ONLY},
    so C{0.0.0.0} and C{::} do not collide.
    """
    if a == b:
        return True
    if ANY_IPV4 in (a, b):
        return ":" not in a and ":" not in b
    if ANY_IPV6 in (a, b):
        return ":" in a and ":" in b
    return False


@dataclass
class _Ports:
    """
    A port or a range of ports as written in C{listen} or C{target}.
    """

    first: int
    last: int
    text: str

    def __len__(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class _Settings:
    """
    The settings C{defaults} gives and a mapping may override.
    """

    timeouts: Timeouts = Timeouts()
    maxConnections: int = 0
    identity: ClientIdentity = ClientIdentity()
    #: where client_address was given, for the errors of its value
    clientAddressLine: int = field(default=0, compare=False)
    access: AccessPolicy = OPEN


@dataclass
class _Entry:
    """
    What the reader learned of one mapping, even a broken one: enough to
    check overlaps with the mappings around it.
    """

    index: int
    line: int
    name: Optional[str] = None
    listenLine: int = 0
    keys: list[ListenerKey] = field(default_factory=list)
    ports: Optional[_Ports] = None
    target: Optional[str] = None
    targetPorts: Optional[_Ports] = None
    settings: _Settings = _Settings()
    tls: Optional[TLSSettings] = None

    def describe(self) -> str:
        if self.name is not None:
            return f"mapping '{self.name}' (line {self.line})"
        return f"the mapping on line {self.line}"


#: Listening hosts and their mappings by protocol and port, for overlaps.
_Bound = dict[tuple[str, int], list[tuple[str, _Entry]]]


class _MapReader:
    """
    One pass over a composed map, collecting every error with its line.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []

    def warning(self, line: int, message: str) -> None:
        self.warnings.append((line, message))

    def error(self, line: int, message: str) -> None:
        self.errors.append((line, message))

    def read(self, root: Optional[Node]) -> ProxyMap:
        if root is None:
            self.error(1, "the map is empty")
            self.raiseErrors()
        self.findDuplicateKeys(root)
        if not isinstance(root, MappingNode):
            self.error(
                _line(root),
                "expected a mapping with the keys defaults, mappings and manhole,"
                f" got {_describe(root)}",
            )
            self.raiseErrors()
        sections = self.keysOf(root, "", TOP_KEYS)
        defaults = _Settings()
        if "defaults" in sections:
            defaults = self.readDefaults(sections["defaults"][1])
        entries: list[_Entry] = []
        if "mappings" in sections:
            entries = self.readMappings(sections["mappings"][1], defaults)
        bound = self.checkOverlaps(entries)
        manhole = None
        if "manhole" in sections:
            keyNode, valueNode = sections["manhole"]
            manhole = self.readManhole(keyNode, valueNode, bound)
        http = None
        if "http" in sections:
            http = self.readHttp(*sections["http"], bound, manhole)
        logFormat = "text"
        if "log_format" in sections:
            logFormat = self.readLogFormat(sections["log_format"][1]) or logFormat
        control = None
        if "control" in sections:
            control = self.readControl(*sections["control"])
        self.raiseErrors()
        return ProxyMap(
            path=self.path,
            mappings=tuple(_buildMapping(entry) for entry in entries),
            manhole=manhole,
            http=http,
            logFormat=logFormat,
            warnings=tuple(
                f"{self.path}:{line}: warning: {message}"
                for line, message in sorted(self.warnings, key=lambda w: w[0])
            ),
            control=control,
        )

    def raiseErrors(self) -> None:
        if self.errors:
            # A stable sort keeps the errors of one line in the order found.
            self.errors.sort(key=lambda error: error[0])
            raise ConfigError(
                [f"{self.path}:{line}: {message}" for line, message in self.errors]
            )

    # YAML structure

    def findDuplicateKeys(self, root: Node) -> None:
        """
        Report every key given twice in any YAML mapping of the file;
        C{safe_load} would keep the last and say nothing.
        """
        seen: set[int] = set()
        pending = [root]
        while pending:
            node = pending.pop()
            if id(node) in seen:
                continue  # aliases may share, or even contain, a node
            seen.add(id(node))
            if isinstance(node, SequenceNode):
                pending.extend(reversed(node.value))
            elif isinstance(node, MappingNode):
                first: dict[tuple, int] = {}
                for keyNode, valueNode in node.value:
                    if isinstance(keyNode, ScalarNode):
                        ident = (keyNode.tag, keyNode.value)
                        if ident in first:
                            self.error(
                                _line(keyNode),
                                f"duplicate key '{keyNode.value}'"
                                f" (first on line {first[ident]})",
                            )
                        else:
                            first[ident] = _line(keyNode)
                    pending.append(valueNode)

    def keysOf(
        self,
        node: MappingNode,
        where: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
    ) -> dict[str, tuple[Node, Node]]:
        """
        The keys of a mapping node the map allows, to their key and value
        nodes.  Unknown keys are errors, and so are missing C{required}
        ones, except one that an unknown key is a misspelling of: the user
        made one mistake and gets one line.  Of a duplicate key only the
        first counts (L{findDuplicateKeys} has reported it).
        """
        prefix = f"{where}: " if where else ""
        result: dict[str, tuple[Node, Node]] = {}
        unknown: list[str] = []
        for keyNode, valueNode in node.value:
            if keyNode.tag == _MERGE:
                self.error(
                    _line(keyNode),
                    f"{prefix}YAML merge keys ('<<') are not supported;"
                    " put shared settings in defaults",
                )
                continue
            if isinstance(keyNode, ScalarNode) and keyNode.tag == _STR:
                name = keyNode.value
                if name in allowed:
                    result.setdefault(name, (keyNode, valueNode))
                    continue
            else:
                name = keyNode.value if isinstance(keyNode, ScalarNode) else _describe(keyNode)
            unknown.append(name)
            self.error(
                _line(keyNode),
                f"{prefix}unknown key '{name}' (expected one of: {', '.join(allowed)})",
            )
        for key in required:
            if key not in result and not difflib.get_close_matches(key, unknown, n=1):
                self.error(_line(node), f"{prefix}missing key '{key}'")
        return result

    def text(self, node: Node, key: str, expected: str, tags=(_STR,)) -> Optional[str]:
        """
        The text of a scalar value as written, or L{None} after reporting
        that the value is not one of the accepted YAML C{tags}.
        """
        if isinstance(node, ScalarNode) and node.tag in tags:
            return node.value
        self.error(_line(node), f"{key}: expected {expected}, got {_describe(node)}")
        return None

    # defaults and the per-mapping settings

    def readDefaults(self, node: Node) -> _Settings:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return _Settings()
        if not isinstance(node, MappingNode):
            self.error(
                _line(node),
                f"defaults: expected a mapping of {', '.join(SETTING_KEYS)},"
                f" got {_describe(node)}",
            )
            return _Settings()
        return self.readSettings(
            self.keysOf(node, "defaults", SETTING_KEYS), "defaults.", _Settings()
        )

    def readSettings(
        self, keys: dict[str, tuple[Node, Node]], prefix: str, base: _Settings, scope: str = ""
    ) -> _Settings:
        """
        Override C{base} with the settings among C{keys} (from L{keysOf});
        a bad value is reported and leaves the inherited one.  C{scope}
        names the mapping, whose per-client limits count its own clients
        once it sets one of them.
        """
        connect, idle, udp = base.timeouts.connect, base.timeouts.idle, base.timeouts.udp
        maxConnections = base.maxConnections
        if "connect_timeout" in keys:
            value = self.duration(keys["connect_timeout"][1], prefix + "connect_timeout", True)
            connect = connect if value is None else value
        if "idle_timeout" in keys:
            value = self.duration(keys["idle_timeout"][1], prefix + "idle_timeout", False)
            idle = idle if value is None else value
        if "udp_timeout" in keys:
            value = self.duration(keys["udp_timeout"][1], prefix + "udp_timeout", True)
            udp = udp if value is None else value
        if "max_connections" in keys:
            value = self.count(keys["max_connections"][1], prefix + "max_connections")
            maxConnections = maxConnections if value is None else value
        identity, clientAddressLine = self.readIdentity(keys, prefix, base)
        return _Settings(
            Timeouts(connect=connect, idle=idle, udp=udp),
            maxConnections,
            identity,
            clientAddressLine,
            self.readAccess(keys, prefix, base.access, scope),
        )

    def readIdentity(
        self, keys: dict[str, tuple[Node, Node]], prefix: str, base: _Settings
    ) -> tuple[ClientIdentity, int]:
        """
        C{client_address} and C{accept_proxy_protocol} among C{keys},
        over C{base}'s; and the line C{client_address} was given on.
        """
        clientAddress = base.identity.clientAddress
        line = base.clientAddressLine
        accepted = base.identity.acceptProxyProtocol
        if "client_address" in keys:
            keyNode, node = keys["client_address"]
            key = prefix + "client_address"
            modes = " | ".join(CLIENT_ADDRESS_MODES)
            text = self.text(node, key, modes)
            if text is not None and text not in CLIENT_ADDRESS_MODES:
                self.error(_line(node), f"{key}: unknown value '{text}' (expected {modes})")
            elif text is not None:
                clientAddress, line = text, _line(node)
        if "accept_proxy_protocol" in keys:
            node = keys["accept_proxy_protocol"][1]
            key = prefix + "accept_proxy_protocol"
            if isinstance(node, SequenceNode):
                networks = []
                for item in node.value:
                    cidr = self.text(item, key, "a network such as 10.0.0.0/8 or fd00::/8")
                    if cidr is None:
                        continue
                    try:
                        networks.append(str(ipaddress.ip_network(cidr, strict=False)))
                    except ValueError:
                        self.error(
                            _line(item),
                            f"{key}: '{cidr}' is not a network (such as 10.0.0.0/8 or fd00::/8)",
                        )
                accepted = tuple(networks)
            else:
                self.error(
                    _line(node),
                    f"{key}: expected a list of networks (such as [10.0.0.0/8]),"
                    f" got {_describe(node)}",
                )
        return ClientIdentity(clientAddress, accepted), line

    def checkIdentity(self, entry: _Entry, protos: list[str]) -> None:
        """
        Report a C{client_address} that cannot work for C{entry}: version 1
        of the PROXY protocol for UDP, and C{transparent} towards a target
        on loopback or in a process that may not use it.
        """
        identity = entry.settings.identity
        line = entry.settings.clientAddressLine or entry.line
        tls = entry.tls
        if identity and tls is not None and (tls.terminate or tls.originate):
            # The header and the transparent socket belong to the TCP
            # connections themselves, under any TLS: not built yet.
            self.error(
                line,
                "client_address and accept_proxy_protocol cannot be combined with"
                " tls or target_tls (sni_routes can)",
            )
        where = f"client_address: {identity.clientAddress}"
        if identity.clientAddress == PROXY_PROTOCOL_V1 and UDP in protos:
            self.error(line, f"{where} has no UDP form; use proxy_protocol_v2 for UDP")
        if not identity.transparent:
            return
        if entry.target is not None and _isAddressLiteral(entry.target) and _isLoopback(entry.target):
            self.error(
                line,
                f"{where} cannot reach a target on loopback ({entry.target}):"
                " its replies to the client's address would never come back",
            )
        problem = transparency.problem()
        if problem is not None:
            self.error(line, f"{where}: {problem}")

    # who may connect

    def readAccess(
        self, keys: dict[str, tuple[Node, Node]], prefix: str, base: AccessPolicy, scope: str
    ) -> AccessPolicy:
        """
        Override C{base} with the access settings among C{keys}: a list
        given replaces the inherited one, and a mapping that sets any
        per-client limit counts its clients in a scope of its own.
        """
        values = {}
        for key, name in (("allow", "allow"), ("deny", "deny")):
            if key in keys:
                cidrs = self.cidrs(keys[key][1], prefix + key)
                if cidrs is not None:
                    values[name] = cidrs
        if "max_connections_per_client" in keys:
            key = "max_connections_per_client"
            value = self.count(keys[key][1], prefix + key)
            if value is not None:
                values["maxPerClient"] = value
        for key, name in (
            ("new_connections_per_client", "newPerClient"),
            ("datagrams_per_client", "datagramsPerClient"),
        ):
            if key in keys:
                rate = self.rate(keys[key][1], prefix + key)
                if rate is not None:
                    values[name] = None if rate is _UNLIMITED else rate
        if any(key in keys for key in PER_CLIENT_KEYS):
            values["scope"] = scope
        return replace(base, **values) if values else base

    def cidrs(self, node: Node, key: str) -> Optional[tuple[str, ...]]:
        """
        A list of CIDRs as normalized text (C{10.0.0.0/8}); L{None} after
        reporting every bad entry.
        """
        expected = "a list of CIDRs, as in [10.0.0.0/8, 2001:db8::/32]"
        if not isinstance(node, SequenceNode):
            self.error(_line(node), f"{key}: expected {expected}, got {_describe(node)}")
            return None
        cidrs: list[str] = []
        good = True
        for item in node.value:
            text = self.text(item, key, "a CIDR such as 10.0.0.0/8")
            if text is None:
                good = False
                continue
            try:
                cidrs.append(str(parseNetwork(text)))
            except ValueError as e:
                self.error(_line(item), f"{key}: {e}")
                good = False
        return tuple(cidrs) if good else None

    def rate(self, node: Node, key: str):
        """
        A L{Rate} from C{N/s} (burst N, at least 1) or C{{rate: N/s,
        burst: B}}; C{0} is L{_UNLIMITED}; L{None} after reporting.
        """
        burst = None
        if isinstance(node, MappingNode):
            parts = self.keysOf(node, key, ("rate", "burst"), ("rate",))
            if "rate" not in parts:
                return None
            if "burst" in parts:
                burst = self.count(parts["burst"][1], key + ".burst")
                if burst is None:
                    return None
                if burst < 1:
                    self.error(_line(parts["burst"][1]), f"{key}.burst: must be at least 1, got 0")
                    return None
            node = parts["rate"][1]
        if isinstance(node, ScalarNode) and node.tag == _INT and node.value == "0":
            return _UNLIMITED
        text = self.text(node, key, _RATE_FORMS, (_STR,))
        if text is None:
            return None
        match = _RATE.fullmatch(text.replace(" ", ""))
        if match is None:
            self.error(_line(node), f"{key}: '{text}' is not a rate (expected {_RATE_FORMS})")
            return None
        perSecond = float(match.group(1))
        if perSecond == 0:
            return _UNLIMITED
        if burst is None:
            burst = max(1, math.ceil(perSecond))
        return Rate(perSecond, burst)

    def duration(self, node: Node, key: str, positive: bool) -> Optional[float]:
        """
        Seconds from a number or a string with a unit; L{None} after
        reporting a bad value.
        """
        expected = f"a duration ({_DURATION_FORMS})"
        text = self.text(node, key, expected, (_INT, _FLOAT, _STR))
        if text is None:
            return None
        if node.tag == _STR:
            match = _DURATION.fullmatch(text)
            if match is None:
                self.error(
                    _line(node), f"{key}: '{text}' is not a duration ({_DURATION_FORMS})"
                )
                return None
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        elif node.tag == _INT:
            seconds = float(_scalars.construct_yaml_int(node))
        else:
            seconds = _scalars.construct_yaml_float(node)
        if not math.isfinite(seconds):
            self.error(_line(node), f"{key}: expected a finite duration, got {text}")
            return None
        if positive and seconds <= 0:
            self.error(_line(node), f"{key}: must be more than 0, got {text}")
            return None
        if seconds < 0:
            self.error(_line(node), f"{key}: must not be negative, got {text}")
            return None
        return seconds

    def count(self, node: Node, key: str) -> Optional[int]:
        text = self.text(node, key, "a whole number (0 is unlimited)", (_INT,))
        if text is None:
            return None
        value = _scalars.construct_yaml_int(node)
        if value < 0:
            self.error(_line(node), f"{key}: must not be negative, got {text}")
            return None
        return value

    # mappings

    def readMappings(self, node: Node, defaults: _Settings) -> list[_Entry]:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, SequenceNode):
            self.error(
                _line(node), f"mappings: expected a list of mappings, got {_describe(node)}"
            )
            return []
        entries: list[_Entry] = []
        names: dict[str, int] = {}
        for index, item in enumerate(node.value):
            entry = self.readMapping(index, item, defaults, names)
            if entry is not None:
                entries.append(entry)
        return entries

    def readMapping(
        self, index: int, node: Node, defaults: _Settings, names: dict[str, int]
    ) -> Optional[_Entry]:
        where = f"mappings[{index}]"
        if not isinstance(node, MappingNode):
            self.error(
                _line(node),
                f"{where}: expected a mapping with listen and target, got {_describe(node)}",
            )
            return None
        entry = _Entry(index=index, line=_line(node))
        keys = self.keysOf(node, where, MAPPING_KEYS, ("listen", "target"))

        protos: Optional[list[str]] = [TCP]
        if "proto" in keys:
            protos = self.readProtos(keys["proto"][1])

        listenText = host = ports = None
        if "listen" in keys:
            listenNode = keys["listen"][1]
            entry.listenLine = _line(listenNode)
            listenText = self.text(
                listenNode, "listen", _LISTEN_FORM, (_STR, _INT)
            )
            if listenText is not None:
                parsed = self.listenAddress(listenText, listenNode, "listen", _LISTEN_FORM)
                if parsed is not None:
                    host, ports = parsed

        target = targetPorts = None
        if "target" in keys:
            targetNode = keys["target"][1]
            targetText = self.text(
                targetNode, "target", "HOST:PORT or HOST:FIRST-LAST", (_STR, _INT)
            )
            if targetText is not None:
                parsed = self.targetAddress(targetText, targetNode)
                if parsed is not None:
                    target, targetPorts = parsed
            if ports is not None and targetPorts is not None:
                if len(targetPorts) != 1 and len(targetPorts) != len(ports):
                    if len(ports) == 1:
                        advice = f"listen {ports.text} is one port; give a single port"
                    else:
                        advice = (
                            f"listen {ports.text} has {len(ports)};"
                            f" give a range of {len(ports)} ports or a single port"
                        )
                    self.error(
                        _line(targetNode),
                        f"target: range {targetPorts.text} has {len(targetPorts)} ports"
                        f" but {advice}",
                    )
                    targetPorts = None

        entry.name = self.readName(entry, keys, protos, listenText, names)

        settings = self.readSettings(keys, "", defaults, entry.name or "")
        entry.tls = self.readTLS(keys, protos, entry.name)

        if protos is not None and ports is not None:
            hosts = [host] if host is not None else [ANY_IPV4, ANY_IPV6]
            entry.keys = [
                ListenerKey(proto, h, port)
                for proto in protos
                for port in range(ports.first, ports.last + 1)
                for h in hosts
            ]
        entry.ports, entry.target, entry.targetPorts = ports, target, targetPorts
        entry.settings = settings
        if protos is not None:
            self.checkIdentity(entry, protos)
        return entry

    def readProtos(self, node: Node) -> Optional[list[str]]:
        expected = "tcp, udp or a list of them"
        if isinstance(node, SequenceNode):
            items = node.value
            if not items:
                self.error(_line(node), "proto: the list is empty (expected tcp, udp or both)")
                return None
        else:
            items = [node]
        protos: list[str] = []
        good = True
        for item in items:
            proto = self.text(item, "proto", expected)
            if proto is None:
                good = False
            elif proto not in PROTOCOLS:
                self.error(_line(item), f"proto: '{proto}' is not a protocol (expected tcp or udp)")
                good = False
            elif proto in protos:
                self.error(_line(item), f"proto: '{proto}' is listed twice")
                good = False
            else:
                protos.append(proto)
        return protos if good else None

    def readName(
        self,
        entry: _Entry,
        keys: dict[str, tuple[Node, Node]],
        protos: Optional[list[str]],
        listenText: Optional[str],
        names: dict[str, int],
    ) -> Optional[str]:
        """
        The mapping's name, given or by default C{<proto>-<listen>}; it
        must be unique, and C{names} remembers the ones taken.
        """
        if "name" in keys:
            nameNode = keys["name"][1]
            line = _line(nameNode)
            expected = "a name of letters, digits, '.', '_' and '-'"
            # YAML reads 80 as a number and yes/no/on/off as booleans.
            if isinstance(nameNode, ScalarNode) and nameNode.tag in (_INT, _FLOAT, _BOOL):
                self.error(
                    line,
                    f"name: expected {expected}, got {_describe(nameNode)}"
                    " (put it in quotes to use it as a name)",
                )
                return None
            name = self.text(nameNode, "name", expected)
            if name is None:
                return None
            if _NAME.fullmatch(name) is None:
                self.error(
                    line, f"name: '{name}' may only contain letters, digits, '.', '_' and '-'"
                )
                return None
            if name in names:
                self.error(
                    line, f"name: '{name}' is already used by the mapping on line {names[name]}"
                )
            else:
                names[name] = entry.line
            return name
        if protos is None or listenText is None:
            return None
        name = f"{'+'.join(protos)}-{listenText}"
        if name in names:
            self.error(
                entry.line,
                f"mappings[{entry.index}]: its default name '{name}' is already used"
                f" by the mapping on line {names[name]}; give it a name",
            )
        else:
            names[name] = entry.line
        return name

    # addresses

    def ports(self, text: str, node: Node, key: str) -> Optional[_Ports]:
        match = _PORTS.fullmatch(text)
        if match is None:
            self.error(
                _line(node),
                f"{key}: '{text}' is not a port or a port range (expected PORT or FIRST-LAST)",
            )
            return None
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        for port in (first, last):
            if not 1 <= port <= 65535:
                self.error(_line(node), f"{key}: port {port} is out of range (1-65535)")
                return None
        if first > last:
            self.error(
                _line(node),
                f"{key}: range {text} runs backwards (FIRST must not be more than LAST)",
            )
            return None
        return _Ports(first, last, text)

    def splitHostPort(
        self, text: str, node: Node, key: str, form: str
    ) -> Optional[tuple[Optional[str], bool, str]]:
        """
        Split C{[HOST:]PORTS} into the host (L{None} when there is none),
        whether it was bracketed, and the ports; L{None} after reporting.
        """
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                self.error(_line(node), f"{key}: '[' without a matching ']' in '{text}'")
                return None
            rest = text[close + 1 :]
            if not rest:
                self.error(_line(node), f"{key}: '{text}' has no port (expected {form})")
                return None
            if not rest.startswith(":"):
                self.error(
                    _line(node), f"{key}: expected ':' after ']' in '{text}' (expected {form})"
                )
                return None
            return text[1:close], True, rest[1:]
        if text.count(":") > 1:
            self.error(
                _line(node),
                f"{key}: an IPv6 address must be in brackets, as in [::1]:8080 ('{text}')",
            )
            return None
        if ":" not in text:
            if _PORTS.fullmatch(text) is None and _looksLikeHost(text):
                self.error(_line(node), f"{key}: '{text}' has no port (expected {form})")
                return None
            return None, False, text
        host, _, portText = text.rpartition(":")
        if not host:
            self.error(_line(node), f"{key}: the host before ':' is empty in '{text}'")
            return None
        return host, False, portText

    def listenAddress(
        self, text: str, node: Node, key: str, form: str
    ) -> Optional[tuple[Optional[str], _Ports]]:
        """
        A C{listen} value as a normalized host (L{None}: every interface)
        and its ports; L{None} after reporting a bad value.
        """
        split = self.splitHostPort(text, node, key, form)
        if split is None:
            return None
        rawHost, bracketed, portText = split
        host = None
        good = True
        if rawHost is not None:
            host = _ipLiteral(rawHost, bracketed)
            if host is None:
                good = False
                self.error(_line(node), f"{key}: {_notAnAddress(rawHost, bracketed, False)}")
        ports = self.ports(portText, node, key)
        if not good or ports is None:
            return None
        return host, ports

    def targetAddress(self, text: str, node: Node) -> Optional[tuple[str, _Ports]]:
        """
        A C{target} value as a host (normalized IP literal or a host name)
        and its ports; L{None} after reporting a bad value.
        """
        form = "HOST:PORT or HOST:FIRST-LAST"
        split = self.splitHostPort(text, node, "target", form)
        if split is None:
            return None
        rawHost, bracketed, portText = split
        if rawHost is None:
            self.error(_line(node), f"target: '{text}' has no host (expected {form})")
            return None
        host = _ipLiteral(rawHost, bracketed)
        good = True
        if host is None:
            if not bracketed and _isHostName(rawHost):
                host = rawHost
            else:
                good = False
                self.error(_line(node), f"target: {_notAnAddress(rawHost, bracketed, True)}")
        elif host in (ANY_IPV4, ANY_IPV6):
            good = False
            self.error(
                _line(node),
                f"target: {rawHost} is the wildcard address, not one to connect to",
            )
        ports = self.ports(portText, node, "target")
        if not good or ports is None:
            return None
        return host, ports

    def filePath(self, node: Node, key: str) -> Optional[str]:
        """
        A file path, absolute, a relative one taken from the map's
        directory; L{None} after reporting a bad value.
        """
        value = self.text(node, key, "a file path")
        if value == "":
            self.error(_line(node), f"{key}: the path is empty")
            return None
        if value is None:
            return None
        return os.path.abspath(os.path.join(os.path.dirname(self.path), value))

    # TLS (docs/tls.md)

    def readTLS(
        self, keys: dict[str, tuple[Node, Node]], protos: Optional[list[str]], name: Optional[str]
    ) -> Optional[TLSSettings]:
        """
        A mapping's C{tls}, C{target_tls} and C{sni_routes}; certificate
        and key files are read and checked now, so that C{check} and a
        reload see a missing or mismatched one.
        """
        given = [key for key in TLS_MAPPING_KEYS if key in keys]
        if not given:
            return None
        errorsBefore = len(self.errors)
        where = f" (mapping '{name}')" if name else ""
        if protos is not None and UDP in protos:
            for key in given:
                self.error(_line(keys[key][0]), f"{key}: TLS is for TCP only, and this mapping has proto udp")
        if "sni_routes" in keys and ("tls" in keys or "target_tls" in keys):
            self.error(
                _line(keys["sni_routes"][0]),
                "sni_routes: passes TLS through unchanged, so it cannot be combined"
                " with tls or target_tls",
            )
        terminate = originate = None
        routes: tuple = ()
        if "tls" in keys:
            terminate = self.readServerTLS(keys["tls"][1], where)
        if "target_tls" in keys:
            originate = self.readTargetTLS(keys["target_tls"][1], where)
        if "sni_routes" in keys:
            routes = self.readSNIRoutes(keys["sni_routes"][1])
        if len(self.errors) != errorsBefore:
            return None
        if terminate is None and originate is None and not routes:
            return None
        return TLSSettings(terminate, originate, routes)

    def readServerTLS(self, node: Node, where: str) -> Optional[ServerTLS]:
        if not isinstance(node, MappingNode):
            self.error(
                _line(node), f"tls: expected a mapping of {', '.join(TLS_KEYS)}, got {_describe(node)}"
            )
            return None
        keys = self.keysOf(node, "tls", TLS_KEYS, ("cert", "key"))
        default = self.readKeyPair(keys, "tls", where)
        byName = []
        if "sni" in keys:
            sniNode = keys["sni"][1]
            if not isinstance(sniNode, MappingNode) or not sniNode.value:
                self.error(
                    _line(sniNode),
                    "tls.sni: expected a mapping of server names (NAME or *.SUFFIX)"
                    f" to {{cert, key}}, got {_describe(sniNode)}",
                )
            else:
                for keyNode, valueNode in sniNode.value:
                    serverName = self.serverName(keyNode, "tls.sni")
                    if not isinstance(valueNode, MappingNode):
                        self.error(
                            _line(valueNode),
                            f"tls.sni.{keyNode.value}: expected a mapping of cert and key,"
                            f" got {_describe(valueNode)}",
                        )
                        continue
                    prefix = f"tls.sni.{keyNode.value}"
                    pair = self.readKeyPair(
                        self.keysOf(valueNode, prefix, ("cert", "key"), ("cert", "key")),
                        prefix,
                        where,
                    )
                    if serverName is not None and pair is not None:
                        byName.append((serverName, pair))
        clientCA = clientCAPem = None
        if "client_ca" in keys:
            clientCA, clientCAPem = self.readAuthorities(keys["client_ca"][1], "tls.client_ca", where)
        minVersion = self.tlsVersion(keys, "tls")
        if default is None or minVersion is None:
            return None
        return ServerTLS(default, tuple(byName), clientCA, clientCAPem, minVersion)

    def readTargetTLS(self, node: Node, where: str) -> Optional[TargetTLS]:
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            if not _scalars.construct_yaml_bool(node):
                self.error(_line(node), "target_tls: leave it out to speak plain TCP to the target")
                return None
            return TargetTLS()
        if not isinstance(node, MappingNode):
            self.error(
                _line(node),
                f"target_tls: expected true or a mapping of {', '.join(TARGET_TLS_KEYS)},"
                f" got {_describe(node)}",
            )
            return None
        keys = self.keysOf(node, "target_tls", TARGET_TLS_KEYS)
        ca = caPem = serverName = client = None
        verify = True
        if "ca" in keys:
            ca, caPem = self.readAuthorities(keys["ca"][1], "target_tls.ca", where)
        if "server_name" in keys:
            serverName = self.serverName(keys["server_name"][1], "target_tls.server_name", False)
        if "verify" in keys:
            verifyNode = keys["verify"][1]
            if self.text(verifyNode, "target_tls.verify", "true or false", (_BOOL,)) is not None:
                verify = _scalars.construct_yaml_bool(verifyNode)
                if not verify:
                    self.warning(
                        _line(verifyNode),
                        "target_tls.verify is false: the target's certificate is not checked,"
                        f" so anyone between the proxy and the target can read and change the traffic{where}",
                    )
        if ("cert" in keys) != ("key" in keys):
            missing = "key" if "cert" in keys else "cert"
            self.error(_line(node), f"target_tls: a client certificate needs both cert and key (missing {missing})")
        elif "cert" in keys:
            client = self.readKeyPair(keys, "target_tls", where)
        minVersion = self.tlsVersion(keys, "target_tls")
        if minVersion is None:
            return None
        return TargetTLS(ca, caPem, serverName, verify, client, minVersion)

    def readSNIRoutes(self, node: Node) -> tuple[tuple[str, Target], ...]:
        expected = "a mapping of server names (NAME or *.SUFFIX) to HOST:PORT targets"
        if not isinstance(node, MappingNode) or not node.value:
            self.error(_line(node), f"sni_routes: expected {expected}, got {_describe(node)}")
            return ()
        routes = []
        for keyNode, valueNode in node.value:
            serverName = self.serverName(keyNode, "sni_routes")
            key = f"sni_routes.{keyNode.value}"
            text = self.text(valueNode, key, "HOST:PORT", (_STR,))
            if text is None:
                continue
            parsed = self.targetAddress(text, valueNode)
            if parsed is None:
                continue
            host, ports = parsed
            if len(ports) != 1:
                self.error(_line(valueNode), f"{key}: expected one port, got {ports.text}")
                continue
            if serverName is not None:
                routes.append((serverName, Target(host, ports.first)))
        return tuple(routes)

    def serverName(self, node: Node, key: str, wildcard: bool = True) -> Optional[str]:
        """
        A TLS server name: a host name, or (when C{wildcard}) C{*.SUFFIX};
        lower case.
        """
        text = self.text(node, key, "a server name", (_STR,))
        if text is None:
            return None
        name = text[2:] if wildcard and text.startswith("*.") else text
        if not _isHostName(name):
            form = "a host name or *.SUFFIX" if wildcard else "a host name"
            self.error(_line(node), f"{key}: '{text}' is not {form}")
            return None
        return text.lower()

    def readKeyPair(
        self, keys: dict[str, tuple[Node, Node]], prefix: str, where: str
    ) -> Optional[KeyPair]:
        if "cert" not in keys or "key" not in keys:
            return None
        certPath = self.filePath(keys["cert"][1], f"{prefix}.cert")
        keyPath = self.filePath(keys["key"][1], f"{prefix}.key")
        if certPath is None or keyPath is None:
            return None
        try:
            pair = tls.readKeyPair(certPath, keyPath)
        except tls.TLSFileError as e:
            self.error(_line(keys["key"][1]), f"{prefix}: {e}{where}")
            return None
        problem = tls.keyFileWarning(keyPath)
        if problem is not None:
            self.warning(_line(keys["key"][1]), f"{prefix}.key: {problem}{where}")
        return pair

    def readAuthorities(self, node: Node, key: str, where: str) -> tuple[Optional[str], Optional[bytes]]:
        path = self.filePath(node, key)
        if path is None:
            return None, None
        try:
            return path, tls.readAuthorities(path)
        except tls.TLSFileError as e:
            self.error(_line(node), f"{key}: {e}{where}")
            return None, None

    def tlsVersion(self, keys: dict[str, tuple[Node, Node]], prefix: str) -> Optional[str]:
        if "min_version" not in keys:
            return "1.2"
        node = keys["min_version"][1]
        text = self.text(node, f"{prefix}.min_version", "1.2 or 1.3", (_STR, _FLOAT))
        if text is None:
            return None
        if text not in tls.VERSIONS:
            self.error(_line(node), f"{prefix}.min_version: expected 1.2 or 1.3, got {text}")
            return None
        return text

    # overlaps and the manhole

    def checkOverlaps(self, entries: list[_Entry]) -> _Bound:
        """
        Report each mapping whose listeners collide with an earlier
        mapping's, once per pair, on the later mapping's C{listen} line.

        @return: every listener's host and mapping by protocol and port.
        """
        bound: _Bound = {}
        for entry in entries:
            clashes: dict[int, tuple[_Entry, ListenerKey, int]] = {}
            for key in entry.keys:
                for host, earlier in bound.get((key.proto, key.port), ()):
                    if _overlaps(host, key.host):
                        if id(earlier) in clashes:
                            first = clashes[id(earlier)]
                            clashes[id(earlier)] = (first[0], first[1], first[2] + 1)
                        else:
                            clashes[id(earlier)] = (earlier, key, 1)
            for earlier, key, count in clashes.values():
                if count == 1:
                    what = f"{key} overlaps"
                elif count == 2:
                    what = f"{key} and 1 more listener overlap"
                else:
                    what = f"{key} and {count - 1} more listeners overlap"
                self.error(entry.listenLine, f"listen: {what} {earlier.describe()}")
            for key in entry.keys:
                bound.setdefault((key.proto, key.port), []).append((key.host, entry))
        return bound

    def readManhole(self, keyNode: Node, node: Node, bound: _Bound) -> Optional[Manhole]:
        """
        The manhole section, which may not collide with the TCP listeners
        in C{bound}; L{None} when the section is empty or has errors.
        """
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return None
        if not isinstance(node, MappingNode):
            self.error(
                _line(node),
                f"manhole: expected a mapping of {', '.join(MANHOLE_KEYS)}, got {_describe(node)}",
            )
            return None
        errorsBefore = len(self.errors)
        keys = self.keysOf(node, "manhole", MANHOLE_KEYS, ("listen", "authorized_keys", "host_key"))

        host, port, allowRemote = self.serviceListen(keys, "manhole", bound)

        paths = {}
        for key in ("authorized_keys", "host_key"):
            if key in keys:
                path = self.filePath(keys[key][1], f"manhole.{key}")
                if path is not None:
                    paths[key] = path

        limits = {}
        if "login_grace_time" in keys:
            limits["loginGraceTime"] = self.duration(
                keys["login_grace_time"][1], "manhole.login_grace_time", True
            )
        if "max_startups" in keys:
            limits["maxStartups"] = self.count(keys["max_startups"][1], "manhole.max_startups")

        if len(self.errors) != errorsBefore:
            return None
        return Manhole(
            host=host,
            port=port,
            authorizedKeys=paths["authorized_keys"],
            hostKey=paths["host_key"],
            allowRemote=allowRemote,
            line=_line(keyNode),
            **limits,
        )

    def serviceListen(
        self, keys: dict[str, tuple[Node, Node]], section: str, bound: _Bound,
        default: Optional[tuple[str, int]] = None,
    ) -> tuple[Optional[str], Optional[int], bool]:
        """
        The C{listen} and C{allow_remote} of a section that serves one TCP
        port of its own (the manhole, the HTTP endpoint): one port, on
        loopback unless C{allow_remote} is true, overlapping no listener in
        C{bound}.  A missing C{listen} is C{default}.

        @return: host, port (L{None} after an error) and C{allow_remote}.
        """
        allowRemote = False
        if "allow_remote" in keys:
            remoteNode = keys["allow_remote"][1]
            if self.text(remoteNode, f"{section}.allow_remote", "true or false", (_BOOL,)) is not None:
                allowRemote = _scalars.construct_yaml_bool(remoteNode)
        if "listen" not in keys:
            host, port = default if default is not None else (None, None)
            return host, port, allowRemote
        listenNode = keys["listen"][1]
        where = f"{section}.listen"
        text = self.text(listenNode, where, "[HOST:]PORT", (_STR, _INT))
        parsed = None
        if text is not None:
            parsed = self.listenAddress(text, listenNode, where, "[HOST:]PORT")
        if parsed is None:
            return None, None, allowRemote
        host, ports = parsed
        host = MANHOLE_HOST if host is None else host
        if "-" in ports.text:
            self.error(_line(listenNode), f"{where}: expected one port, got {ports.text}")
            return None, None, allowRemote
        port = ports.first
        if not allowRemote and not _isLoopback(host):
            self.error(
                _line(listenNode),
                f"{where}: {host} is not a loopback address;"
                f" add allow_remote: true to let other hosts {_REMOTE_USE[section]}",
            )
        clashes = {
            id(entry): entry
            for other, entry in bound.get((TCP, port), ())
            if _overlaps(other, host)
        }
        for entry in clashes.values():
            self.error(
                _line(listenNode),
                f"{where}: tcp {formatHostPort(host, port)} overlaps {entry.describe()}",
            )
        return host, port, allowRemote

    def readHttp(
        self, keyNode: Node, node: Node, bound: _Bound, manhole: Optional[Manhole]
    ) -> Optional[Http]:
        """
        The C{http} section (C{http: {}} listens on L{HTTP_LISTEN}); it may
        not collide with the TCP listeners in C{bound} nor the manhole.
        L{None} when the section is empty (every key commented out, as any
        section) or has errors.
        """
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return None
        if isinstance(node, MappingNode):
            keys = self.keysOf(node, "http", HTTP_KEYS)
        else:
            self.error(
                _line(node),
                f"http: expected a mapping of {', '.join(HTTP_KEYS)}, got {_describe(node)}",
            )
            return None
        errorsBefore = len(self.errors)
        defaultHost, defaultPort = HTTP_LISTEN.rsplit(":", 1)
        host, port, allowRemote = self.serviceListen(
            keys, "http", bound, (defaultHost, int(defaultPort))
        )
        if (
            host is not None
            and manhole is not None
            and manhole.port == port
            and _overlaps(manhole.host, host)
        ):
            line = _line(keys["listen"][1]) if "listen" in keys else _line(keyNode)
            self.error(
                line,
                f"http.listen: tcp {formatHostPort(host, port)} overlaps the manhole"
                f" (line {manhole.line})",
            )
        if len(self.errors) != errorsBefore or host is None or port is None:
            return None
        return Http(host=host, port=port, allowRemote=allowRemote, line=_line(keyNode))

    def readLogFormat(self, node: Node) -> Optional[str]:
        value = self.text(node, "log_format", " or ".join(LOG_FORMATS))
        if value is not None and value not in LOG_FORMATS:
            self.error(
                _line(node),
                f"log_format: expected {' or '.join(LOG_FORMATS)}, got '{value}'",
            )
            return None
        return value


    def readControl(self, keyNode: Node, node: Node) -> Optional[Control]:
        """
        The control socket section; L{None} when it is empty or has errors.
        """
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return None
        if not isinstance(node, MappingNode):
            self.error(
                _line(node),
                f"control: expected a mapping of {', '.join(CONTROL_KEYS)}, got {_describe(node)}",
            )
            return None
        errorsBefore = len(self.errors)
        keys = self.keysOf(node, "control", CONTROL_KEYS)
        control = Control(line=_line(keyNode))
        path, mode = control.socket, control.mode
        if "socket" in keys:
            pathNode = keys["socket"][1]
            value = self.text(pathNode, "control.socket", "a file path")
            if value == "":
                self.error(_line(pathNode), "control.socket: the path is empty")
            elif value is not None:
                path = os.path.abspath(os.path.join(os.path.dirname(self.path), value))
                size = len(os.fsencode(path))
                if size > UNIX_PATH_MAX:
                    self.error(
                        _line(pathNode),
                        f"control.socket: {path} is {size} bytes long; a unix socket"
                        f" path has at most {UNIX_PATH_MAX}",
                    )
        if "mode" in keys:
            modeNode = keys["mode"][1]
            # Written as octal, whether YAML reads 0600 as a number or not.
            text = self.text(modeNode, "control.mode", "a file mode such as 0600", (_INT, _STR))
            if text is not None:
                digits = text[2:] if text[:2] in ("0o", "0O") else text
                if re.fullmatch(r"[0-7]{1,4}", digits) is None or int(digits, 8) > 0o777:
                    self.error(
                        _line(modeNode),
                        f"control.mode: '{text}' is not a file mode (octal, 0000-0777,"
                        " such as 0600 or 0660)",
                    )
                else:
                    mode = int(digits, 8)
        if len(self.errors) != errorsBefore:
            return None
        return Control(socket=path, mode=mode, line=control.line)


#: What C{allow_remote} lets other hosts do, in its error message.
_REMOTE_USE = {"manhole": "log in", "http": "connect"}


def _buildMapping(entry: _Entry) -> Mapping:
    """
    The L{Mapping} of an entry of a map without errors.
    """
    ports, targetPorts = entry.ports, entry.targetPorts
    # A single target port takes every listen port; a range pairs up port
    # by port (the reader checked that the lengths agree).
    offset = targetPorts.first - ports.first
    targets = {
        port: Target(entry.target, targetPorts.first if len(targetPorts) == 1 else port + offset)
        for port in range(ports.first, ports.last + 1)
    }
    settings = entry.settings
    listeners = tuple(
        Listener(
            entry.name,
            proto,
            host,
            port,
            targets[port],
            settings.timeouts,
            settings.maxConnections,
            settings.identity,
            settings.access,
            entry.line,
            entry.tls,
        )
        for proto, host, port in entry.keys
    )
    return Mapping(name=entry.name, listeners=listeners, line=entry.line)


def _ipLiteral(host: str, bracketed: bool) -> Optional[str]:
    """
    The normalized text of an IP literal (IPv6 when C{bracketed}, IPv4
    otherwise), or L{None} when C{host} is not one.
    """
    try:
        if bracketed:
            if "%" in host:
                return None
            return str(ipaddress.IPv6Address(host))
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def _looksLikeHost(text: str) -> bool:
    """
    Whether a C{listen} or C{target} without a colon is a host whose port
    was forgotten rather than a mistyped port.
    """
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return _isHostName(text) and not text[:1].isdigit()


def _isHostName(text: str) -> bool:
    """
    Whether C{text} is a DNS host name (see C{_LABEL}); a name whose last
    label is all digits is a mistyped IPv4 address, not a name.
    """
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def _notAnAddress(host: str, bracketed: bool, nameAllowed: bool) -> str:
    """
    Explain why C{host} is not a usable address.
    """
    if bracketed:
        if "%" in host:
            return f"'[{host}]': IPv6 zone indexes ('%') are not supported"
        return f"'[{host}]' is not an IPv6 address (brackets are for IPv6 only)"
    if re.fullmatch(r"[0-9.]+", host):
        return f"'{host}' is not a valid IPv4 address"
    if nameAllowed:
        return f"'{host}' is not an IP address or a host name"
    return (
        f"'{host}' is not an IP address (listen takes an IPv4 address"
        " or a bracketed IPv6 address such as [::1])"
    )
