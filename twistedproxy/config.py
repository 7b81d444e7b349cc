"""
The map file: YAML text in, a frozen L{twistedproxy.model.ProxyMap} out.

Every rule of the map (docs/MAP.md) is checked before anything is returned,
and every mistake is reported at once as C{FILE:LINE: message}, so that a
user fixes a map in one round and a reload applies either a whole valid map
or nothing.  The YAML is read with C{yaml.compose}, not C{safe_load}: the
node tree keeps the line of every key and value, and shows the duplicate
keys that C{safe_load} silently folds into one.

Checking costs time linear in the size of the file (up to a sort), whatever
the file holds: ranges are checked as intervals, never port by port; an
alias repeats a node, never the work on it; at most L{MAX_ERRORS} errors are
shown.  A map is a pure function of the file, so L{loadMap} may run in any
thread.
"""

from __future__ import annotations

import difflib
import gc
import ipaddress
import math
import os
import re
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from operator import itemgetter
from types import ModuleType
from typing import Any

# PyYAML has no type hints of its own (types-PyYAML is not installed).
import yaml  # type: ignore[import-untyped]
from yaml.constructor import SafeConstructor  # type: ignore[import-untyped]
from yaml.nodes import (  # type: ignore[import-untyped]
    MappingNode,
    Node,
    ScalarNode,
    SequenceNode,
)

from twistedproxy import transparency
from twistedproxy.model import (
    ANY_IPV4,
    ANY_IPV6,
    CLIENT_ADDRESS_MODES,
    LOG_FORMATS,
    OPEN,
    PROTOCOLS,
    PROXY_PROTOCOL_V1,
    TCP,
    UDP,
    AccessPolicy,
    ClientIdentity,
    Control,
    Http,
    KeyPair,
    Listener,
    ListenerKey,
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
SETTING_KEYS: tuple[str, ...] = (
    "connect_timeout",
    "idle_timeout",
    "udp_timeout",
    "max_connections",
)
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
SETTING_KEYS = (*SETTING_KEYS, *IDENTITY_KEYS, *ACCESS_KEYS)
TLS_MAPPING_KEYS = ("tls", "target_tls", "sni_routes")
#: The keys of the mappings L{_MapReader.readPlainMapping} reads.
_PLAIN_KEYS = ("name", "listen", "target")
MAPPING_KEYS = ("name", "proto", "listen", "target", *SETTING_KEYS, *TLS_MAPPING_KEYS)
TLS_KEYS = ("cert", "key", "sni", "client_ca", "min_version")
TARGET_TLS_KEYS = ("ca", "server_name", "verify", "cert", "key", "min_version")
MANHOLE_KEYS = (
    "listen",
    "authorized_keys",
    "host_key",
    "allow_remote",
    "login_grace_time",
    "max_startups",
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
# An IPv4 address as ipaddress would print it: the common case, read
# without ipaddress's much slower parser.
_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)

# Numbers are read from the text as written, in decimal: YAML 1.1 would
# also read 017 as octal 15, 1:30 as 90 (base 60), 0x10, +5 and 1_000.
_WHOLE = re.compile(r"0|[1-9][0-9]*")
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+")
#: The largest whole number a map may give (a signed 64-bit integer).
MAX_WHOLE = 2**63 - 1

_LISTEN_FORM = "[HOST:]PORT or [HOST:]FIRST-LAST"
_DURATION_FORMS = (
    "seconds as a number, or a number with ms, s, m or h: 250ms, 5s, 2m, 1h"
)
_RATE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)/s")
_RATE_FORMS = "N/s, as in 20/s, or {rate: N/s, burst: B}"

#: What a rate of 0 (no limit) reads as, told apart from a bad value.
_UNLIMITED = object()

#: At most this many errors are listed, then one line says how many more.
MAX_ERRORS = 100
#: A value quoted into a message is cut to this many characters.
_QUOTE_LENGTH = 256

# Only its scalar constructors are used; they keep no state between calls.
_scalars = SafeConstructor()

# The libyaml-backed loader composes a big map about five times faster;
# its marks (lines) are the same as the pure-Python loader's.
try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader


#: YAML 1.1's implicit types of plain scalars whose texts have at most one
#: '.' (a number's point, a time's fraction of a second): so a text with
#: two, as an IPv4 address, is none of them.
_DOTTED_NEVER = {_FLOAT, _INT, "tag:yaml.org,2002:timestamp"}


def _implicitResolvers() -> dict[str, list[tuple[str, re.Pattern[str]]]]:
    """
    For each first character of a plain scalar (C{""} for the empty
    text), the safe loader's implicit resolvers to try, in its order.
    """
    table = _SafeLoader.yaml_implicit_resolvers
    anyFirst = table.get(None, [])
    return {
        first: resolvers + anyFirst
        for first, resolvers in table.items()
        if first is not None
    }


_RESOLVERS = _implicitResolvers()
#: First characters whose resolvers are all of L{_DOTTED_NEVER}.
_DOTTED_STR = {
    first
    for first, resolvers in _RESOLVERS.items()
    if all(tag in _DOTTED_NEVER for tag, regexp in resolvers)
}


#: Never holds anything; see L{_Loader.descend_resolver}.
_NOTHING: dict[object, object] = {}


