"""
Property-based tests of the map loader (hypothesis): whatever the file
holds, L{twistedproxy.config.parseMap} gives a L{ProxyMap} or only
C{FILE:LINE: message} lines, never another exception, in bounded time; and
the interval-based overlap check agrees with checking port by port.

The examples are derandomized (the same ones every run, in CI too) and
few, so the suite stays fast; C{HYPOTHESIS_PROFILE=thorough} runs many
more, with a random seed, to look for new failures.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistedproxy.config import ConfigError, parseMap
from twistedproxy.model import ANY_IPV4, ANY_IPV6, ProxyMap

settings.register_profile(
    "ci",
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Seconds one map of these sizes may take, on a slow shared machine; they
#: take milliseconds.
BOUND = 5.0

_LINE = re.compile(r"map\.yaml:[0-9]+: .+")


def assertLoads(text: str) -> None:
    """
    C{text} gives a map, or at most 101 one-line printable errors each of
    the form C{map.yaml:LINE: message}; within L{BOUND} seconds.
    """
    started = time.monotonic()
    try:
        result = parseMap(text, "map.yaml")
    except ConfigError as e:
        assert 1 <= len(e.errors) <= 101, e.errors
        assert e.count >= len(e.errors)
        for line in e.errors:
            assert _LINE.fullmatch(line), line
            assert line.isprintable(), line
            line.encode("utf-8")
    else:
        assert isinstance(result, ProxyMap)
    assert time.monotonic() - started < BOUND


# Structured maps: keys and values drawn from what a map holds, what a
# careless or hostile author writes instead, and aliases.

_NUMBERS = [
    "0",
    "1",
    "80",
    "65535",
    "65536",
    "70000",
    "017",
    "0x10",
    "0b11",
    "+5",
    "-1",
    "1_000",
    "1:30",
    "1:30.5",
    "1.5",
    ".5",
    "5.",
    "1.5e+3",
    ".inf",
    "-.inf",
    ".nan",
    "9" * 400,
    "1" * 5000,
    "9223372036854775808",
]
_DURATIONS = [
    "5s",
    "250ms",
    "2m",
    "1h",
    "0s",
    "017s",
    "1.5s",
    ".5s",
    "5 sec",
    "5d",
    "-5s",
]
_HOSTS = [
    "",
    "127.0.0.1:",
    "0.0.0.0:",
    "[::1]:",
    "[::]:",
    "10.0.0.1:",
    "db:",
    "my_db.local:",
    "[fe80::1%eth0]:",
    "256.1.1.1:",
    "localhost:",
    "[127.0.0.1]:",
    "::1:",
    "[::1",
]
_CHARS = [
    "\n",
    "\t",
    "\x1b",
    "\x00",
    "\x7f",
    "\u2028",
    "\x85",
    "\\",
    "'",
    '"',
    "\ufeff",
    "é",
    "😀",
]
_KEYS = [
    "name",
    "proto",
    "listen",
    "target",
    "connect_timeout",
    "idle_timeout",
    "udp_timeout",
    "max_connections",
    "tagret",
    "<<",
    "1",
    "",
]


def _quoted(text: str) -> str:
    """
    A YAML double-quoted scalar of C{text} (JSON's escapes are YAML's).
    """
    return json.dumps(text, ensure_ascii=True)


@st.composite
def scalars(draw) -> str:
    """
    One YAML scalar token: a port, range, address, number, duration,
    protocol, name or odd text, plain or quoted.
    """
    kind = draw(
        st.sampled_from(
            ["port", "range", "address", "number", "duration", "word", "odd"]
        )
    )
    if kind == "port":
        text = str(draw(st.integers(0, 70000)))
    elif kind == "range":
        first = draw(st.integers(0, 66000))
        text = f"{first}-{first + draw(st.integers(-3, 70000))}"
    elif kind == "address":
        port = draw(st.sampled_from(["80", "8000-8009", "1-65535", "017", "0", "x"]))
        text = draw(st.sampled_from(_HOSTS)) + port
    elif kind == "number":
        text = draw(st.sampled_from(_NUMBERS))
    elif kind == "duration":
        text = draw(st.sampled_from(_DURATIONS))
    elif kind == "word":
        text = draw(
            st.sampled_from(
                ["tcp", "udp", "sctp", "true", "no", "null", "~", "web", "a.b-c_d"]
            )
        )
    else:
        text = draw(
            st.text(st.sampled_from(_CHARS + list("ab:-[]{},#&*!|>%@` ")), max_size=12)
        )
    if kind != "odd" and draw(st.booleans()):
        return text if not text.startswith("[") else _quoted(text)
    return _quoted(text)


@st.composite
def values(draw, anchors: list[str]) -> str:
    """
    A value in flow style: a scalar, a list of them, a small mapping, or an
    alias to an anchor defined earlier.
    """
    kind = draw(
        st.sampled_from(["scalar", "scalar", "scalar", "list", "mapping", "alias"])
    )
    if kind == "alias" and anchors:
        return "*" + draw(st.sampled_from(anchors))
    if kind == "list":
        return "[" + ", ".join(draw(st.lists(scalars(), max_size=4))) + "]"
    if kind == "mapping":
        return (
            "{"
            + ", ".join(
                f"{k}: {v}"
                for k, v in draw(st.lists(st.tuples(scalars(), scalars()), max_size=2))
            )
            + "}"
        )
    return draw(scalars())


@st.composite
def maps(draw) -> str:
    """
    The text of a map: optional defaults, mappings (some anchored, some
    repeated by aliases, some with values aliased), optional manhole.
    """
    anchors: list[str] = []
    lines = []
    if draw(st.booleans()):
        lines.append("defaults:")
        for key in draw(st.lists(st.sampled_from(_KEYS[4:]), max_size=3)):
            lines.append(f"  {key}: {draw(values(anchors))}")
    lines.append("mappings:")
    for index in range(draw(st.integers(0, 12))):
        if anchors and draw(st.integers(0, 5)) == 0:
            lines.append(f"  - *{draw(st.sampled_from(anchors))}")
            continue
        pairs = []
        for key in draw(st.lists(st.sampled_from(_KEYS), min_size=1, max_size=6)):
            value = draw(values(anchors))
            if draw(st.integers(0, 4)) == 0 and not value.startswith("*"):
                anchor = f"v{index}{(key.isalpha() and key) or 'k'}"
                anchors.append(anchor)
                value = f"&{anchor} {value}"
            key = key if key.isidentifier() else _quoted(key)
            pairs.append(f"{key}: {value}")
        anchor = ""
        if draw(st.booleans()):
            anchor = f"&m{index} "
            anchors.append(f"m{index}")
        lines.append(f"  - {anchor}{{{', '.join(pairs)}}}")
    if draw(st.booleans()):
        lines.append("manhole:")
        for key in draw(
            st.lists(
                st.sampled_from(
                    ["listen", "authorized_keys", "host_key", "allow_remote", "x"]
                ),
                max_size=5,
            )
        ):
            lines.append(f"  {key}: {draw(values(anchors))}")
    return "\n".join(lines) + "\n"


@PROFILE
@given(maps())
def test_structuredMapsLoadOrExplain(text: str) -> None:
    """
    A map of random keys, values, ranges, hosts, numbers, durations and
    aliases loads, or gives only one-line C{FILE:LINE: message} errors, at
    most 101, quickly.
    """
    assertLoads(text)


@PROFILE
@given(
    st.text(
        st.sampled_from(_CHARS + list("mapingslterd:-[]{},#&*!|>%@`'\"0123456789 \n.")),
        max_size=200,
    )
)
def test_rawTextLoadsOrExplains(text: str) -> None:
    """
    Any text at all, control characters and broken YAML included, loads
    or gives only one-line C{FILE:LINE: message} errors.
    """
    assertLoads(text)


@PROFILE
@given(maps(), st.data())
def test_mutatedMapsLoadOrExplain(text: str, data) -> None:
    """
    A map with random characters inserted or removed still loads or gives
    only one-line C{FILE:LINE: message} errors.
    """
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = (
                text[:at]
                + data.draw(st.sampled_from(_CHARS + list(":-[]{}&*'\" ")))
                + text[at:]
            )
        else:
            text = text[:at] + text[at + 1 :]
    assertLoads(text)


# Overlaps: the interval check against port by port.

_LISTEN_HOSTS = [None, "127.0.0.1", "127.0.0.2", "0.0.0.0", "::1", "::"]


def _collide(a: str, b: str) -> bool:
    if a == b:
        return True
    if ANY_IPV4 in (a, b):
        return ":" not in a + b
    if ANY_IPV6 in (a, b):
        return ":" in a and ":" in b
    return False


def _expectedOverlaps(mappings) -> list[str]:
    """
    The overlap errors, found by expanding every listener and comparing it
    with every earlier mapping's.
    """
    expanded = []
    for protos, host, first, last in mappings:
        hosts = [host] if host is not None else [ANY_IPV4, ANY_IPV6]
        expanded.append(
            [
                (p, h, port)
                for p in protos
                for port in range(first, last + 1)
                for h in hosts
            ]
        )
    errors = []
    for index, listeners in enumerate(expanded):
        count, firstHit = 0, None
        for proto, host, port in listeners:
            earlier = [
                e
                for e in range(index)
                if any(
                    p == proto and q == port and _collide(h, host)
                    for p, h, q in expanded[e]
                )
            ]
            if earlier:
                count += 1
                if firstHit is None:
                    firstHit = (proto, host, port, earlier[0])
        if firstHit is not None:
            proto, host, port, owner = firstHit
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            message = f"map.yaml:{index + 2}: listen: {proto} {shown} overlaps mapping 'm{owner}' (line {owner + 2})"
            if count == 2:
                message += "; 1 more of its listeners overlaps an earlier mapping"
            elif count > 2:
                message += (
                    f"; {count - 1} more of its listeners overlap earlier mappings"
                )
            errors.append(message)
    return errors


@PROFILE
@given(
    st.lists(
        st.tuples(
            st.sampled_from([["tcp"], ["udp"], ["tcp", "udp"], ["udp", "tcp"]]),
            st.sampled_from(_LISTEN_HOSTS),
            st.integers(1, 12),
            st.integers(0, 6),
        ).map(lambda t: (t[0], t[1], t[2], t[2] + t[3])),
        max_size=10,
    )
)
def test_overlapsAsIfPortByPort(mappings) -> None:
    """
    Overlaps found with intervals are those found by comparing every
    listener with every earlier mapping's: each colliding mapping once, its
    first colliding listener in map order, the first mapping that listener
    collides with, and the count of its colliding listeners.
    """
    lines = ["mappings:"]
    for index, (protos, host, first, last) in enumerate(mappings):
        listen = f"{first}-{last}"
        if host is not None:
            listen = (f"[{host}]" if ":" in host else host) + ":" + listen
        lines.append(
            f'  - {{name: m{index}, proto: [{", ".join(protos)}], listen: "{listen}", target: db:80}}'
        )
    expected = _expectedOverlaps(mappings)
    try:
        parseMap("\n".join(lines) + "\n", "map.yaml")
        errors = []
    except ConfigError as e:
        errors = e.errors
    assert errors == expected


# The loader's shortcuts: the same answers as the long way.


def _nodes(node) -> list[tuple]:
    """
    Every node of a tree in order: its kind, tag, scalar text and place.
    """
    found = []
    pending = [node]
    while pending:
        node = pending.pop()
        value = node.value if isinstance(node.value, str) else None
        found.append(
            (
                type(node).__name__,
                node.tag,
                value,
                node.start_mark.index,
                node.end_mark.index,
            )
        )
        if value is None:
            for child in reversed(node.value):
                pending.extend(reversed(child) if isinstance(child, tuple) else [child])
    return found


#: Plain scalars of every implicit YAML 1.1 type and near them.
_PLAIN_SCALARS = [
    *_NUMBERS[:-2],
    *_DURATIONS,
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "2001-12-14 21:59:43.10 -5",
    "2001-12-14 21:59:43.10.5",
    "2001-12-14.5",
    "1.2.3",
    "1.2e+3",
    "1:20:30.5",
    "1:20:30.5.6",
    "127.0.0.1:8080",
    "127.0.0.1",
    "10.0.0.0/8",
    "-1.5",
    "+.inf",
    ".NaN",
    "..5",
    "yes",
    "Off",
    "NULL",
    "~",
    "<<",
    "=",
    "tcp",
]


@PROFILE
@given(
    st.lists(
        st.one_of(
            st.sampled_from(_PLAIN_SCALARS),
            st.text(
                st.sampled_from(list("0123456789.-+:_eExXoObB tTfFnNyY~<=abc")),
                max_size=14,
            ),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_loaderTypesAsPyYAML(texts: list[str]) -> None:
    """
    The map's loader gives every plain scalar (numbers in all YAML 1.1
    forms, dates, booleans, IPv4 addresses...) the type PyYAML's libyaml
    safe loader gives it, in the same tree with the same places.
    """
    import yaml

    from twistedproxy import config

    text = "a:\n" + "".join(f"  - {t}\n" for t in texts) + f"b: [{', '.join(texts)}]\n"
    try:
        expected = _nodes(yaml.compose(text, Loader=yaml.CSafeLoader))
    except yaml.YAMLError as e:
        with pytest.raises(yaml.YAMLError) as raised:
            yaml.compose(text, Loader=config._Loader)
        assert str(raised.value) == str(e)
        return
    assert _nodes(yaml.compose(text, Loader=config._Loader)) == expected
    # Not only errors: the example was a tree.
    assert len(expected) > len(texts)


_PLAIN_DEFAULTS = [
    "",
    "defaults: {max_connections: 5}\n",
    "defaults: {client_address: transparent}\n",
    "defaults: {client_address: proxy_protocol_v1}\n",
]
#: Valid listen and target values.
_PLAIN_GOOD = ["127.0.0.1:80", "127.0.0.2:80", "1.2.3.4:65535"]
#: Values near them, for listen, target or both.
_PLAIN_NEAR = [
    "0.0.0.0:80",
    "127.0.0.1:080",
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "127.0.0.1:123456",
    "127.0.0.01:80",
    "256.0.0.1:80",
    "127.0.0.1:80-81",
    "'127.0.0.1:80'",
    "[::1]:80",
    "80",
    "127.0.0.1:",
    "127.0.0.1:٨٠",
    "db:80",
]
_PLAIN_NAMES = [
    "a",
    "b",
    "c",
    "d",
    "a",
    "m.1",
    "'x y'",
    "80",
    "yes",
    "'80'",
    "tcp-127.0.0.1:80",
]


@st.composite
def plainishMaps(draw) -> str:
    """
    Maps of mappings that are, or nearly are, the one-line kind the reader
    reads at once: listen, target and a name in any order, valid or just
    not, with now and then another key, a key twice, or a default that
    concerns every mapping.
    """
    lines = [draw(st.sampled_from(_PLAIN_DEFAULTS)) + "mappings:"]
    for _ in range(draw(st.integers(1, 8))):
        pairs = {
            "listen": draw(st.sampled_from(_PLAIN_GOOD)),
            "target": draw(st.sampled_from(_PLAIN_GOOD)),
            "name": draw(st.sampled_from(_PLAIN_NAMES)),
        }
        if draw(st.integers(0, 2)) == 0:
            key = draw(st.sampled_from(["listen", "target"]))
            pairs[key] = draw(st.sampled_from(_PLAIN_NEAR))
        keys = draw(st.permutations(list(pairs)))
        keys = keys[: draw(st.integers(1, 3))] if draw(st.integers(0, 4)) == 0 else keys
        if "name" in keys and draw(st.booleans()):
            keys.remove("name")
        items = [f"{key}: {pairs[key]}" for key in keys]
        extra = draw(st.integers(0, 6))
        if extra == 0:
            items.append(draw(st.sampled_from(["proto: tcp", "max_connections: 3"])))
        elif extra == 1:
            items.append(f"listen: {draw(st.sampled_from(_PLAIN_GOOD))}")
        lines.append("  - {" + ", ".join(items) + "}")
    return "\n".join(lines) + "\n"


def _outcome(text: str) -> tuple:
    """
    All that loading C{text} gives: the map with the line of every mapping
    and listener (lines do not count in equality), or the errors.
    """
    try:
        proxyMap = parseMap(text, "map.yaml")
    except ConfigError as e:
        return ("errors", e.errors)
    lines = [
        (m.line, [listener.line for listener in m.listeners]) for m in proxyMap.mappings
    ]
    return ("map", proxyMap, lines, proxyMap.warnings)


@settings(PROFILE, max_examples=max(PROFILE.max_examples, 300))
@given(plainishMaps())
def test_plainMappingsReadAsTheGeneralReaderReadsThem(text: str) -> None:
    """
    The one-line mappings read at once give the map, lines and errors that
    the general reader gives for them.
    """
    from unittest import mock

    from twistedproxy.config import _MapReader

    fast = _outcome(text)
    with mock.patch.object(_MapReader, "readPlainMapping", return_value=None):
        general = _outcome(text)
    assert fast == general


#: Names for the one-line mappings L{config._prescan} takes out: valid,
#: taken twice, or plain scalars YAML reads as no string.
_PRESCAN_NAMES = [
    *[f"m{i}" for i in range(12)],
    "a",
    "b",
    "a",
    "m.1",
    "x_y-z",
    "80",
    "yes",
    "1e5",
    "2001-01-01",
    "0x1f",
]
#: Their listen and target values: valid, or near it.
_PRESCAN_ADDRESSES = [
    "127.0.0.1:80",
    "127.0.0.2:80",
    "127.0.0.1:81",
    "0.0.0.0:80",
    "127.0.0.1:080",
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "256.0.0.1:80",
    "1.2.3:80",
    "1.5:30",
]
#: Lines around them that change what such a line is: text of a block or
#: quoted scalar, an item of another list, a flow list, a second
#: document, a continuation, comments, anchors and aliases.
_PRESCAN_CONTEXT = [
    "mappings:",
    "mappings:",
    "mappings: []",
    "defaults: {client_address: transparent}",
    "defaults: {max_connections: 5}",
    "defaults:",
    "  max_connections: 5",
    "x: |",
    "note: >-",
    '  "quoted',
    '  more"',
    "  'single",
    "  - -",
    "  -",
    "    -",
    "    continuation",
    "      key: value",
    "  : value",
    "  ? key",
    "mappings: [",
    "]",
    "---",
    "...",
    "# comment",
    "",
    "manhole:",
    "  listen: 127.0.0.1:2222",
    "  - &a {listen: 127.0.0.1:90, target: 127.0.0.1:91}",
    "  - *a",
    "  - {name: c, listen: 127.0.0.1:80, target: 127.0.0.1:82}  # c",
    "  - {name: d, listen: 127.0.0.3:80, target: 127.0.0.1:82}",
    "  - name: e",
    "    listen: 127.0.0.4:80",
    "    target: 127.0.0.1:80",
    "  - listen: 127.0.0.9:1\n    target: 127.0.0.9:2\n    name: |",
    '  - {listen: 127.0.0.9:3, target: 127.0.0.9:4, name: "x',
    "\tx",
    # A one-line mapping that is the text of a plain, block or quoted
    # scalar, where its ': ' breaks the plain one.
    "x: abc\n  - {name: q, listen: 127.0.0.5:80, target: 127.0.0.1:80}",
    "  - abc\n    - {name: q, listen: 127.0.0.5:80, target: 127.0.0.1:80}",
    "  - listen: 127.0.0.9:1\n    target: 127.0.0.9:2\n    name: |\n"
    "      - {name: q, listen: 127.0.0.5:80, target: 127.0.0.1:80}",
    '  - {listen: 127.0.0.9:3, target: 127.0.0.9:4, name: "x\n'
    '  - {name: q, listen: 127.0.0.5:80, target: 127.0.0.1:80}"}',
]


@st.composite
def prescanMaps(draw) -> str:
    """
    Maps of lines, most of them one-line mappings L{config._prescan} takes
    out (valid or not, at several indentations), the others lines that
    put them in other places of the YAML tree or break it.
    """
    lines = ["mappings:"] if draw(st.integers(0, 5)) else []
    # One line in `rate` (or none) is not a one-line mapping.
    rate = draw(st.sampled_from([0, 3, 8, 8, 20]))
    mapIndent = draw(st.sampled_from(["  ", "  ", "", "    "]))
    for _ in range(draw(st.integers(1, 12))):
        if rate == 0 or draw(st.integers(0, rate)):
            listen = draw(st.sampled_from(_PRESCAN_ADDRESSES[:3]))
            target = draw(st.sampled_from(_PRESCAN_ADDRESSES[:3]))
            if draw(st.integers(0, 9)) == 0:
                listen = draw(st.sampled_from(_PRESCAN_ADDRESSES))
            if draw(st.integers(0, 9)) == 0:
                target = draw(st.sampled_from(_PRESCAN_ADDRESSES))
            name = ""
            if draw(st.integers(0, 4)):
                name = f"name: {draw(st.sampled_from(_PRESCAN_NAMES))}, "
            indent = mapIndent
            if draw(st.integers(0, 2 * rate + 9)) == 0:
                indent = draw(st.sampled_from(["  ", "", "    ", " ", "      "]))
            lines.append(f"{indent}- {{{name}listen: {listen}, target: {target}}}")
        else:
            lines.append(draw(st.sampled_from(_PRESCAN_CONTEXT)))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))


@settings(PROFILE, max_examples=max(PROFILE.max_examples, 500))
@given(prescanMaps())
def test_prescannedMapsReadAsTheirOwnText(text: str) -> None:
    """
    Taking the one-line mappings out of the text before YAML composes it
    gives the map, lines, warnings and errors that composing the text
    itself gives, wherever those lines are.
    """
    from unittest import mock

    from twistedproxy import config

    prescanned = _outcome(text)
    with mock.patch.object(config, "_prescan", return_value=None):
        composed = _outcome(text)
    assert prescanned == composed


def test_prescanTakesOutTheOneLineMappings() -> None:
    """
    A map of one-line mappings (the 100,000-mapping map's kind, with a
    default and a mapping of another kind) is composed once, with each
    one-line mapping replaced by C{{}} on its line, and gives the same map
    as the text composed whole.
    """
    from unittest import mock

    from twistedproxy import config

    text = (
        "defaults: {max_connections: 5}\n"
        "mappings:\n"
        "  - {name: m0, listen: 127.0.0.1:10000, target: 127.0.1.1:10000}\n"
        "  - {listen: 127.0.0.2:10000, target: 127.0.1.2:10000}\n"
        "  - name: m2\n"
        "    listen: 127.0.0.3:10000\n"
        "    target: 127.0.1.3:10000\n"
        "  - {name: m3, listen: 127.0.0.4:10000, target: 127.0.1.4:10000}\n"
    )
    composed = []
    compose = config._compose

    def recordingCompose(text: str, path: str):
        composed.append(text)
        return compose(text, path)

    with mock.patch.object(config, "_compose", recordingCompose):
        fast = _outcome(text)
    assert composed == [
        text.replace(
            "{name: m0, listen: 127.0.0.1:10000, target: 127.0.1.1:10000}", "{}"
        )
        .replace("{listen: 127.0.0.2:10000, target: 127.0.1.2:10000}", "{}")
        .replace("{name: m3, listen: 127.0.0.4:10000, target: 127.0.1.4:10000}", "{}")
    ]
    with mock.patch.object(config, "_prescan", return_value=None):
        assert _outcome(text) == fast
    assert fast[0] == "map"
    assert [m.name for m in fast[1].mappings] == [
        "m0",
        "tcp-127.0.0.2:10000",
        "m2",
        "m3",
    ]
    assert fast[2] == [(3, [3]), (4, [4]), (5, [5]), (8, [8])]