class _Loader(_SafeLoader):
    """
    The safe loader (libyaml's where present), with the YAML types of
    plain scalars resolved as it resolves them, only faster: PyYAML's
    resolver runs in Python for every scalar (1.5 s of the 2.5 s it takes
    to compose 100,000 mappings), walking its list of implicit resolvers
    and the path bookkeeping the safe loader never uses.  Here the
    resolvers of each first character are looked up at once, an IPv4
    address is known for a string without them, and the type of a text
    that needed them (every key, C{tcp}...) is remembered for the rest of
    the file.  The reader decides what a number means from its text
    (L{_notDecimal}); the types only say which node is a string, a number,
    a boolean or no value, exactly as PyYAML says.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._plainTags: dict[str, str] = {}

    # The composer calls these two around every node, to follow PyYAML's
    # path resolvers; the safe loader has none, so they only need to take
    # the arguments and do nothing, and C methods of an empty dict do
    # that at a fraction of the cost of Python no-ops (0.2 s of a
    # 100,000-mapping map).
    descend_resolver = _NOTHING.get  # (parent node, index) -> index
    ascend_resolver = _NOTHING.clear

    def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
        if kind is not ScalarNode or not implicit[0]:
            return super().resolve(kind, value, implicit)
        return _plainTag(value, self._plainTags)


def _plainTag(value: str, known: dict[str, str]) -> str:
    """
    The YAML type PyYAML's safe loader gives the plain scalar C{value}
    (see L{_Loader}); C{known} remembers the types that needed a regular
    expression.
    """
    tag = known.get(value)
    if tag is not None:
        return tag
    first = value[:1]
    resolvers = _RESOLVERS.get(first)
    if resolvers is None:
        return _STR
    if first in _DOTTED_STR and value.count(".") > 1:
        # An IPv4 address (127.0.0.1:8080), the most common text of a
        # map, is no number and no date; PyYAML would try three
        # regular expressions to find out.
        return _STR
    tag = next(
        (tag for tag, regexp in resolvers if regexp.match(value) is not None), _STR
    )
    known[value] = tag
    return tag


#: A line that is exactly a one-line flow mapping of plain scalars of the
#: common shape: C{- {name: N, listen: A, target: A}} (the name may be
#: left out), nothing else on the line; see L{_prescan}.
_ONE_LINE = re.compile(
    r"^ *- (?P<body>\{(?:name: (?P<name>[A-Za-z0-9_][A-Za-z0-9._-]*), )?"
    r"listen: (?P<listen>[0-9]{1,3}(?:\.[0-9]{1,3}){3}:[0-9]{1,5}),"
    r" target: (?P<target>[0-9]{1,3}(?:\.[0-9]{1,3}){3}:[0-9]{1,5})\})$",
    re.MULTILINE,
)
#: Whether a text of digits with three dots, as the listen and target of
#: L{_ONE_LINE}, is always a string to YAML (it is to PyYAML 5 and 6).
_DOTTED_DIGITS_STR = set("0123456789") <= _DOTTED_STR
#: What YAML counts as a line break besides a newline: a text with one of
#: them is not pre-read (its lines would not be counted the same).
_OTHER_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
#: What stands for a pre-read mapping in the text YAML composes.
_PLACEHOLDER = "{}"

#: The name, listen and target texts of a pre-read mapping.
_Prepared = tuple[str | None, str, str]


def _prescan(text: str) -> tuple[str, dict[int, _Prepared]] | None:
    """
    Take the common one-line mappings out of C{text} before YAML composes
    it: composing their six scalars each is most of the time of a big map.
    Each line of L{_ONE_LINE} whose three values are plain strings to YAML
    has its flow mapping replaced by an empty one, C{{}}, which parses the
    same way in every place the mapping could be (both are one flow
    mapping that ends the line), and keeps every line where it was.  The
    result is the new text and the texts of each mapping taken out, by
    line; L{None} when there is none.

    The caller checks that every replaced line became an item of the
    C{mappings} list (not, say, text of a block scalar) and otherwise
    composes C{text} itself (see L{parseMap}).
    """
    if (
        not _DOTTED_DIGITS_STR
        or "listen: " not in text
        or any(b in text for b in _OTHER_BREAKS)
    ):
        return None
    pieces: list[str] = []
    prepared: dict[int, _Prepared] = {}
    known: dict[str, str] = {}
    line = 1
    counted = 0
    kept = 0
    for match in _ONE_LINE.finditer(text):
        name, listen, target = match.group("name", "listen", "target")
        if name is not None and _plainTag(name, known) != _STR:
            continue
        start = match.start()
        line += text.count("\n", counted, start)
        counted = start
        prepared[line] = (name, listen, target)
        pieces.append(text[kept : match.start("body")])
        pieces.append(_PLACEHOLDER)
        kept = match.end()
    if not prepared:
        return None
    pieces.append(text[kept:])
    return "".join(pieces), prepared


class _Abandon(Exception):
    """
    A pre-read mapping (L{_prescan}) is not one L{_MapReader.readPlainMapping}
    reads at once: the map is read again from its own text.
    """


def _tlsModule() -> ModuleType:
    """
    L{twistedproxy.tls}, imported when a map first uses TLS: it loads
    Twisted's and pyOpenSSL's TLS modules, which take longer than checking
    most maps (C{check} of a map without TLS never needs them).
    """
    from twistedproxy import tls

    return tls


class ConfigError(Exception):
    """
    A map file that cannot be used.

    @ivar errors: the problems found, each one line C{FILE:LINE: message}
        (or C{FILE: message} when the file cannot be read at all) without
        control characters; at most L{MAX_ERRORS} of them and a last line
        saying how many more there are.
    @ivar count: how many problems there are in all.
    """

    def __init__(self, errors: list[str], count: int | None = None) -> None:
        super().__init__(errors)
        self.errors = [_printable(error) for error in errors]
        self.count = len(self.errors) if count is None else count

    def __str__(self) -> str:
        return "\n".join(self.errors)


def _escape(text: str, backslash: bool) -> str:
    """
    C{text} with every character that is not printable (control characters,
    line and paragraph separators, lone surrogates...) written as Python
    writes it in a string literal (C{\\n}, C{\\x1b}, C{\\ud800}), and, when
    C{backslash}, each backslash doubled, so that the result is one line a
    terminal shows as it is.
    """
    if text.isprintable() and not (backslash and "\\" in text):
        return text
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\" if backslash else char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


def _printable(line: str) -> str:
    """
    One message line with its non-printable characters escaped; the last
    guard, for any value that was not quoted with L{_quote}.
    """
    return _escape(line, backslash=False)


def _quote(value: str, quotes: bool = True) -> str:
    """
    C{value} for a message, in single quotes unless not C{quotes}: escaped
    so that it is one line (see L{_escape}), and cut short when long.
    """
    if len(value) > _QUOTE_LENGTH:
        value = value[:_QUOTE_LENGTH] + "..."
    value = _escape(value, backslash=True)
    return f"'{value}'" if quotes else value


def _notDecimal(text: str, tag: str = _STR) -> str:
    """
    Say why C{text}, a number as written, is refused: the map takes plain
    decimal numbers only, whatever else YAML 1.1 would read (C{tag} is the
    YAML type of the value it was read from).
    """
    unsigned = text.lstrip("+-")
    if text.startswith("+"):
        why = " (no '+' sign)"
    elif "_" in text:
        why = " (no '_' between digits)"
    elif ":" in text:
        why = " (YAML 1.1 would read it as base 60)"
    elif unsigned[:2].lower() in _BASES:
        why = f" (no {_BASES[unsigned[:2].lower()]})"
    elif re.match(r"0[0-9]", unsigned):
        why = " (no leading zero: YAML 1.1 would read it as octal)"
    elif tag == _FLOAT and "e" in unsigned.lower():
        why = " (no exponent)"
    else:
        why = ""
    return f"{_quote(text)} is not a plain decimal number{why}"


_BASES = {"0x": "hexadecimal", "0o": "octal", "0b": "binary"}


_gcLock = threading.Lock()
_gcHolders = 0


@contextmanager
def _withoutCycleCollector() -> Iterator[None]:
    """
    Keep Python's cycle collector from running while a map is composed and
    read: the node tree and the model are millions of objects that live
    until the load ends, and the collector would walk them again and again
    (it more than doubles the time of a big map).  Reference counting still
    frees everything; the collector runs again afterwards.  A count makes
    it safe for loads in several threads at once.
    """
    global _gcHolders
    with _gcLock:
        _gcHolders += 1
        if _gcHolders == 1:
            _withoutCycleCollector.wasEnabled = gc.isenabled()  # type: ignore[attr-defined]
            gc.disable()
    try:
        yield
    finally:
        with _gcLock:
            _gcHolders -= 1
            if _gcHolders == 0 and _withoutCycleCollector.wasEnabled:  # type: ignore[attr-defined]
                gc.enable()


def loadMap(path: str) -> ProxyMap:
    """
    Read and check the map file at C{path}.  It touches nothing but that
    file, so it may run in a thread of its own.

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
    inThread = threading.current_thread() is not threading.main_thread()
    with _withoutCycleCollector():
        prescanned = _prescan(text)
        if prescanned is not None:
            try:
                return _parseComposed(text, path, inThread, *prescanned)
            except _Abandon:
                # Not the text's own tree (it did not parse, a pre-read
                # line was not a mapping of the list) or a pre-read
                # mapping the reader does not read at once: the map is
                # read again from its own text, which gives its errors.
                pass
        return _parseComposed(text, path, inThread, text, {})


def _parseComposed(
    text: str,
    path: str,
    inThread: bool,
    composed: str,
    prepared: dict[int, _Prepared],
) -> ProxyMap:
    """
    L{parseMap} of C{text} from the tree of C{composed}: C{text} itself,
    or that of L{_prescan} with C{prepared}, its mappings taken out.

    @raise _Abandon: with C{prepared}, the tree is not C{text}'s with them
        taken out, or one of them is not read at once.  Otherwise the
        reader sees the same tree but for them, and reads them as it would
        have read them: its errors are the text's own.
    """
    reader = _MapReader(path, prepared)
    try:
        try:
            root = _compose(composed, path)
        except ConfigError:
            if prepared:
                raise _Abandon() from None
            raise
        try:
            if prepared and not _allPlaced(root, prepared):
                raise _Abandon()
            outline = reader.read(root)
        finally:
            if inThread:
                # Another thread (the reactor's) may be waiting for
                # the GIL.
                _dismantle(root)
            # Freed before the model is built, which then reuses its
            # memory (100 MiB less at the peak for 100,000 mappings),
            # and before the cycle collector runs again, which would
            # walk the whole tree once more.
            del root
        return replace(outline, mappings=reader.buildMappings())
    finally:
        if inThread:
            # The same for what the reader learned of each mapping,
            # which an error's traceback would free all at once.
            while reader.entries:
                reader.entries.pop()
        del reader


def _allPlaced(root: Node | None, prepared: dict[int, _Prepared]) -> bool:
    """
    Whether each line of C{prepared} holds an empty flow mapping that is an
    item of the list the reader reads as the map's mappings (the first
    C{mappings} key): then the text it was taken out of has there the
    one-line mapping and is otherwise the same tree.
    """
    if not isinstance(root, MappingNode):
        return False
    for keyNode, valueNode in root.value:
        if (
            isinstance(keyNode, ScalarNode)
            and keyNode.tag == _STR
            and keyNode.value == "mappings"
        ):
            if not isinstance(valueNode, SequenceNode):
                return False
            placed = 0
            for item in valueNode.value:
                if (
                    type(item) is MappingNode
                    and not item.value
                    and item.start_mark.line + 1 in prepared
                ):
                    placed += 1
            return placed == len(prepared)
    return False


def _compose(text: str, path: str) -> Node | None:
    """
    The YAML node tree of C{text}; L{None} when it holds no document.
    """
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(
            [f"{path}:{_yamlErrorLine(e)}: {_yamlErrorMessage(e, text)}"]
        ) from None
    except yaml.reader.ReaderError as e:
        # The reader rejects control characters before any mark exists.
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(
            [
                f"{path}:{line}: not valid YAML: character #x{e.character:04x} is not allowed"
            ]
        ) from None
    except RecursionError:
        # PyYAML's pure-Python composer recurses once per level of nesting
        # (libyaml stops at 1000 levels with a MarkedYAMLError).
        raise ConfigError([f"{path}:1: not valid YAML: nested too deeply"]) from None


def _dismantle(root: Node | None) -> None:
    """
    Free a node tree a few nodes at a time.  Dropped at once, a big tree
    is freed in one call that holds the GIL for as long as it takes (0.6 s
    for 50,000 mappings), and a reload in a thread would stop the reactor
    that long; freed from a Python loop, other threads run between steps
    (the interpreter switches threads every 5 ms).  On the main thread
    (C{check}, start-up) nothing waits, and the tree is dropped at once,
    which costs less.
    """
    pending = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, (MappingNode, SequenceNode)):
            children = node.value
            while children:
                child = children.pop()
                if isinstance(child, tuple):
                    pending.extend(child)
                else:
                    pending.append(child)


def _yamlErrorLine(e: yaml.MarkedYAMLError) -> int:
    mark = e.problem_mark or e.context_mark
    return mark.line + 1 if mark is not None else 1


def _yamlErrorMessage(e: yaml.MarkedYAMLError, text: str) -> str:
    mark = e.problem_mark
    if mark is not None and text[mark.index : mark.index + 1] == "\t":
        return (
            "not valid YAML: a tab where YAML expects spaces (indent with spaces only)"
        )
    if e.problem == "exceeded maximum nesting depth":
        return "not valid YAML: nested too deeply"
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


@dataclass(frozen=True)
class _Ports:
    """
    A port or a range of ports as written in C{listen} or C{target}; the
    reader shares one for each single port.
    """

    first: int
    last: int
    text: str

    def __len__(self) -> int:
        return self.last - self.first + 1


#: The defaults of L{_Settings}, shared (the values are frozen).
_TIMEOUTS = Timeouts()
_NO_IDENTITY = ClientIdentity()


@dataclass(frozen=True)
class _Settings:
    """
    The settings C{defaults} gives and a mapping may override.
    """

    timeouts: Timeouts = _TIMEOUTS
    maxConnections: int = 0
    identity: ClientIdentity = _NO_IDENTITY
    #: where client_address was given, for the errors of its value
    clientAddressLine: int = field(default=0, compare=False)
    access: AccessPolicy = OPEN


@dataclass
class _Entry:
    """
    What the reader learned of one mapping, even a broken one: enough to
    check overlaps with the mappings around it.

    @ivar listens: the protocol and host of each run of listeners, in map
        order; each run has the ports of C{ports}.
    """

    index: int
    line: int
    name: str | None = None
    listenLine: int = 0
    listens: tuple[tuple[str, str], ...] = ()
    ports: _Ports | None = None
    target: str | None = None
    targetPorts: _Ports | None = None
    settings: _Settings = _Settings()
    tls: TLSSettings | None = None

    def describe(self) -> str:
        if self.name is not None:
            return f"mapping '{self.name}' (line {self.line})"
        return f"the mapping on line {self.line}"


# Overlaps.  Listeners of different protocols or address families never
# collide, so each (protocol, family) is checked alone.  Within one, the
# listeners of a mapping are a few runs of ports on one host each.  A run
# on an address collides with earlier runs on the same address and on the
# family's wildcard; a run on the wildcard with every earlier run.  Runs
# are checked in map order against what earlier mappings claimed, kept as
# intervals: never one object or step per port of a range.


def _anyOverlap(entries: list[_Entry]) -> bool:
    """
    Whether any two listeners of C{entries} collide: one sort and one
    sweep over the runs of each protocol and family.  Most maps have no
    overlap, and this is all they cost.
    """
    groups: dict[tuple[str, bool], list[tuple[int, int, str | None]]] = {}
    for entry in entries:
        ports = entry.ports
        for proto, host in entry.listens:
            assert ports is not None  # an entry with listeners has ports
            family = ":" in host
            wildcard = host in (ANY_IPV4, ANY_IPV6)
            groups.setdefault((proto, family), []).append(
                (ports.first, ports.last, None if wildcard else host)
            )
    for runs in groups.values():
        runs.sort(key=itemgetter(0))
        # The highest port reached so far by every run, by the wildcard's
        # runs, and by each address's runs.
        reachAll = reachWildcard = 0
        reach: dict[str, int] = {}
        for first, last, address in runs:
            if address is None:
                if reachAll >= first:
                    return True
                reachWildcard = max(reachWildcard, last)
            else:
                if reachWildcard >= first or reach.get(address, 0) >= first:
                    return True
                reach[address] = max(reach.get(address, 0), last)
            reachAll = max(reachAll, last)
    return False


class _PortBytes:
    """
    The ports of one protocol and family claimed so far by some set of
    runs, and the first entry to claim each: a byte per port, so counting
    and finding claimed ports of a range is one C-speed scan.
    """

    def __init__(self) -> None:
        self.claimed = bytearray(65536)
        self.owners = array("i", bytes(4 * 65536))

    def count(self, first: int, last: int) -> int:
        return self.claimed.count(1, first, last + 1)

    def lowest(self, first: int, last: int) -> int:
        """
        The lowest claimed port in C{first..last}, or -1.
        """
        return self.claimed.find(1, first, last + 1)

    def claim(self, first: int, last: int, owner: int) -> None:
        """
        Claim the ports of C{first..last} no one claimed yet for C{owner};
        each port is claimed once, so all claims together cost at most one
        step per port of the family.
        """
        claimed, end = self.claimed, last + 1
        start = claimed.find(0, first, end)
        while start >= 0:
            stop = claimed.find(1, start, end)
            if stop < 0:
                stop = end
            claimed[start:stop] = b"\x01" * (stop - start)
            self.owners[start:stop] = array("i", [owner]) * (stop - start)
            start = claimed.find(0, stop, end)


class _AddressClaims:
    """
    The ports one address has claimed so far and the first entry to claim
    each, as sorted intervals: C{starts}/C{ends} their union (merged, so a
    later range walks each interval once before it is merged into it), and
    C{pieces}/C{pieceEnds}/C{owners} the same ports by first owner.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.pieces: list[int] = []
        self.pieceEnds: list[int] = []
        self.owners: list[int] = []

    def within(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """
        The claimed intervals within C{first..last}, in order.
        """
        starts, ends = self.starts, self.ends
        i = bisect_left(ends, first)
        while i < len(starts) and starts[i] <= last:
            yield max(starts[i], first), min(ends[i], last)
            i += 1

    def owner(self, port: int) -> int:
        """
        The first owner of a claimed C{port}.
        """
        return self.owners[bisect_right(self.pieces, port) - 1]

    def claim(self, first: int, last: int, owner: int) -> None:
        gapStart = first
        for start, end in [*self.within(first, last), (last + 1, last + 1)]:
            if gapStart < start:
                at = bisect_left(self.pieces, gapStart)
                self.pieces.insert(at, gapStart)
                self.pieceEnds.insert(at, start - 1)
                self.owners.insert(at, owner)
            gapStart = end + 1
        # Merge [first, last] with the intervals it overlaps or touches.
        i = bisect_left(self.ends, first - 1)
        j = bisect_right(self.starts, last + 1)
        if i < j:
            first = min(first, self.starts[i])
            last = max(last, self.ends[j - 1])
        self.starts[i:j] = [first]
        self.ends[i:j] = [last]


class _FamilyClaims:
    """
    What the runs of one protocol and family claimed so far: C{wildcard}
    the wildcard's runs, C{every} all runs, and C{addresses} each address's.
    """

    def __init__(self) -> None:
        self.wildcard = _PortBytes()
        self.every = _PortBytes()
        self.addresses: dict[str, _AddressClaims] = {}

    def collisions(self, host: str, first: int, last: int) -> tuple[int, int, int]:
        """
        How many ports of the run C{host:first-last} collide with earlier
        runs, the lowest of them, and the earliest entry it collides with;
        C{(0, -1, -1)} when none does.
        """
        wildcard = self.wildcard
        if host in (ANY_IPV4, ANY_IPV6):
            count = self.every.count(first, last)
            port = self.every.lowest(first, last)
            return count, port, self.every.owners[port] if count else -1
        count = wildcard.count(first, last)
        port = wildcard.lowest(first, last)
        owner = wildcard.owners[port] if count else -1
        claims = self.addresses.get(host)
        if claims is not None:
            for start, end in claims.within(first, last):
                count += end - start + 1 - wildcard.count(start, end)
                if port < 0 or start <= port:
                    candidate = claims.owner(start)
                    if port < 0 or start < port or candidate < owner:
                        owner = candidate
                    port = start
        return count, port, owner

    def claim(self, host: str, first: int, last: int, owner: int) -> None:
        if host in (ANY_IPV4, ANY_IPV6):
            self.wildcard.claim(first, last, owner)
        else:
            claims = self.addresses.get(host)
            if claims is None:
                claims = self.addresses[host] = _AddressClaims()
            claims.claim(first, last, owner)
        self.every.claim(first, last, owner)


def _findOverlaps(
    entries: list[_Entry],
) -> Iterator[tuple[_Entry, ListenerKey, _Entry, int]]:
    """
    Each entry with listeners that collide with earlier entries' (in map
    order, a wildcard colliding with every address of its family): its
    first such listener in map order, the first entry that listener
    collides with, and how many of its listeners collide in all.
    """
    if not _anyOverlap(entries):
        return
    families: dict[tuple[str, bool], _FamilyClaims] = {}
    for position, entry in enumerate(entries):
        ports = entry.ports
        if ports is None:
            continue  # no listeners
        protos = [proto for proto, host in entry.listens]
        total = 0
        first: tuple[tuple[int, int, int], ListenerKey, int] | None = None
        for order, (proto, host) in enumerate(entry.listens):
            family = families.get((proto, ":" in host))
            if family is None:
                family = families[(proto, ":" in host)] = _FamilyClaims()
            count, port, owner = family.collisions(host, ports.first, ports.last)
            family.claim(host, ports.first, ports.last, position)
            if count:
                total += count
                # Map order: protocols as written, then ports, then hosts.
                rank = (protos.index(proto), port, order)
                if first is None or rank < first[0]:
                    first = (rank, ListenerKey(proto, host, port), owner)
        if first is not None:
            yield entry, first[1], entries[first[2]], total


class _MapReader:
    """
    One pass over a composed map, collecting every error with its line.
    """

    def __init__(self, path: str, prepared: dict[int, _Prepared] | None = None) -> None:
        self.path = path
        #: The mappings L{_prescan} took out of the text, by line.
        self.prepared: dict[int, _Prepared] = prepared or {}
        self.errors: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []
        #: What was read of each mapping, in map order.
        self.entries: list[_Entry] = []
        #: IPv4 addresses seen, as ipaddress prints them (L{fastAddress}).
        self.ipv4Hosts: set[str] = set()
        #: The L{_Ports} of each single port seen, by its text.
        self.singlePorts: dict[str, _Ports] = {}

    def warning(self, line: int, message: str) -> None:
        self.warnings.append((line, message))

    def error(self, line: int, message: str) -> None:
        self.errors.append((line, message))

    def read(self, root: Node | None) -> ProxyMap:
        """
        Check the map whose node tree is C{root}; the L{ProxyMap} of all
        but its mappings, which L{buildMappings} builds.

        @raise ConfigError: the map breaks a rule; the error lists every
            problem.
        """
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
        self.checkOverlaps(entries)
        manhole = None
        if "manhole" in sections:
            keyNode, valueNode = sections["manhole"]
            manhole = self.readManhole(keyNode, valueNode, entries)
        http = None
        if "http" in sections:
            http = self.readHttp(*sections["http"], entries, manhole)
        logFormat = "text"
        if "log_format" in sections:
            logFormat = self.readLogFormat(sections["log_format"][1]) or logFormat
        control = None
        if "control" in sections:
            control = self.readControl(*sections["control"])
        self.raiseErrors()
        return ProxyMap(
            path=self.path,
            manhole=manhole,
            http=http,
            logFormat=logFormat,
            warnings=tuple(
                f"{self.path}:{line}: warning: {message}"
                for line, message in sorted(self.warnings, key=lambda w: w[0])
            ),
            control=control,
        )

    def buildMappings(self) -> tuple[Mapping, ...]:
        """
        The mappings of a map L{read} found no error in.
        """
        return tuple([_buildMapping(entry) for entry in self.entries])

    def raiseErrors(self) -> None:
        """
        Raise the errors found, if any: sorted by line, each distinct one
        once (an alias repeats a node and its errors), the first
        L{MAX_ERRORS} and then how many more.
        """
        if not self.errors:
            return
        # dict: the first of equal errors, in the order found; a stable
        # sort keeps the errors of one line in that order.
        errors = sorted(dict.fromkeys(self.errors), key=itemgetter(0))
        lines = [
            f"{self.path}:{line}: {message}" for line, message in errors[:MAX_ERRORS]
        ]
        if len(errors) > MAX_ERRORS:
            more = len(errors) - MAX_ERRORS
            lines.append(
                f"{self.path}:{errors[MAX_ERRORS][0]}: and {more} more"
                f" error{'s' if more != 1 else ''}, from this line on"
            )
        raise ConfigError(lines, count=len(errors))

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
                # Scalars and empty mappings ({}, as _prescan leaves) have
                # no keys.
                pending.extend(
                    item
                    for item in reversed(node.value)
                    if type(item) is not ScalarNode
                    and (type(item) is not MappingNode or item.value)
                )
            elif isinstance(node, MappingNode):
                pairs = node.value
                try:
                    # Keys of distinct text are distinct keys: the common
                    # case, checked at once.
                    unique = len({key.value for key, value in pairs}) == len(pairs)
                except TypeError:  # a list or mapping as a key
                    unique = False
                if unique:
                    for _key, value in pairs:
                        if type(value) is not ScalarNode:
                            pending.append(value)
                    continue
                first: dict[tuple, int] = {}
                for keyNode, valueNode in node.value:
                    if isinstance(keyNode, ScalarNode):
                        ident = (keyNode.tag, keyNode.value)
                        if ident in first:
                            self.error(
                                _line(keyNode),
                                f"duplicate key {_quote(keyNode.value)}"
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
            if keyNode.tag == _STR and isinstance(keyNode, ScalarNode):
                name = keyNode.value
                if name in allowed:
                    if name not in result:
                        result[name] = (keyNode, valueNode)
                    continue
            elif keyNode.tag == _MERGE:
                self.error(
                    _line(keyNode),
                    f"{prefix}YAML merge keys ('<<') are not supported;"
                    " put shared settings in defaults",
                )
                continue
            else:
                name = (
                    keyNode.value
                    if isinstance(keyNode, ScalarNode)
                    else _describe(keyNode)
                )
            unknown.append(name)
            self.error(
                _line(keyNode),
                f"{prefix}unknown key {_quote(name)} (expected one of: {', '.join(allowed)})",
            )
        for key in required:
            if key not in result and not difflib.get_close_matches(key, unknown, n=1):
                self.error(_line(node), f"{prefix}missing key '{key}'")
        return result

    def text(self, node: Node, key: str, expected: str, tags=(_STR,)) -> str | None:
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
        self,
        keys: dict[str, tuple[Node, Node]],
        prefix: str,
        base: _Settings,
        scope: str = "",
    ) -> _Settings:
        """
        Override C{base} with the settings among C{keys} (from L{keysOf});
        a bad value is reported and leaves the inherited one.  C{scope}
        names the mapping, whose per-client limits count its own clients
        once it sets one of them.
        """
        if keys.keys().isdisjoint(SETTING_KEYS):
            return base  # what most mappings have: the defaults
        connect, idle, udp = (
            base.timeouts.connect,
            base.timeouts.idle,
            base.timeouts.udp,
        )
        maxConnections = base.maxConnections
        if "connect_timeout" in keys:
            value = self.duration(
                keys["connect_timeout"][1], prefix + "connect_timeout", True
            )
            connect = connect if value is None else value
        if "idle_timeout" in keys:
            value = self.duration(
                keys["idle_timeout"][1], prefix + "idle_timeout", False
            )
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
            node = keys["client_address"][1]
            key = prefix + "client_address"
            modes = " | ".join(CLIENT_ADDRESS_MODES)
            text = self.text(node, key, modes)
            if text is not None and text not in CLIENT_ADDRESS_MODES:
                self.error(
                    _line(node), f"{key}: unknown value '{text}' (expected {modes})"
                )
            elif text is not None:
                clientAddress, line = text, _line(node)
        if "accept_proxy_protocol" in keys:
            node = keys["accept_proxy_protocol"][1]
            key = prefix + "accept_proxy_protocol"
            if isinstance(node, SequenceNode):
                networks = []
                for item in node.value:
                    cidr = self.text(
                        item, key, "a network such as 10.0.0.0/8 or fd00::/8"
                    )
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
        if not identity:
            return  # neither key given: nothing to check
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
        if (
            entry.target is not None
            and _isAddressLiteral(entry.target)
            and _isLoopback(entry.target)
        ):
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
        self,
        keys: dict[str, tuple[Node, Node]],
        prefix: str,
        base: AccessPolicy,
        scope: str,
    ) -> AccessPolicy:
        """
        Override C{base} with the access settings among C{keys}: a list
        given replaces the inherited one, and a mapping that sets any
        per-client limit counts its clients in a scope of its own.
        """
        values: dict[str, Any] = {}
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

    def cidrs(self, node: Node, key: str) -> tuple[str, ...] | None:
        """
        A list of CIDRs as normalized text (C{10.0.0.0/8}); L{None} after
        reporting every bad entry.
        """
        expected = "a list of CIDRs, as in [10.0.0.0/8, 2001:db8::/32]"
        if not isinstance(node, SequenceNode):
            self.error(
                _line(node), f"{key}: expected {expected}, got {_describe(node)}"
            )
            return None
        # Here, not at the top: the access module loads Twisted's logger,
        # which C{check} of a map without lists never needs.
        from twistedproxy.access import parseNetwork

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
                    self.error(
                        _line(parts["burst"][1]),
                        f"{key}.burst: must be at least 1, got 0",
                    )
                    return None
            node = parts["rate"][1]
        if isinstance(node, ScalarNode) and node.tag == _INT and node.value == "0":
            return _UNLIMITED
        text = self.text(node, key, _RATE_FORMS, (_STR,))
        if text is None:
            return None
        match = _RATE.fullmatch(text.replace(" ", ""))
        if match is None:
            self.error(
                _line(node), f"{key}: '{text}' is not a rate (expected {_RATE_FORMS})"
            )
            return None
        perSecond = float(match.group(1))
        if perSecond == 0:
            return _UNLIMITED
        if burst is None:
            burst = max(1, math.ceil(perSecond))
        return Rate(perSecond, burst)

    def duration(self, node: Node, key: str, positive: bool) -> float | None:
        """
        Seconds from a decimal number or a string of one with a unit;
        L{None} after reporting a bad value.
        """
        expected = f"a duration ({_DURATION_FORMS})"
        text = self.text(node, key, expected, (_INT, _FLOAT, _STR))
        if text is None:
            return None
        if node.tag == _STR:
            match = _DURATION.fullmatch(text)
            if match is None:
                self.error(
                    _line(node),
                    f"{key}: {_quote(text)} is not a duration ({_DURATION_FORMS})",
                )
                return None
            number, unit = match.group(1), match.group(2)
        else:
            number, unit = text, "s"
        if text.lower().lstrip("+-") in (".inf", ".nan"):
            self.error(_line(node), f"{key}: expected a finite duration, got {text}")
            return None
        negative = number.startswith("-") and number != "-"
        if _DECIMAL.fullmatch(number[negative:]) is None:
            self.error(_line(node), f"{key}: {_notDecimal(number, node.tag)}")
            return None
        # float() of a decimal string is never an error; past 1.8e308 it
        # is inf.
        seconds = float(number) * _UNIT_SECONDS[unit]
        if not math.isfinite(seconds):
            self.error(_line(node), f"{key}: {_quote(text)} is too long a duration")
            return None
        if positive and seconds <= 0:
            self.error(
                _line(node),
                f"{key}: must be more than 0, got {_quote(text, quotes=False)}",
            )
            return None
        if seconds < 0:
            self.error(
                _line(node),
                f"{key}: must not be negative, got {_quote(text, quotes=False)}",
            )
            return None
        return seconds

    def count(self, node: Node, key: str) -> int | None:
        text = self.text(node, key, "a whole number (0 is unlimited)", (_INT,))
        if text is None:
            return None
        value = self.wholeNumber(text, node, key)
        if value is not None and value < 0:
            self.error(
                _line(node),
                f"{key}: must not be negative, got {_quote(text, quotes=False)}",
            )
            return None
        return value

    def wholeNumber(self, text: str, node: Node, key: str) -> int | None:
        """
        The value of a whole number written in decimal digits, optionally
        negative, at most L{MAX_WHOLE}; L{None} after reporting anything
        else.
        """
        digits = text[1:] if text.startswith("-") else text
        if _WHOLE.fullmatch(digits) is None:
            self.error(_line(node), f"{key}: {_notDecimal(text, node.tag)}")
            return None
        if len(digits) > len(str(MAX_WHOLE)) or int(digits) > MAX_WHOLE:
            self.error(
                _line(node), f"{key}: {_quote(text)} is too large (at most {MAX_WHOLE})"
            )
            return None
        return int(text)

    # mappings

    def readMappings(self, node: Node, defaults: _Settings) -> list[_Entry]:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, SequenceNode):
            self.error(
                _line(node),
                f"mappings: expected a list of mappings, got {_describe(node)}",
            )
            return []
        entries = self.entries
        names: dict[str, int] = {}
        # An alias (- *web) repeats a mapping node: reported once per node
        # with a count, and not read again.
        read: dict[int, int] = {}
        repeats: dict[int, list[int]] = {}
        for index, item in enumerate(node.value):
            if id(item) in read:
                repeats.setdefault(read[id(item)], []).append(index)
                continue
            read[id(item)] = index
            entry = None
            if type(item) is MappingNode:
                entry = self.readPlainMapping(index, item, defaults, names)
                if entry is None and not item.value and _line(item) in self.prepared:
                    # Taken out of the text by _prescan, and so no longer
                    # here for readMapping to explain.
                    raise _Abandon()
            if entry is None:
                entry = self.readMapping(index, item, defaults, names)
            if entry is not None:
                entries.append(entry)
        for first, indexes in repeats.items():
            more = f" and {len(indexes) - 1} more" if len(indexes) > 1 else ""
            self.error(
                _line(node.value[first]),
                f"mappings[{first}]: an alias repeats it as mappings[{indexes[0]}]{more};"
                " list each mapping once",
            )
        return entries

    def readPlainMapping(
        self, index: int, node: MappingNode, defaults: _Settings, names: dict[str, int]
    ) -> _Entry | None:
        """
        Read at once the mapping most maps are made of: C{listen} and
        C{target}, both C{IPV4:PORT}, and perhaps a C{name} not taken, each
        once and a plain string.  The entry is the one L{readMapping}
        makes of it, at a third of the cost; for any other mapping, or any
        problem, L{None}, and L{readMapping} reads it and reports.
        """
        pairs = node.value
        if not pairs and self.prepared:
            line = _line(node)
            prepared = self.prepared.get(line)
            if prepared is None:
                return None
            return self.readPlainTexts(index, line, line, *prepared, defaults, names)
        if not 2 <= len(pairs) <= 3:
            return None
        values: dict[str, ScalarNode] = {}
        for keyNode, valueNode in pairs:
            key = keyNode.value
            if (
                type(keyNode) is not ScalarNode
                or type(valueNode) is not ScalarNode
                or keyNode.tag != _STR
                or valueNode.tag != _STR
                or key not in _PLAIN_KEYS
                or key in values
            ):
                return None
            values[key] = valueNode
        if "listen" not in values or "target" not in values:
            return None
        nameNode = values.get("name")
        listenNode = values["listen"]
        return self.readPlainTexts(
            index,
            _line(node),
            _line(listenNode),
            None if nameNode is None else nameNode.value,
            listenNode.value,
            values["target"].value,
            defaults,
            names,
        )

    def readPlainTexts(
        self,
        index: int,
        line: int,
        listenLine: int,
        name: str | None,
        listenText: str,
        targetText: str,
        defaults: _Settings,
        names: dict[str, int],
    ) -> _Entry | None:
        """
        L{readPlainMapping} of the mapping on C{line} from the texts of its
        values, all plain strings to YAML.
        """
        listen = self.fastAddress(listenText)
        target = self.fastAddress(targetText)
        if listen is None or target is None or target[0] == ANY_IPV4:
            return None
        if name is None:
            name = f"{TCP}-{listenText}"
        elif _NAME.fullmatch(name) is None:
            return None
        if name in names:
            return None
        names[name] = line
        host, ports = listen
        entry = _Entry(
            index,
            line,
            name,
            listenLine,
            ((TCP, host),),
            ports,
            target[0],
            target[1],
            defaults,
        )
        if defaults.identity.clientAddress:
            # Only the client_address of defaults can be wrong for it.
            self.checkIdentity(entry, [TCP])
        return entry

    def readMapping(
        self, index: int, node: Node, defaults: _Settings, names: dict[str, int]
    ) -> _Entry | None:
        where = f"mappings[{index}]"
        if not isinstance(node, MappingNode):
            self.error(
                _line(node),
                f"{where}: expected a mapping with listen and target, got {_describe(node)}",
            )
            return None
        entry = _Entry(index=index, line=_line(node))
        keys = self.keysOf(node, where, MAPPING_KEYS, ("listen", "target"))

        protos: list[str] | None = [TCP]
        if "proto" in keys:
            protos = self.readProtos(keys["proto"][1])

        listenText = host = ports = None
        if "listen" in keys:
            listenNode = keys["listen"][1]
            entry.listenLine = _line(listenNode)
            listenText = self.text(listenNode, "listen", _LISTEN_FORM, (_STR, _INT))
            if listenText is not None:
                parsed = self.listenAddress(
                    listenText, listenNode, "listen", _LISTEN_FORM
                )
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
            if (
                ports is not None
                and targetPorts is not None
                and targetPorts.first != targetPorts.last
                and len(targetPorts) != len(ports)
            ):
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
        if not keys.keys().isdisjoint(TLS_MAPPING_KEYS):
            entry.tls = self.readTLS(keys, protos, entry.name)

        if protos is not None and ports is not None:
            hosts = (host,) if host is not None else (ANY_IPV4, ANY_IPV6)
            entry.listens = tuple([(proto, h) for proto in protos for h in hosts])
        entry.ports, entry.target, entry.targetPorts = ports, target, targetPorts
        entry.settings = settings
        if protos is not None:
            self.checkIdentity(entry, protos)
        return entry

    def readProtos(self, node: Node) -> list[str] | None:
        expected = "tcp, udp or a list of them"
        if isinstance(node, SequenceNode):
            items = node.value
            if not items:
                self.error(
                    _line(node), "proto: the list is empty (expected tcp, udp or both)"
                )
                return None
            if len(items) > len(PROTOCOLS):
                # Not item by item: an alias may repeat a long list in
                # every mapping.
                self.error(
                    _line(node),
                    f"proto: a list of {len(items)} items (expected tcp, udp or both)",
                )
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
                self.error(
                    _line(item),
                    f"proto: {_quote(proto)} is not a protocol (expected tcp or udp)",
                )
                good = False
            elif proto in protos:
                self.error(_line(item), f"proto: {_quote(proto)} is listed twice")
                good = False
            else:
                protos.append(proto)
        return protos if good else None

    def readName(
        self,
        entry: _Entry,
        keys: dict[str, tuple[Node, Node]],
        protos: list[str] | None,
        listenText: str | None,
        names: dict[str, int],
    ) -> str | None:
        """
        The mapping's name, given or by default C{<proto>-<listen>}; it
        must be unique, and C{names} remembers the ones taken.
        """
        if "name" in keys:
            nameNode = keys["name"][1]
            line = _line(nameNode)
            expected = "a name of letters, digits, '.', '_' and '-'"
            # YAML reads 80 as a number and yes/no/on/off as booleans.
            if isinstance(nameNode, ScalarNode) and nameNode.tag in (
                _INT,
                _FLOAT,
                _BOOL,
            ):
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
                    line,
                    f"name: {_quote(name)} may only contain letters, digits, '.', '_' and '-'",
                )
                return None
            if name in names:
                self.error(
                    line,
                    f"name: '{name}' is already used by the mapping on line {names[name]}",
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
                f"mappings[{entry.index}]: its default name {_quote(name)} is already used"
                f" by the mapping on line {names[name]}; give it a name",
            )
        else:
            names[name] = entry.line
        return name

    # addresses

    def fastAddress(self, text: str) -> tuple[str, _Ports] | None:
        """
        The host and port of C{IPV4:PORT} in the form ipaddress prints,
        the common case, read without regular expressions once its host
        has been seen; L{None} for anything else, which the full parser
        then reads or explains.
        """
        host, _, portText = text.partition(":")
        if host not in self.ipv4Hosts:
            if _IPV4.fullmatch(host) is None:
                return None
            self.ipv4Hosts.add(host)
        ports = self.singlePorts.get(portText)
        if ports is None:
            if not (
                0 < len(portText) <= 5
                and portText.isascii()
                and portText.isdigit()
                and portText[0] != "0"
                and int(portText) <= 65535
            ):
                return None
            ports = self.singlePorts[portText] = _Ports(
                int(portText), int(portText), portText
            )
        return host, ports

    def ports(self, text: str, node: Node, key: str) -> _Ports | None:
        if len(text) < 5 and text.isascii() and text.isdigit() and text[0] != "0":
            ports = self.singlePorts.get(text)
            if ports is None:
                # the common case, a single port below 10000
                ports = self.singlePorts[text] = _Ports(int(text), int(text), text)
            return ports
        match = _PORTS.fullmatch(text)
        if match is None:
            self.error(
                _line(node),
                f"{key}: {_quote(text)} is not a port or a port range (expected PORT or FIRST-LAST)",
            )
            return None
        bounds = []
        for digits in match.groups(match.group(1)):
            if _WHOLE.fullmatch(digits) is None:
                self.error(_line(node), f"{key}: port {_notDecimal(digits)}")
                return None
            # More than five digits is out of range whatever they are.
            if len(digits) > 5 or not 1 <= int(digits) <= 65535:
                self.error(
                    _line(node),
                    f"{key}: port {_quote(digits, quotes=False)} is out of range (1-65535)",
                )
                return None
            bounds.append(int(digits))
        first, last = bounds
        if first > last:
            self.error(
                _line(node),
                f"{key}: range {text} runs backwards (FIRST must not be more than LAST)",
            )
            return None
        return _Ports(first, last, text)

    def splitHostPort(
        self, text: str, node: Node, key: str, form: str
    ) -> tuple[str | None, bool, str] | None:
        """
        Split C{[HOST:]PORTS} into the host (L{None} when there is none),
        whether it was bracketed, and the ports; L{None} after reporting.
        """
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                self.error(
                    _line(node), f"{key}: '[' without a matching ']' in {_quote(text)}"
                )
                return None
            rest = text[close + 1 :]
            if not rest:
                self.error(
                    _line(node), f"{key}: {_quote(text)} has no port (expected {form})"
                )
                return None
            if not rest.startswith(":"):
                self.error(
                    _line(node),
                    f"{key}: expected ':' after ']' in {_quote(text)} (expected {form})",
                )
                return None
            return text[1:close], True, rest[1:]
        if text.count(":") > 1:
            self.error(
                _line(node),
                f"{key}: an IPv6 address must be in brackets, as in [::1]:8080 ({_quote(text)})",
            )
            return None
        if ":" not in text:
            if _PORTS.fullmatch(text) is None and _looksLikeHost(text):
                self.error(
                    _line(node), f"{key}: {_quote(text)} has no port (expected {form})"
                )
                return None
            return None, False, text
        host, _, portText = text.rpartition(":")
        if not host:
            self.error(
                _line(node), f"{key}: the host before ':' is empty in {_quote(text)}"
            )
            return None
        return host, False, portText

    def listenAddress(
        self, text: str, node: Node, key: str, form: str
    ) -> tuple[str | None, _Ports] | None:
        """
        A C{listen} value as a normalized host (L{None}: every interface)
        and its ports; L{None} after reporting a bad value.
        """
        fast = self.fastAddress(text)
        if fast is not None:
            return fast
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
                self.error(
                    _line(node), f"{key}: {_notAnAddress(rawHost, bracketed, False)}"
                )
        ports = self.ports(portText, node, key)
        if not good or ports is None:
            return None
        return host, ports

    def targetAddress(self, text: str, node: Node) -> tuple[str, _Ports] | None:
        """
        A C{target} value as a host (normalized IP literal or a host name)
        and its ports; L{None} after reporting a bad value.
        """
        fast = self.fastAddress(text)
        if fast is not None and fast[0] != ANY_IPV4:
            return fast
        form = "HOST:PORT or HOST:FIRST-LAST"
        split = self.splitHostPort(text, node, "target", form)
        if split is None:
            return None
        rawHost, bracketed, portText = split
        if rawHost is None:
            self.error(
                _line(node), f"target: {_quote(text)} has no host (expected {form})"
            )
            return None
        host = _ipLiteral(rawHost, bracketed)
        good = True
        if host is None:
            if not bracketed and _isHostName(rawHost):
                host = rawHost
            else:
                good = False
                self.error(
                    _line(node), f"target: {_notAnAddress(rawHost, bracketed, True)}"
                )
        elif host in (ANY_IPV4, ANY_IPV6):
            good = False
            self.error(
                _line(node),
                f"target: {rawHost} is the wildcard address, not one to connect to",
            )
        ports = self.ports(portText, node, "target")
        if not good or host is None or ports is None:
            return None
        return host, ports

    def filePath(self, node: Node, key: str) -> str | None:
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
        if not _usablePath(value):
            self.error(
                _line(node),
                f"{key}: {_quote(value)} is not a usable path"
                " (it has control characters or is not valid text)",
            )
            return None
        return os.path.abspath(os.path.join(os.path.dirname(self.path), value))

    # TLS (docs/tls.md)

    def readTLS(
        self,
        keys: dict[str, tuple[Node, Node]],
        protos: list[str] | None,
        name: str | None,
    ) -> TLSSettings | None:
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
                self.error(
                    _line(keys[key][0]),
                    f"{key}: TLS is for TCP only, and this mapping has proto udp",
                )
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

    def readServerTLS(self, node: Node, where: str) -> ServerTLS | None:
        if not isinstance(node, MappingNode):
            self.error(
                _line(node),
                f"tls: expected a mapping of {', '.join(TLS_KEYS)}, got {_describe(node)}",
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
                        self.keysOf(
                            valueNode, prefix, ("cert", "key"), ("cert", "key")
                        ),
                        prefix,
                        where,
                    )
                    if serverName is not None and pair is not None:
                        byName.append((serverName, pair))
        clientCA = clientCAPem = None
        if "client_ca" in keys:
            clientCA, clientCAPem = self.readAuthorities(
                keys["client_ca"][1], "tls.client_ca", where
            )
        minVersion = self.tlsVersion(keys, "tls")
        if default is None or minVersion is None:
            return None
        return ServerTLS(default, tuple(byName), clientCA, clientCAPem, minVersion)

    def readTargetTLS(self, node: Node, where: str) -> TargetTLS | None:
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            if not _scalars.construct_yaml_bool(node):
                self.error(
                    _line(node),
                    "target_tls: leave it out to speak plain TCP to the target",
                )
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
            serverName = self.serverName(
                keys["server_name"][1], "target_tls.server_name", False
            )
        if "verify" in keys:
            verifyNode = keys["verify"][1]
            if (
                self.text(verifyNode, "target_tls.verify", "true or false", (_BOOL,))
                is not None
            ):
                verify = _scalars.construct_yaml_bool(verifyNode)
                if not verify:
                    self.warning(
                        _line(verifyNode),
                        "target_tls.verify is false: the target's certificate is not checked,"
                        f" so anyone between the proxy and the target can read and change the traffic{where}",
                    )
        if ("cert" in keys) != ("key" in keys):
            missing = "key" if "cert" in keys else "cert"
            self.error(
                _line(node),
                f"target_tls: a client certificate needs both cert and key (missing {missing})",
            )
        elif "cert" in keys:
            client = self.readKeyPair(keys, "target_tls", where)
        minVersion = self.tlsVersion(keys, "target_tls")
        if minVersion is None:
            return None
        return TargetTLS(ca, caPem, serverName, verify, client, minVersion)

    def readSNIRoutes(self, node: Node) -> tuple[tuple[str, Target], ...]:
        expected = "a mapping of server names (NAME or *.SUFFIX) to HOST:PORT targets"
        if not isinstance(node, MappingNode) or not node.value:
            self.error(
                _line(node), f"sni_routes: expected {expected}, got {_describe(node)}"
            )
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
                self.error(
                    _line(valueNode), f"{key}: expected one port, got {ports.text}"
                )
                continue
            if serverName is not None:
                routes.append((serverName, Target(host, ports.first)))
        return tuple(routes)

    def serverName(self, node: Node, key: str, wildcard: bool = True) -> str | None:
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
    ) -> KeyPair | None:
        if "cert" not in keys or "key" not in keys:
            return None
        certPath = self.filePath(keys["cert"][1], f"{prefix}.cert")
        keyPath = self.filePath(keys["key"][1], f"{prefix}.key")
        if certPath is None or keyPath is None:
            return None
        tls = _tlsModule()
        try:
            pair = tls.readKeyPair(certPath, keyPath)
        except tls.TLSFileError as e:
            self.error(_line(keys["key"][1]), f"{prefix}: {e}{where}")
            return None
        problem = tls.keyFileWarning(keyPath)
        if problem is not None:
            self.warning(_line(keys["key"][1]), f"{prefix}.key: {problem}{where}")
        return pair

    def readAuthorities(
        self, node: Node, key: str, where: str
    ) -> tuple[str | None, bytes | None]:
        path = self.filePath(node, key)
        if path is None:
            return None, None
        tls = _tlsModule()
        try:
            return path, tls.readAuthorities(path)
        except tls.TLSFileError as e:
            self.error(_line(node), f"{key}: {e}{where}")
            return None, None

    def tlsVersion(self, keys: dict[str, tuple[Node, Node]], prefix: str) -> str | None:
        if "min_version" not in keys:
            return "1.2"
        node = keys["min_version"][1]
        text = self.text(node, f"{prefix}.min_version", "1.2 or 1.3", (_STR, _FLOAT))
        if text is None:
            return None
        if text not in _tlsModule().VERSIONS:
            self.error(
                _line(node), f"{prefix}.min_version: expected 1.2 or 1.3, got {text}"
            )
            return None
        return text

    # overlaps and the manhole

    def checkOverlaps(self, entries: list[_Entry]) -> None:
        """
        Report each mapping whose listeners collide with earlier mappings'
        once, on its C{listen} line: its first such listener, the first
        mapping that one collides with, and how many more collide.
        """
        for entry, key, earlier, count in _findOverlaps(entries):
            message = f"listen: {key} overlaps {earlier.describe()}"
            if count == 2:
                message += "; 1 more of its listeners overlaps an earlier mapping"
            elif count > 2:
                message += (
                    f"; {count - 1} more of its listeners overlap earlier mappings"
                )
            self.error(entry.listenLine, message)

    def readManhole(
        self, keyNode: Node, node: Node, entries: list[_Entry]
    ) -> Manhole | None:
        """
        The manhole section, which may not collide with the TCP listeners
        of C{entries}; L{None} when the section is empty or has errors.
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
        keys = self.keysOf(
            node, "manhole", MANHOLE_KEYS, ("listen", "authorized_keys", "host_key")
        )

        host, port, allowRemote = self.serviceListen(keys, "manhole", entries)

        paths = {}
        for key in ("authorized_keys", "host_key"):
            if key in keys:
                path = self.filePath(keys[key][1], f"manhole.{key}")
                if path is not None:
                    paths[key] = path

        limits: dict[str, Any] = {}
        if "login_grace_time" in keys:
            limits["loginGraceTime"] = self.duration(
                keys["login_grace_time"][1], "manhole.login_grace_time", True
            )
        if "max_startups" in keys:
            limits["maxStartups"] = self.count(
                keys["max_startups"][1], "manhole.max_startups"
            )

        if len(self.errors) != errorsBefore or host is None or port is None:
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
        self,
        keys: dict[str, tuple[Node, Node]],
        section: str,
        entries: list[_Entry],
        default: tuple[str, int] | None = None,
    ) -> tuple[str | None, int | None, bool]:
        """
        The C{listen} and C{allow_remote} of a section that serves one TCP
        port of its own (the manhole, the HTTP endpoint): one port, on
        loopback unless C{allow_remote} is true, overlapping no listener in
        C{entries}.  A missing C{listen} is C{default}.

        @return: host, port (L{None} after an error) and C{allow_remote}.
        """
        allowRemote = False
        if "allow_remote" in keys:
            remoteNode = keys["allow_remote"][1]
            if (
                self.text(
                    remoteNode, f"{section}.allow_remote", "true or false", (_BOOL,)
                )
                is not None
            ):
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
            self.error(
                _line(listenNode), f"{where}: expected one port, got {ports.text}"
            )
            return None, None, allowRemote
        port = ports.first
        if not allowRemote and not _isLoopback(host):
            self.error(
                _line(listenNode),
                f"{where}: {host} is not a loopback address;"
                f" add allow_remote: true to let other hosts {_REMOTE_USE[section]}",
            )
        clash = next(
            (
                entry
                for entry in entries
                if entry.ports is not None
                and entry.ports.first <= port <= entry.ports.last
                and any(
                    proto == TCP and _overlaps(other, host)
                    for proto, other in entry.listens
                )
            ),
            None,
        )
        if clash is not None:
            self.error(
                _line(listenNode),
                f"{where}: tcp {formatHostPort(host, port)} overlaps {clash.describe()}",
            )
        return host, port, allowRemote

    def readHttp(
        self, keyNode: Node, node: Node, entries: list[_Entry], manhole: Manhole | None
    ) -> Http | None:
        """
        The C{http} section (C{http: {}} listens on L{HTTP_LISTEN}); it may
        not collide with the TCP listeners of C{entries} nor the manhole.
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
            keys, "http", entries, (defaultHost, int(defaultPort))
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

    def readLogFormat(self, node: Node) -> str | None:
        value = self.text(node, "log_format", " or ".join(LOG_FORMATS))
        if value is not None and value not in LOG_FORMATS:
            self.error(
                _line(node),
                f"log_format: expected {' or '.join(LOG_FORMATS)}, got '{value}'",
            )
            return None
        return value

    def readControl(self, keyNode: Node, node: Node) -> Control | None:
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
            text = self.text(
                modeNode, "control.mode", "a file mode such as 0600", (_INT, _STR)
            )
            if text is not None:
                digits = text[2:] if text[:2] in ("0o", "0O") else text
                if (
                    re.fullmatch(r"[0-7]{1,4}", digits) is None
                    or int(digits, 8) > 0o777
                ):
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
    The L{Mapping} of an entry of a map without errors.  A range becomes
    one L{Listener} per port and protocol and host: 262,140 for
    C{proto: [tcp, udp]} and C{listen: 1-65535}, a fraction of a second.
    """
    ports, targetPorts = entry.ports, entry.targetPorts
    name, line, targetHost = entry.name, entry.line, entry.target
    # Read without errors, so every part is there.
    assert ports is not None and targetPorts is not None
    assert name is not None and targetHost is not None
    settings = entry.settings
    # What every listener of the mapping has after its port and target.
    shared = (
        settings.timeouts,
        settings.maxConnections,
        settings.identity,
        settings.access,
        line,
        entry.tls,
    )
    if ports.first == ports.last and len(entry.listens) == 1:
        # One port on one host, as most mappings: one listener (and then
        # the target is one port too).
        ((proto, host),) = entry.listens
        target = Target(targetHost, targetPorts.first)
        return Mapping(
            name, (Listener(name, proto, host, ports.first, target, *shared),), line
        )
    # A single target port takes every listen port; a range pairs up port
    # by port (the reader checked that the lengths agree).
    if len(targetPorts) == 1:
        single = Target(targetHost, targetPorts.first)
        targets = [single] * len(ports)
    else:
        targets = [
            Target(targetHost, port)
            for port in range(targetPorts.first, targetPorts.last + 1)
        ]
    byProto: dict[str, list[str]] = {}
    for proto, host in entry.listens:
        byProto.setdefault(proto, []).append(host)
    listeners = tuple(
        [
            Listener(name, proto, host, port, target, *shared)
            for proto, hosts in byProto.items()
            for port, target in zip(
                range(ports.first, ports.last + 1), targets, strict=True
            )
            for host in hosts
        ]
    )
    return Mapping(name, listeners, line)


def _usablePath(path: str) -> bool:
    """
    Whether the system can open C{path}: no NUL (nor, as a path a person
    means, any other control character), and text the file system can
    encode (no lone surrogates).
    """
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in path):
        return False
    try:
        os.fsencode(path)
    except UnicodeError:
        return False
    return True


def _ipLiteral(host: str, bracketed: bool) -> str | None:
    """
    The normalized text of an IP literal (IPv6 when C{bracketed}, IPv4
    otherwise), or L{None} when C{host} is not one.
    """
    if not bracketed and _IPV4.fullmatch(host):
        return host
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
            return f"{_quote(f'[{host}]')}: IPv6 zone indexes ('%') are not supported"
        return (
            f"{_quote(f'[{host}]')} is not an IPv6 address (brackets are for IPv6 only)"
        )
    if re.fullmatch(r"[0-9.]+", host):
        return f"{_quote(host)} is not a valid IPv4 address"
    if nameAllowed:
        return f"{_quote(host)} is not an IP address or a host name"
    return (
        f"{_quote(host)} is not an IP address (listen takes an IPv4 address"
        " or a bracketed IPv6 address such as [::1])"
    )
