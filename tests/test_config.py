"""
Tests for L{twistedproxy.config}: every rule of the map, valid and invalid,
with the exact C{FILE:LINE: message} a user sees.
"""

from __future__ import annotations

import os
from glob import glob
from textwrap import dedent

import pytest

from twistedproxy.config import MAPPING_KEYS, ConfigError, loadMap, parseMap
from twistedproxy.model import (
    ANY_IPV4,
    ANY_IPV6,
    Control,
    Listener,
    ListenerKey,
    Manhole,
    Target,
    Timeouts,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob(os.path.join(REPO, "config", "*.yaml")))


def errorsOf(text: str, path: str = "map.yaml") -> list[str]:
    """
    The error lines C{parseMap} reports for C{text}; fails the test when
    the map is accepted.
    """
    with pytest.raises(ConfigError) as caught:
        parseMap(dedent(text), path)
    return caught.value.errors


def oneMapping(*lines: str) -> str:
    """
    A map of one mapping named C{m} on line 2 whose keys are C{lines},
    the first of them on line 3.
    """
    return "mappings:\n  - name: m\n" + "".join(f"    {line}\n" for line in lines)


def keys(text: str) -> list[ListenerKey]:
    """
    The keys of the listeners of the valid map in C{text}, in order.
    """
    return [listener.key for listener in parseMap(dedent(text), "map.yaml").listeners()]


# listen


@pytest.mark.parametrize(
    "listen, expected",
    [
        ("8080", [("tcp", ANY_IPV4, 8080), ("tcp", ANY_IPV6, 8080)]),
        ("127.0.0.1:8080", [("tcp", "127.0.0.1", 8080)]),
        ("0.0.0.0:8080", [("tcp", ANY_IPV4, 8080)]),
        ('"[::1]:8080"', [("tcp", "::1", 8080)]),
        ('"[0:0::1]:8080"', [("tcp", "::1", 8080)]),
        ('"[::]:8080"', [("tcp", ANY_IPV6, 8080)]),
        ("1", [("tcp", ANY_IPV4, 1), ("tcp", ANY_IPV6, 1)]),
        ("127.0.0.1:65535", [("tcp", "127.0.0.1", 65535)]),
        ("127.0.0.1:80-82", [("tcp", "127.0.0.1", p) for p in (80, 81, 82)]),
        ("127.0.0.1:80-80", [("tcp", "127.0.0.1", 80)]),
        (
            "80-81",
            [
                ("tcp", ANY_IPV4, 80),
                ("tcp", ANY_IPV6, 80),
                ("tcp", ANY_IPV4, 81),
                ("tcp", ANY_IPV6, 81),
            ],
        ),
    ],
)
def test_listenValid(listen: str, expected: list[tuple]) -> None:
    """
    Each form of C{listen} gives the listeners it promises, in map order
    with ports ascending; no host means one IPv4 and one IPv6 wildcard.
    """
    assert keys(oneMapping(f"listen: {listen}", "target: 10.0.0.1:80")) == [
        ListenerKey(*key) for key in expected
    ]


@pytest.mark.parametrize(
    "listen, message",
    [
        ("70000", "listen: port 70000 is out of range (1-65535)"),
        ("0", "listen: port 0 is out of range (1-65535)"),
        ("127.0.0.1:0-10", "listen: port 0 is out of range (1-65535)"),
        ("8000-65536", "listen: port 65536 is out of range (1-65535)"),
        (
            "8010-8000",
            "listen: range 8010-8000 runs backwards (FIRST must not be more than LAST)",
        ),
        (
            "80a",
            "listen: '80a' is not a port or a port range (expected PORT or FIRST-LAST)",
        ),
        (
            "127.0.0.1:80:81",
            "listen: an IPv6 address must be in brackets, as in [::1]:8080"
            " ('127.0.0.1:80:81')",
        ),
        (
            "localhost:80",
            "listen: 'localhost' is not an IP address (listen takes an IPv4"
            " address or a bracketed IPv6 address such as [::1])",
        ),
        (
            "localhost",
            "listen: 'localhost' has no port (expected [HOST:]PORT or [HOST:]FIRST-LAST)",
        ),
        (
            "127.0.0.1",
            "listen: '127.0.0.1' has no port (expected [HOST:]PORT or [HOST:]FIRST-LAST)",
        ),
        (
            '"[::1]"',
            "listen: '[::1]' has no port (expected [HOST:]PORT or [HOST:]FIRST-LAST)",
        ),
        (
            "::1:80",
            "listen: an IPv6 address must be in brackets, as in [::1]:8080 ('::1:80')",
        ),
        (
            '"[127.0.0.1]:80"',
            "listen: '[127.0.0.1]' is not an IPv6 address (brackets are for IPv6 only)",
        ),
        ('"[::1:80"', "listen: '[' without a matching ']' in '[::1:80'"),
        (
            '"[::1]80"',
            "listen: expected ':' after ']' in '[::1]80'"
            " (expected [HOST:]PORT or [HOST:]FIRST-LAST)",
        ),
        ('":80"', "listen: the host before ':' is empty in ':80'"),
        ("256.1.1.1:80", "listen: '256.1.1.1' is not a valid IPv4 address"),
        ("010.0.0.1:80", "listen: '010.0.0.1' is not a valid IPv4 address"),
        (
            '"[fe80::1%eth0]:80"',
            "listen: '[fe80::1%eth0]': IPv6 zone indexes ('%') are not supported",
        ),
        (
            "[8080]",
            "listen: expected [HOST:]PORT or [HOST:]FIRST-LAST, got a list",
        ),
        ("8080.5", "listen: expected [HOST:]PORT or [HOST:]FIRST-LAST, got a number"),
        ("true", "listen: expected [HOST:]PORT or [HOST:]FIRST-LAST, got a boolean"),
        ("", "listen: expected [HOST:]PORT or [HOST:]FIRST-LAST, got no value"),
        (
            "{port: 80}",
            "listen: expected [HOST:]PORT or [HOST:]FIRST-LAST, got a mapping",
        ),
    ],
)
def test_listenInvalid(listen: str, message: str) -> None:
    """
    A bad C{listen} is reported once, on its own line, saying what is wrong.
    """
    assert errorsOf(oneMapping(f"listen: {listen}", "target: 10.0.0.1:80")) == [
        f"map.yaml:3: {message}"
    ]


# target


@pytest.mark.parametrize(
    "listen, target, expected",
    [
        ("127.0.0.1:80", "10.0.0.1:8080", [("10.0.0.1", 8080)]),
        ("127.0.0.1:80", '"[fd00::1]:80"', [("fd00::1", 80)]),
        ("127.0.0.1:80", '"[fd00:0::1]:80"', [("fd00::1", 80)]),
        ("127.0.0.1:80", "db:5432", [("db", 5432)]),
        ("127.0.0.1:80", "my_db:5432", [("my_db", 5432)]),
        ("127.0.0.1:80", "db.example.com.:80", [("db.example.com.", 80)]),
        ("127.0.0.1:80", "xn--bcher-kva.example:80", [("xn--bcher-kva.example", 80)]),
        ("127.0.0.1:80", "10.0.0.1:90-90", [("10.0.0.1", 90)]),
        (
            "127.0.0.1:80-82",
            "10.0.0.1:90-92",
            [("10.0.0.1", 90), ("10.0.0.1", 91), ("10.0.0.1", 92)],
        ),
        (
            "127.0.0.1:80-82",
            "10.0.0.1:90",
            [("10.0.0.1", 90), ("10.0.0.1", 90), ("10.0.0.1", 90)],
        ),
    ],
)
def test_targetValid(listen: str, target: str, expected: list[tuple]) -> None:
    """
    A target is an IP literal (IPv6 bracketed) or a host name; a target
    range pairs up with the listen range port by port, and a single target
    port takes every listen port.
    """
    proxyMap = parseMap(
        oneMapping(f"listen: {listen}", f"target: {target}"), "map.yaml"
    )
    assert [listener.target for listener in proxyMap.listeners()] == [
        Target(*pair) for pair in expected
    ]


@pytest.mark.parametrize(
    "listen, target, message",
    [
        (
            "80",
            "db",
            "target: 'db' has no port (expected HOST:PORT or HOST:FIRST-LAST)",
        ),
        (
            "80",
            "10.0.0.1",
            "target: '10.0.0.1' has no port (expected HOST:PORT or HOST:FIRST-LAST)",
        ),
        (
            "80",
            "8080",
            "target: '8080' has no host (expected HOST:PORT or HOST:FIRST-LAST)",
        ),
        (
            "80",
            "0.0.0.0:80",
            "target: 0.0.0.0 is the wildcard address, not one to connect to",
        ),
        (
            "80",
            '"[::]:80"',
            "target: :: is the wildcard address, not one to connect to",
        ),
        (
            "80",
            '"bad host:80"',
            "target: 'bad host' is not an IP address or a host name",
        ),
        ("80", "-db:80", "target: '-db' is not an IP address or a host name"),
        ("80", "db..x:80", "target: 'db..x' is not an IP address or a host name"),
        (
            "80",
            f"{'a' * 64}:80",
            f"target: '{'a' * 64}' is not an IP address or a host name",
        ),
        ("80", "10.0.0.300:80", "target: '10.0.0.300' is not a valid IPv4 address"),
        ("80", "db:0", "target: port 0 is out of range (1-65535)"),
        ("80", "db:99999", "target: port 99999 is out of range (1-65535)"),
        (
            "80",
            "db:90-80",
            "target: range 90-80 runs backwards (FIRST must not be more than LAST)",
        ),
        (
            "80",
            "::1:80",
            "target: an IPv6 address must be in brackets, as in [::1]:8080 ('::1:80')",
        ),
        (
            "80",
            "db:http",
            "target: 'http' is not a port or a port range (expected PORT or FIRST-LAST)",
        ),
        (
            "8000-8009",
            "db:80-85",
            "target: range 80-85 has 6 ports but listen 8000-8009 has 10;"
            " give a range of 10 ports or a single port",
        ),
        (
            "8080",
            "db:80-82",
            "target: range 80-82 has 3 ports but listen 8080 is one port;"
            " give a single port",
        ),
        ("80", "[db, 80]", "target: expected HOST:PORT or HOST:FIRST-LAST, got a list"),
        ("80", "", "target: expected HOST:PORT or HOST:FIRST-LAST, got no value"),
    ],
)
def test_targetInvalid(listen: str, target: str, message: str) -> None:
    """
    A bad C{target} is reported once, on its own line, saying what is wrong.
    """
    assert errorsOf(oneMapping(f"listen: {listen}", f"target: {target}")) == [
        f"map.yaml:4: {message}"
    ]


# proto


@pytest.mark.parametrize(
    "proto, expected",
    [
        ("tcp", ["tcp"]),
        ("udp", ["udp"]),
        ("[udp]", ["udp"]),
        ("[tcp, udp]", ["tcp", "udp"]),
        ("[udp, tcp]", ["udp", "tcp"]),
    ],
)
def test_protoValid(proto: str, expected: list[str]) -> None:
    """
    C{proto} is tcp, udp or a list of them; listeners follow its order.
    """
    text = oneMapping(f"proto: {proto}", "listen: 127.0.0.1:53", "target: 10.0.0.1:53")
    assert [key.proto for key in keys(text)] == expected


def test_protoDefault() -> None:
    """
    Without C{proto} a mapping is TCP only.
    """
    assert [
        key.proto for key in keys(oneMapping("listen: 127.0.0.1:53", "target: db:53"))
    ] == ["tcp"]


@pytest.mark.parametrize(
    "proto, message",
    [
        ("TCP", "proto: 'TCP' is not a protocol (expected tcp or udp)"),
        ("http", "proto: 'http' is not a protocol (expected tcp or udp)"),
        ("[]", "proto: the list is empty (expected tcp, udp or both)"),
        ("[tcp, tcp]", "proto: 'tcp' is listed twice"),
        ("[tcp, sctp]", "proto: 'sctp' is not a protocol (expected tcp or udp)"),
        ("[tcp, [udp]]", "proto: expected tcp, udp or a list of them, got a list"),
        ("{tcp: 1}", "proto: expected tcp, udp or a list of them, got a mapping"),
        ("6", "proto: expected tcp, udp or a list of them, got an integer"),
        ("", "proto: expected tcp, udp or a list of them, got no value"),
    ],
)
def test_protoInvalid(proto: str, message: str) -> None:
    """
    A bad C{proto} is reported on its line.
    """
    text = oneMapping(f"proto: {proto}", "listen: 127.0.0.1:53", "target: 10.0.0.1:53")
    assert errorsOf(text) == [f"map.yaml:3: {message}"]


# name


@pytest.mark.parametrize(
    "lines, expected",
    [
        (["name: a.b_c-D9", "listen: 80"], "a.b_c-D9"),
        (["name: '8080'", "listen: 80"], "8080"),
        (["listen: 8080"], "tcp-8080"),
        (["listen: 127.0.0.1:8000-8009"], "tcp-127.0.0.1:8000-8009"),
        (["proto: udp", "listen: 127.0.0.1:53"], "udp-127.0.0.1:53"),
        (["proto: [tcp, udp]", 'listen: "[::1]:53"'], "tcp+udp-[::1]:53"),
        (["proto: [udp, tcp]", "listen: 53"], "udp+tcp-53"),
    ],
)
def test_name(lines: list[str], expected: str) -> None:
    """
    A mapping's name is the one given, or C{<proto>-<listen>} with the
    protocols joined by '+' and the listen value as written.
    """
    text = "mappings:\n  - target: db:1\n" + "".join(f"    {line}\n" for line in lines)
    proxyMap = parseMap(text, "map.yaml")
    assert [mapping.name for mapping in proxyMap.mappings] == [expected]
    assert {listener.mapping for listener in proxyMap.listeners()} == {expected}


@pytest.mark.parametrize(
    "name, message",
    [
        ('"a b"', "name: 'a b' may only contain letters, digits, '.', '_' and '-'"),
        ("a/b", "name: 'a/b' may only contain letters, digits, '.', '_' and '-'"),
        ('""', "name: '' may only contain letters, digits, '.', '_' and '-'"),
        (
            "12",
            "name: expected a name of letters, digits, '.', '_' and '-', got an"
            " integer (put it in quotes to use it as a name)",
        ),
        (
            "no",
            "name: expected a name of letters, digits, '.', '_' and '-', got a"
            " boolean (put it in quotes to use it as a name)",
        ),
        (
            "[a]",
            "name: expected a name of letters, digits, '.', '_' and '-', got a list",
        ),
        (
            "",
            "name: expected a name of letters, digits, '.', '_' and '-', got no value",
        ),
    ],
)
def test_nameInvalid(name: str, message: str) -> None:
    """
    A name must be a string of letters, digits, '.', '_' and '-'.
    """
    text = f"mappings:\n  - name: {name}\n    listen: 80\n    target: db:80\n"
    assert errorsOf(text) == [f"map.yaml:2: {message}"]


def test_nameDuplicate() -> None:
    """
    A name used twice is reported on the second one, naming the first.
    """
    text = """\
        mappings:
          - name: web
            listen: 80
            target: db:80
          - name: web
            listen: 81
            target: db:81
        """
    assert errorsOf(text) == [
        "map.yaml:5: name: 'web' is already used by the mapping on line 2"
    ]


def test_defaultNameTaken() -> None:
    """
    A default name that another mapping already took is an error that asks
    for a name.
    """
    text = """\
        mappings:
          - name: tcp-8080
            listen: 127.0.0.1:8080
            target: db:80
          - listen: 8080
            target: db:81
        """
    assert errorsOf(text) == [
        "map.yaml:5: mappings[1]: its default name 'tcp-8080' is already used by"
        " the mapping on line 2; give it a name",
        "map.yaml:5: listen: tcp 0.0.0.0:8080 overlaps mapping 'tcp-8080' (line 2)",
    ]


# durations and max_connections


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("connect_timeout", "5", Timeouts(connect=5.0)),
        ("connect_timeout", "2.5", Timeouts(connect=2.5)),
        ("connect_timeout", "250ms", Timeouts(connect=0.25)),
        ("connect_timeout", "5s", Timeouts(connect=5.0)),
        ("connect_timeout", "1.5s", Timeouts(connect=1.5)),
        ("connect_timeout", "2m", Timeouts(connect=120.0)),
        ("connect_timeout", "1h", Timeouts(connect=3600.0)),
        ("idle_timeout", "0", Timeouts(idle=0.0)),
        ("idle_timeout", "0s", Timeouts(idle=0.0)),
        ("idle_timeout", "30m", Timeouts(idle=1800.0)),
        ("udp_timeout", "0.5", Timeouts(udp=0.5)),
        ("udp_timeout", ".5s", Timeouts(udp=0.5)),
    ],
)
def test_durationValid(key: str, value: str, expected: Timeouts) -> None:
    """
    Durations are seconds as a number or a number with ms, s, m or h.
    """
    text = oneMapping("listen: 80", "target: db:80", f"{key}: {value}")
    for listener in parseMap(text, "map.yaml").listeners():
        assert listener.timeouts == expected


_FORMS = "seconds as a number, or a number with ms, s, m or h: 250ms, 5s, 2m, 1h"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("connect_timeout", "0", "connect_timeout: must be more than 0, got 0"),
        ("connect_timeout", "0ms", "connect_timeout: must be more than 0, got 0ms"),
        ("connect_timeout", "-1", "connect_timeout: must be more than 0, got -1"),
        ("udp_timeout", "0", "udp_timeout: must be more than 0, got 0"),
        ("idle_timeout", "-0.5", "idle_timeout: must not be negative, got -0.5"),
        (
            "connect_timeout",
            "5 sec",
            f"connect_timeout: '5 sec' is not a duration ({_FORMS})",
        ),
        (
            "connect_timeout",
            "5d",
            f"connect_timeout: '5d' is not a duration ({_FORMS})",
        ),
        (
            "connect_timeout",
            "-5s",
            f"connect_timeout: '-5s' is not a duration ({_FORMS})",
        ),
        (
            "connect_timeout",
            '"5"',
            f"connect_timeout: '5' is not a duration ({_FORMS})",
        ),
        (
            "connect_timeout",
            "true",
            f"connect_timeout: expected a duration ({_FORMS}), got a boolean",
        ),
        (
            "idle_timeout",
            "[1]",
            f"idle_timeout: expected a duration ({_FORMS}), got a list",
        ),
        (
            "udp_timeout",
            "",
            f"udp_timeout: expected a duration ({_FORMS}), got no value",
        ),
        (
            "connect_timeout",
            ".inf",
            "connect_timeout: expected a finite duration, got .inf",
        ),
        ("idle_timeout", ".nan", "idle_timeout: expected a finite duration, got .nan"),
        ("max_connections", "-1", "max_connections: must not be negative, got -1"),
        (
            "max_connections",
            "true",
            "max_connections: expected a whole number (0 is unlimited), got a boolean",
        ),
        (
            "max_connections",
            "1.5",
            "max_connections: expected a whole number (0 is unlimited), got a number",
        ),
        (
            "max_connections",
            '"10"',
            "max_connections: expected a whole number (0 is unlimited), got a string",
        ),
    ],
)
def test_settingInvalid(key: str, value: str, message: str) -> None:
    """
    A bad timeout or connection limit in a mapping is reported on its line.
    """
    text = oneMapping("listen: 80", "target: db:80", f"{key}: {value}")
    assert errorsOf(text) == [f"map.yaml:5: {message}"]


@pytest.mark.parametrize(
    "value, expected", [("0", 0), ("10", 10), ("9223372036854775807", 2**63 - 1)]
)
def test_maxConnectionsValid(value: str, expected: int) -> None:
    """
    C{max_connections} is a whole number of 0 or more in decimal digits.
    """
    text = oneMapping("listen: 80", "target: db:80", f"max_connections: {value}")
    for listener in parseMap(text, "map.yaml").listeners():
        assert listener.maxConnections == expected


_OCTAL = "(no leading zero: YAML 1.1 would read it as octal)"


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "max_connections",
            "1:30",
            "'1:30' is not a plain decimal number (YAML 1.1 would read it as base 60)",
        ),
        ("max_connections", "017", f"'017' is not a plain decimal number {_OCTAL}"),
        ("max_connections", "00", f"'00' is not a plain decimal number {_OCTAL}"),
        (
            "max_connections",
            "0x10",
            "'0x10' is not a plain decimal number (no hexadecimal)",
        ),
        (
            "max_connections",
            "0b101",
            "'0b101' is not a plain decimal number (no binary)",
        ),
        ("max_connections", "+5", "'+5' is not a plain decimal number (no '+' sign)"),
        (
            "max_connections",
            "1_000",
            "'1_000' is not a plain decimal number (no '_' between digits)",
        ),
        ("max_connections", "-017", f"'-017' is not a plain decimal number {_OCTAL}"),
        ("max_connections", "!!int 1.5", "'1.5' is not a plain decimal number"),
        (
            "max_connections",
            "9223372036854775808",
            "'9223372036854775808' is too large (at most 9223372036854775807)",
        ),
        (
            "max_connections",
            "9" * 5000,
            f"'{'9' * 256}...' is too large (at most 9223372036854775807)",
        ),
        ("connect_timeout", "017", f"'017' is not a plain decimal number {_OCTAL}"),
        ("connect_timeout", "017s", f"'017' is not a plain decimal number {_OCTAL}"),
        (
            "connect_timeout",
            "1:30",
            "'1:30' is not a plain decimal number (YAML 1.1 would read it as base 60)",
        ),
        (
            "connect_timeout",
            "1:30.5",
            "'1:30.5' is not a plain decimal number (YAML 1.1 would read it as base 60)",
        ),
        (
            "idle_timeout",
            "0x10",
            "'0x10' is not a plain decimal number (no hexadecimal)",
        ),
        ("idle_timeout", "+5", "'+5' is not a plain decimal number (no '+' sign)"),
        ("idle_timeout", "+5.5", "'+5.5' is not a plain decimal number (no '+' sign)"),
        (
            "udp_timeout",
            "1_0.5",
            "'1_0.5' is not a plain decimal number (no '_' between digits)",
        ),
        (
            "udp_timeout",
            "1.5e+3",
            "'1.5e+3' is not a plain decimal number (no exponent)",
        ),
        ("udp_timeout", "9" * 400, f"'{'9' * 256}...' is too long a duration"),
        ("udp_timeout", "9" * 400 + ".5", f"'{'9' * 256}...' is too long a duration"),
        ("udp_timeout", "9" * 400 + "ms", f"'{'9' * 256}...' is too long a duration"),
        ("idle_timeout", "-" + "9" * 5000, f"'-{'9' * 255}...' is too long a duration"),
    ],
)
def test_numbersAreDecimal(key: str, value: str, message: str) -> None:
    """
    Integer and duration values are read as plain decimal digits, not as
    YAML 1.1's base 60, octal, hexadecimal, binary, signed or '_' forms,
    and huge numbers are an error line, never a traceback.
    """
    text = oneMapping("listen: 80", "target: db:80", f"{key}: {value}")
    assert errorsOf(text) == [f"map.yaml:5: {key}: {message}"]


@pytest.mark.parametrize(
    "listen, target, message",
    [
        ("017", "db:80", f"listen: port '017' is not a plain decimal number {_OCTAL}"),
        (
            "127.0.0.1:017",
            "db:80",
            f"listen: port '017' is not a plain decimal number {_OCTAL}",
        ),
        (
            "80-090",
            "db:80",
            f"listen: port '090' is not a plain decimal number {_OCTAL}",
        ),
        ("80", "db:017", f"target: port '017' is not a plain decimal number {_OCTAL}"),
        (
            "80",
            "db:0x50",
            "target: '0x50' is not a port or a port range (expected PORT or FIRST-LAST)",
        ),
        (
            "+80",
            "db:80",
            "listen: '+80' is not a port or a port range (expected PORT or FIRST-LAST)",
        ),
        (
            "8_080",
            "db:80",
            "listen: '8_080' is not a port or a port range (expected PORT or FIRST-LAST)",
        ),
        ("1" * 5000, "db:80", f"listen: port {'1' * 256}... is out of range (1-65535)"),
        (
            "80",
            "db:" + "1" * 5000,
            f"target: port {'1' * 256}... is out of range (1-65535)",
        ),
        (
            "80-" + "1" * 5000,
            "db:80",
            f"listen: port {'1' * 256}... is out of range (1-65535)",
        ),
    ],
)
def test_portsAreDecimal(listen: str, target: str, message: str) -> None:
    """
    Ports in C{listen} and C{target} follow the same rule as every other
    number: decimal digits without a leading zero; a port of thousands of
    digits is an error line, not a traceback.
    """
    assert errorsOf(oneMapping(f"listen: {listen}", f"target: {target}")) == [
        f"map.yaml:{3 if 'listen' in message else 4}: {message}"
    ]


# defaults


def test_defaultsBuiltIn() -> None:
    """
    Without C{defaults}, a mapping gets 10s connect, no idle timeout, 90s
    UDP sessions and no connection limit.
    """
    (listener,) = parseMap(
        oneMapping("listen: 127.0.0.1:80", "target: db:80"), "m"
    ).listeners()
    assert listener.timeouts == Timeouts(connect=10.0, idle=0.0, udp=90.0)
    assert listener.maxConnections == 0


def test_defaultsInheritedAndOverridden() -> None:
    """
    Every mapping inherits C{defaults}; a key set in a mapping overrides
    that one key for that mapping only.
    """
    text = """\
        defaults:
          connect_timeout: 5s
          idle_timeout: 1m
          udp_timeout: 30s
          max_connections: 50
        mappings:
          - name: plain
            listen: 127.0.0.1:80
            target: db:80
          - name: special
            listen: 127.0.0.1:81
            target: db:81
            idle_timeout: 0
            max_connections: 7
        """
    plain, special = parseMap(dedent(text), "map.yaml").listeners()
    assert (plain.timeouts, plain.maxConnections) == (
        Timeouts(connect=5.0, idle=60.0, udp=30.0),
        50,
    )
    assert (special.timeouts, special.maxConnections) == (
        Timeouts(connect=5.0, idle=0.0, udp=30.0),
        7,
    )


@pytest.mark.parametrize(
    "defaults, message",
    [
        (
            "defaults:\n  udp_timout: 3",
            "map.yaml:2: defaults: unknown key 'udp_timout' (expected one of:"
            " connect_timeout, idle_timeout, udp_timeout, max_connections,"
            " client_address, accept_proxy_protocol, allow, deny, max_connections_per_client,"
            " new_connections_per_client, datagrams_per_client)",
        ),
        (
            "defaults:\n  name: x",
            "map.yaml:2: defaults: unknown key 'name' (expected one of:"
            " connect_timeout, idle_timeout, udp_timeout, max_connections,"
            " client_address, accept_proxy_protocol, allow, deny, max_connections_per_client,"
            " new_connections_per_client, datagrams_per_client)",
        ),
        (
            "defaults:\n  connect_timeout: 0",
            "map.yaml:2: defaults.connect_timeout: must be more than 0, got 0",
        ),
        (
            "defaults: [1]",
            "map.yaml:1: defaults: expected a mapping of connect_timeout,"
            " idle_timeout, udp_timeout, max_connections,"
            " client_address, accept_proxy_protocol, allow, deny, max_connections_per_client,"
            " new_connections_per_client, datagrams_per_client, got a list",
        ),
    ],
)
def test_defaultsInvalid(defaults: str, message: str) -> None:
    """
    C{defaults} takes only the four settings, each checked like in a
    mapping, and its errors are reported once, not again per mapping.
    """
    text = f"{defaults}\nmappings:\n  - listen: 80\n    target: db:80\n"
    assert errorsOf(text) == [message]


def test_defaultsEmpty() -> None:
    """
    An empty C{defaults:} section (every key commented out) is no defaults.
    """
    text = (
        "defaults:\n#  idle_timeout: 5s\nmappings:\n  - listen: 80\n    target: db:80\n"
    )
    for listener in parseMap(text, "map.yaml").listeners():
        assert listener.timeouts == Timeouts()


# overlaps


@pytest.mark.parametrize(
    "first, second, message",
    [
        (
            "127.0.0.1:80",
            "127.0.0.1:80",
            "tcp 127.0.0.1:80 overlaps mapping 'a' (line 2)",
        ),
        (
            "0.0.0.0:80",
            "127.0.0.1:80",
            "tcp 127.0.0.1:80 overlaps mapping 'a' (line 2)",
        ),
        ("127.0.0.1:80", "0.0.0.0:80", "tcp 0.0.0.0:80 overlaps mapping 'a' (line 2)"),
        ("127.0.0.1:80", "80", "tcp 0.0.0.0:80 overlaps mapping 'a' (line 2)"),
        ('"[::1]:80"', "80", "tcp [::]:80 overlaps mapping 'a' (line 2)"),
        ('"[::]:80"', '"[::1]:80"', "tcp [::1]:80 overlaps mapping 'a' (line 2)"),
        (
            "80",
            "80",
            "tcp 0.0.0.0:80 overlaps mapping 'a' (line 2);"
            " 1 more of its listeners overlaps an earlier mapping",
        ),
        (
            "127.0.0.1:8000-8009",
            "127.0.0.1:8005-8020",
            "tcp 127.0.0.1:8005 overlaps mapping 'a' (line 2);"
            " 4 more of its listeners overlap earlier mappings",
        ),
    ],
)
def test_overlap(first: str, second: str, message: str) -> None:
    """
    Listeners on one protocol and port collide when their addresses are
    equal or one is the wildcard of the other's family; the later mapping's
    C{listen} line names its first such listener, the earlier mapping, and
    how many more of its listeners collide.
    """
    text = f"""\
        mappings:
          - name: a
            listen: {first}
            target: db:80
          - name: b
            listen: {second}
            target: db:81
        """
    assert errorsOf(text) == [f"map.yaml:6: listen: {message}"]


@pytest.mark.parametrize(
    "first, firstProto, second, secondProto",
    [
        ("0.0.0.0:80", "tcp", '"[::]:80"', "tcp"),
        ("127.0.0.1:80", "tcp", "127.0.0.2:80", "tcp"),
        ("80", "tcp", "80", "udp"),
        ("127.0.0.1:80", "tcp", "127.0.0.1:81", "tcp"),
        ("127.0.0.1:80-89", "tcp", "127.0.0.1:90-99", "tcp"),
        ('"[::1]:80"', "tcp", "127.0.0.1:80", "tcp"),
    ],
)
def test_noOverlap(first: str, firstProto: str, second: str, secondProto: str) -> None:
    """
    Other protocols, ports or addresses, and the IPv4 and IPv6 wildcards
    with each other, do not collide.
    """
    text = f"""\
        mappings:
          - {{name: a, proto: {firstProto}, listen: {first}, target: "db:80"}}
          - {{name: b, proto: {secondProto}, listen: {second}, target: "db:81"}}
        """
    assert len(parseMap(dedent(text), "map.yaml").mappings) == 2


def test_overlapReportedOnceAgainstTheFirst() -> None:
    """
    A mapping colliding with several earlier ones gets one error, naming
    its first colliding listener in map order and the first mapping that
    listener collides with, with the count of the others.
    """
    text = """\
        mappings:
          - {name: a, listen: "127.0.0.1:81", target: "db:80"}
          - {name: b, listen: "[::1]:80", target: "db:80"}
          - {name: c, listen: "127.0.0.2:80", target: "db:80"}
          - {name: d, proto: [udp, tcp], listen: 80-81, target: "db:80"}
          - {name: e, listen: "127.0.0.2:70-90", target: "db:80"}
        """
    assert errorsOf(text) == [
        "map.yaml:5: listen: tcp 0.0.0.0:80 overlaps mapping 'c' (line 4);"
        " 2 more of its listeners overlap earlier mappings",
        "map.yaml:6: listen: tcp 127.0.0.2:80 overlaps mapping 'c' (line 4);"
        " 1 more of its listeners overlaps an earlier mapping",
    ]


# structure


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "mapings: []\n",
            [
                "map.yaml:1: unknown key 'mapings' (expected one of: defaults, mappings, manhole, http, log_format, control)"
            ],
        ),
        (
            "- listen: 80\n",
            [
                "map.yaml:1: expected a mapping with the keys defaults, mappings and"
                " manhole, got a list"
            ],
        ),
        (
            "hello\n",
            [
                "map.yaml:1: expected a mapping with the keys defaults, mappings and"
                " manhole, got a string"
            ],
        ),
        (
            "mappings: web\n",
            ["map.yaml:1: mappings: expected a list of mappings, got a string"],
        ),
        (
            "mappings:\n  - 80\n",
            [
                "map.yaml:2: mappings[0]: expected a mapping with listen and target, got an integer"
            ],
        ),
        (
            "mappings:\n  - listen: 80\n",
            ["map.yaml:2: mappings[0]: missing key 'target'"],
        ),
        (
            "mappings:\n  - name: x\n",
            [
                "map.yaml:2: mappings[0]: missing key 'listen'",
                "map.yaml:2: mappings[0]: missing key 'target'",
            ],
        ),
        (
            "mappings:\n  - listen: 80\n    tagret: db:80\n",
            [
                "map.yaml:3: mappings[0]: unknown key 'tagret' (expected one of: name,"
                " proto, listen, target, connect_timeout, idle_timeout, udp_timeout,"
                " max_connections, client_address, accept_proxy_protocol, allow, deny, max_connections_per_client, new_connections_per_client, datagrams_per_client, tls, target_tls, sni_routes)",
            ],
        ),
        (
            "mappings:\n  - listen: 80\n    port: 80\n",
            [
                "map.yaml:2: mappings[0]: missing key 'target'",
                "map.yaml:3: mappings[0]: unknown key 'port' (expected one of: name,"
                " proto, listen, target, connect_timeout, idle_timeout, udp_timeout,"
                " max_connections, client_address, accept_proxy_protocol, allow, deny, max_connections_per_client, new_connections_per_client, datagrams_per_client, tls, target_tls, sni_routes)",
            ],
        ),
        (
            "mappings:\n  - name: x\n    tagret: db:80\n",
            [
                "map.yaml:2: mappings[0]: missing key 'listen'",
                "map.yaml:3: mappings[0]: unknown key 'tagret' (expected one of: name,"
                " proto, listen, target, connect_timeout, idle_timeout, udp_timeout,"
                " max_connections, client_address, accept_proxy_protocol, allow, deny, max_connections_per_client, new_connections_per_client, datagrams_per_client, tls, target_tls, sni_routes)",
            ],
        ),
        (
            "mappings:\n  - listen: 80\n    target: db:80\n    80: x\n",
            [
                "map.yaml:4: mappings[0]: unknown key '80' (expected one of: name,"
                " proto, listen, target, connect_timeout, idle_timeout, udp_timeout,"
                " max_connections, client_address, accept_proxy_protocol, allow, deny, max_connections_per_client, new_connections_per_client, datagrams_per_client, tls, target_tls, sni_routes)",
            ],
        ),
        (
            "x: &x {listen: 80}\nmappings:\n  - <<: *x\n    target: db:80\n",
            [
                "map.yaml:1: unknown key 'x' (expected one of: defaults, mappings, manhole, http, log_format, control)",
                "map.yaml:3: mappings[0]: YAML merge keys ('<<') are not supported;"
                " put shared settings in defaults",
                "map.yaml:3: mappings[0]: missing key 'listen'",
            ],
        ),
    ],
)
def test_structureInvalid(text: str, expected: list[str]) -> None:
    """
    Unknown keys, missing keys and values of the wrong kind are reported
    where they are.
    """
    assert errorsOf(text) == expected


@pytest.mark.parametrize("text", ["{}\n", "mappings:\n", "mappings: []\n"])
def test_noMappings(text: str) -> None:
    """
    A map may hold no mappings at all: a proxy with nothing to do is valid.
    """
    proxyMap = parseMap(text, "map.yaml")
    assert (proxyMap.mappings, proxyMap.manhole) == ((), None)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "mappings: []\nmappings: []\n",
            ["map.yaml:2: duplicate key 'mappings' (first on line 1)"],
        ),
        (
            "mappings:\n  - listen: 80\n    target: db:80\n    listen: 81\n",
            ["map.yaml:4: duplicate key 'listen' (first on line 2)"],
        ),
        (
            "defaults:\n  idle_timeout: 1\n  idle_timeout: 2\n",
            ["map.yaml:3: duplicate key 'idle_timeout' (first on line 2)"],
        ),
        (
            "manhole:\n  listen: 2222\n  authorized_keys: k\n  host_key: h\n  host_key: g\n",
            ["map.yaml:5: duplicate key 'host_key' (first on line 4)"],
        ),
        (
            "mappings:\n  - {listen: 80, target: db:80, proto: {a: 1, a: 2}}\n",
            [
                "map.yaml:2: duplicate key 'a' (first on line 2)",
                "map.yaml:2: proto: expected tcp, udp or a list of them, got a mapping",
            ],
        ),
    ],
)
def test_duplicateKeys(text: str, expected: list[str]) -> None:
    """
    A key given twice in any YAML mapping is an error on the second one,
    where PyYAML alone would silently keep the last.
    """
    assert errorsOf(text) == expected


def test_fiveMistakesFiveLines() -> None:
    """
    Every mistake of a map is reported in one pass, one line each (a
    misspelt key is not also reported missing), in the order of the file.
    """
    text = """\
        defaults:
          connect_timeout: soon
        mappings:
          - name: web
            listen: 127.0.0.1:8080
            target: 172.17.0.3:80
          - name: api
            listen: 70000
            target: 172.17.0.4:80
          - name: admin
            proto: sctp
            listen: 127.0.0.1:9000
            tagret: 172.17.0.5:80
          - name: again
            listen: 8080
            target: 172.17.0.6:80
        """
    assert errorsOf(text) == [
        f"map.yaml:2: defaults.connect_timeout: 'soon' is not a duration ({_FORMS})",
        "map.yaml:8: listen: port 70000 is out of range (1-65535)",
        "map.yaml:11: proto: 'sctp' is not a protocol (expected tcp or udp)",
        "map.yaml:13: mappings[2]: unknown key 'tagret' (expected one of: name, proto,"
        " listen, target, connect_timeout, idle_timeout, udp_timeout, max_connections,"
        " client_address, accept_proxy_protocol, allow, deny, max_connections_per_client, new_connections_per_client, datagrams_per_client, tls, target_tls, sni_routes)",
        "map.yaml:15: listen: tcp 0.0.0.0:8080 overlaps mapping 'web' (line 4)",
    ]


def test_configErrorText() -> None:
    """
    A L{ConfigError} reads as its error lines joined by newlines.
    """
    error = ConfigError(["m.yaml:1: one", "m.yaml:2: two"])
    assert error.errors == ["m.yaml:1: one", "m.yaml:2: two"]
    assert str(error) == "m.yaml:1: one\nm.yaml:2: two"


# the result


def test_modelValues() -> None:
    """
    A valid map becomes L{Mapping}s of L{Listener}s in map order, ports
    ascending, protocols in the order written, each carrying its mapping's
    line.
    """
    text = """\
        defaults:
          udp_timeout: 20s
        mappings:
          - name: ssh
            listen: 127.0.0.1:2200
            target: 172.17.0.2:22

          - name: media
            proto: [udp, tcp]
            listen: "[::1]:5000-5001"
            target: media.internal:6000-6001
            max_connections: 3
        """
    proxyMap = parseMap(dedent(text), "here/map.yaml")
    assert proxyMap.path == "here/map.yaml"
    assert [(m.name, m.line) for m in proxyMap.mappings] == [("ssh", 4), ("media", 8)]
    timeouts = Timeouts(connect=10.0, idle=0.0, udp=20.0)
    media = [
        Listener(
            "media",
            proto,
            "::1",
            port,
            Target("media.internal", port + 1000),
            timeouts,
            3,
        )
        for proto in ("udp", "tcp")
        for port in (5000, 5001)
    ]
    assert list(proxyMap.listeners()) == [
        Listener(
            "ssh", "tcp", "127.0.0.1", 2200, Target("172.17.0.2", 22), timeouts, 0
        ),
        *media,
    ]
    assert [listener.line for listener in proxyMap.listeners()] == [4, 8, 8, 8, 8]


# manhole

_MANHOLE_KEYS = "authorized_keys: /keys\n  host_key: /hostkey\n"


@pytest.mark.parametrize(
    "lines, expected",
    [
        (["listen: 2222"], ("127.0.0.1", 2222, False)),
        (["listen: 127.0.0.1:2222"], ("127.0.0.1", 2222, False)),
        (["listen: 127.5.5.5:2222"], ("127.5.5.5", 2222, False)),
        (['listen: "[::1]:2222"'], ("::1", 2222, False)),
        (["listen: 0.0.0.0:2222", "allow_remote: true"], ("0.0.0.0", 2222, True)),
        (['listen: "[::]:2222"', "allow_remote: true"], ("::", 2222, True)),
        (["listen: 10.1.2.3:2222", "allow_remote: true"], ("10.1.2.3", 2222, True)),
        (["listen: 127.0.0.1:2222", "allow_remote: false"], ("127.0.0.1", 2222, False)),
    ],
)
def test_manholeListen(lines: list[str], expected: tuple) -> None:
    """
    The manhole listens on loopback (127.0.0.1 when no host is given) unless
    C{allow_remote: true} lets it listen elsewhere.
    """
    text = (
        "manhole:\n" + "".join(f"  {line}\n" for line in lines) + "  " + _MANHOLE_KEYS
    )
    manhole = parseMap(text, "/etc/pp/map.yaml").manhole
    assert manhole == Manhole(*expected[:2], "/keys", "/hostkey", expected[2])
    assert manhole.line == 1


def test_manholePaths() -> None:
    """
    Relative manhole paths are resolved against the map file's directory;
    absolute ones are kept.
    """
    text = (
        "manhole:\n  listen: 2222\n  authorized_keys: keys/admin\n  host_key: /var/h\n"
    )
    manhole = parseMap(text, "/etc/pp/map.yaml").manhole
    assert (manhole.authorizedKeys, manhole.hostKey) == ("/etc/pp/keys/admin", "/var/h")
    manhole = parseMap(text, "map.yaml").manhole
    assert manhole.authorizedKeys == os.path.join(os.getcwd(), "keys", "admin")


def test_manholeEmpty() -> None:
    """
    A C{manhole:} section with every key commented out is no manhole.
    """
    assert parseMap("manhole:\n#  listen: 2222\n", "map.yaml").manhole is None


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            "  listen: 0.0.0.0:2222\n  " + _MANHOLE_KEYS,
            "map.yaml:2: manhole.listen: 0.0.0.0 is not a loopback address;"
            " add allow_remote: true to let other hosts log in",
        ),
        (
            '  listen: "[::]:2222"\n  ' + _MANHOLE_KEYS,
            "map.yaml:2: manhole.listen: :: is not a loopback address;"
            " add allow_remote: true to let other hosts log in",
        ),
        (
            "  listen: 192.168.1.1:2222\n  allow_remote: false\n  " + _MANHOLE_KEYS,
            "map.yaml:2: manhole.listen: 192.168.1.1 is not a loopback address;"
            " add allow_remote: true to let other hosts log in",
        ),
        (
            "  listen: 2222-2223\n  " + _MANHOLE_KEYS,
            "map.yaml:2: manhole.listen: expected one port, got 2222-2223",
        ),
        (
            "  listen: 99999\n  " + _MANHOLE_KEYS,
            "map.yaml:2: manhole.listen: port 99999 is out of range (1-65535)",
        ),
        (
            "  listen: localhost:2222\n  " + _MANHOLE_KEYS,
            "map.yaml:2: manhole.listen: 'localhost' is not an IP address (listen takes"
            " an IPv4 address or a bracketed IPv6 address such as [::1])",
        ),
        (
            "  listen: [2222]\n  " + _MANHOLE_KEYS,
            "map.yaml:2: manhole.listen: expected [HOST:]PORT, got a list",
        ),
        (
            "  listen: 2222\n  allow_remote: 'true'\n  " + _MANHOLE_KEYS,
            "map.yaml:3: manhole.allow_remote: expected true or false, got a string",
        ),
        (
            "  listen: 2222\n  allow_remote: 1\n  " + _MANHOLE_KEYS,
            "map.yaml:3: manhole.allow_remote: expected true or false, got an integer",
        ),
        (
            "  listen: 2222\n  authorized_keys: /k\n",
            "map.yaml:2: manhole: missing key 'host_key'",
        ),
        (
            "  listen: 2222\n  authorized_key: /k\n  host_key: /h\n",
            "map.yaml:3: manhole: unknown key 'authorized_key' (expected one of: listen,"
            " authorized_keys, host_key, allow_remote, login_grace_time, max_startups)",
        ),
        (
            "  listen: 2222\n  authorized_keys: ''\n  host_key: /h\n",
            "map.yaml:3: manhole.authorized_keys: the path is empty",
        ),
        (
            "  listen: 2222\n  authorized_keys: [/k]\n  host_key: /h\n",
            "map.yaml:3: manhole.authorized_keys: expected a file path, got a list",
        ),
        (
            "  listen: 2222\n  password: x\n  " + _MANHOLE_KEYS,
            "map.yaml:3: manhole: unknown key 'password' (expected one of: listen,"
            " authorized_keys, host_key, allow_remote, login_grace_time, max_startups)",
        ),
    ],
)
def test_manholeInvalid(body: str, expected: str) -> None:
    """
    Bad manhole settings are reported on their lines; a manhole outside
    loopback needs C{allow_remote: true}.
    """
    assert errorsOf("manhole:\n" + body) == [expected]


def test_manholeNotAMapping() -> None:
    """
    A C{manhole} that is not a mapping is reported.
    """
    assert errorsOf("manhole: 2222\n") == [
        "map.yaml:1: manhole: expected a mapping of listen, authorized_keys,"
        " host_key, allow_remote, login_grace_time, max_startups, got an integer"
    ]


def test_manholeMissingEverything() -> None:
    """
    Each required manhole key missing is its own error.
    """
    assert errorsOf("manhole:\n  allow_remote: false\n") == [
        "map.yaml:2: manhole: missing key 'listen'",
        "map.yaml:2: manhole: missing key 'authorized_keys'",
        "map.yaml:2: manhole: missing key 'host_key'",
    ]


@pytest.mark.parametrize(
    "listen, proto, manhole, expected",
    [
        (
            "127.0.0.1:2222",
            "tcp",
            "2222",
            "tcp 127.0.0.1:2222 overlaps mapping 'a' (line 2)",
        ),
        ("2222", "tcp", "2222", "tcp 127.0.0.1:2222 overlaps mapping 'a' (line 2)"),
        (
            "127.0.0.9:2222",
            "tcp",
            "0.0.0.0:2222",
            "tcp 0.0.0.0:2222 overlaps mapping 'a' (line 2)",
        ),
        (
            "[::]:2222",
            "tcp",
            "[::1]:2222",
            "tcp [::1]:2222 overlaps mapping 'a' (line 2)",
        ),
        ("127.0.0.2:2222", "tcp", "2222", None),
        ("[::]:2222", "tcp", "2222", None),
        ("2222", "udp", "2222", None),
        ("127.0.0.1:2223", "tcp", "2222", None),
    ],
)
def test_manholeOverlap(listen: str, proto: str, manhole: str, expected) -> None:
    """
    The manhole port may not collide with a TCP listener; UDP listeners and
    other addresses are no conflict.
    """
    text = f"""\
        mappings:
          - {{name: a, proto: {proto}, listen: "{listen}", target: "db:22"}}
        manhole:
          listen: "{manhole}"
          allow_remote: true
          authorized_keys: /k
          host_key: /h
        """
    if expected:
        assert errorsOf(text) == [f"map.yaml:4: manhole.listen: {expected}"]
    else:
        assert parseMap(dedent(text), "map.yaml").manhole.port == 2222


# files


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "{path}:1: the map is empty"),
        (b"# nothing yet\n\n", "{path}:1: the map is empty"),
        (
            b"- 1\n- 2\n",
            "{path}:1: expected a mapping with the keys defaults, mappings and manhole, got a list",
        ),
        (
            b"42\n",
            "{path}:1: expected a mapping with the keys defaults, mappings and manhole, got an integer",
        ),
        (
            b"mappings:\n  - listen: [80\n",
            "{path}:3: not valid YAML: did not find expected ',' or ']'"
            " (while parsing a flow sequence on line 2)",
        ),
        (
            b"a: b: c\n",
            "{path}:1: not valid YAML: mapping values are not allowed in this context",
        ),
        (
            b"mappings:\n\t- listen: 80\n",
            "{path}:2: not valid YAML: a tab where YAML expects spaces (indent with spaces only)",
        ),
        (
            b"mappings: []\n---\nmappings: []\n",
            "{path}:2: not valid YAML: expected a single document in the stream,"
            " but found another document",
        ),
        (
            b"mappings: []\n\x07\n",
            "{path}:2: not valid YAML: character #x0007 is not allowed",
        ),
        (b"mappings: []\n# caf\xe9\n", "{path}:2: not UTF-8 text (byte 0xe9)"),
        (
            b"mappings: " + b"[" * 2000 + b"]" * 2000,
            "{path}:1: not valid YAML: nested too deeply",
        ),
        (
            b"mappings:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 2000)),
            "{path}:1000: not valid YAML: nested too deeply",
        ),
    ],
)
def test_loadMapBadFile(tmp_path, content: bytes, expected: str) -> None:
    """
    A file that is empty, not YAML, not text, or not a mapping gives one
    clear line and no traceback.
    """
    path = tmp_path / "map.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        loadMap(str(path))
    assert caught.value.errors == [expected.format(path=path)]


def test_loadMapMissing(tmp_path) -> None:
    """
    A missing file is one line naming it and the system's reason.
    """
    path = str(tmp_path / "nowhere.yaml")
    with pytest.raises(ConfigError) as caught:
        loadMap(path)
    assert caught.value.errors == [f"{path}: cannot read: No such file or directory"]


def test_loadMapDirectory(tmp_path) -> None:
    """
    A directory given as the map is one line, not a traceback.
    """
    with pytest.raises(ConfigError) as caught:
        loadMap(str(tmp_path))
    assert caught.value.errors == [f"{tmp_path}: cannot read: Is a directory"]


def test_loadMapByteOrderMark(tmp_path) -> None:
    """
    A UTF-8 byte order mark, as some editors write, is accepted.
    """
    path = tmp_path / "map.yaml"
    path.write_bytes(b"\xef\xbb\xbfmappings:\n  - listen: 80\n    target: db:80\n")
    assert [m.name for m in loadMap(str(path)).mappings] == ["tcp-80"]


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examplesLoad(path: str) -> None:
    """
    Every example map in config/ is valid.
    """
    assert loadMap(path).mappings


def test_examplesPresent() -> None:
    """
    The examples the documentation names are all there.
    """
    assert [os.path.basename(path) for path in EXAMPLES] == [
        "docker-host.yaml",
        "docker.yaml",
        "dualstack.yaml",
        "example.yaml",
        "range.yaml",
        "udp.yaml",
    ]


def test_dockerHostExampleHasTheDefaultControlSocket() -> None:
    """
    config/docker-host.yaml opens the control socket where the shim looks
    by default, root only.
    """
    proxyMap = loadMap(os.path.join(REPO, "config", "docker-host.yaml"))
    assert proxyMap.control == Control("/run/portproxy/control.sock", 0o600)


def test_exampleIsSafeToRun() -> None:
    """
    config/example.yaml, the one a newcomer runs first, listens on loopback
    only, forwards to loopback only, and needs no manhole key files.
    """
    proxyMap = loadMap(os.path.join(REPO, "config", "example.yaml"))
    assert proxyMap.manhole is None
    for listener in proxyMap.listeners():
        assert listener.host.startswith("127.")
        assert listener.target.host.startswith("127.")
        assert listener.port >= 1024


def test_clientIdentityWithTLSIsRefused():
    """
    A mapping that originates (or terminates) TLS cannot also send or take
    the client's address: check says so on the client_address line.
    """
    assert errorsOf(
        oneMapping(
            "listen: 127.0.0.1:8443",
            "target: 127.0.0.1:443",
            "target_tls: true",
            "client_address: proxy_protocol_v2",
        )
    ) == [
        "map.yaml:6: client_address and accept_proxy_protocol cannot be combined with"
        " tls or target_tls (sni_routes can)"
    ]


def test_controlDefaults() -> None:
    """
    An empty control section mapping opens the socket at the default path
    with mode 0600; a control section with no value is absent.
    """
    assert parseMap("control: {}\n", "map.yaml").control == Control(
        "/run/portproxy/control.sock", 0o600
    )
    assert parseMap("control:\n", "map.yaml").control is None
    assert parseMap("mappings: []\n", "map.yaml").control is None


@pytest.mark.parametrize("mode", ["0660", "660", "0o660", '"0660"'])
def test_controlModeIsOctal(mode: str) -> None:
    """
    control.mode is read as octal however it is written, and a relative
    socket path is relative to the map's directory.
    """
    control = parseMap(
        f"control:\n  socket: run/ctl.sock\n  mode: {mode}\n", "/etc/pp/map.yaml"
    ).control
    assert control == Control("/etc/pp/run/ctl.sock", 0o660)


@pytest.mark.parametrize(
    "section, message",
    [
        (
            "control: /run/x.sock\n",
            "map.yaml:1: control: expected a mapping of socket, mode, got a string",
        ),
        ("control:\n  socket: ''\n", "map.yaml:2: control.socket: the path is empty"),
        (
            "control:\n  socket: 5\n",
            "map.yaml:2: control.socket: expected a file path, got an integer",
        ),
        (
            "control:\n  mode: 0800\n",
            "map.yaml:2: control.mode: '0800' is not a file mode (octal, 0000-0777, such as 0600 or 0660)",
        ),
        (
            "control:\n  mode: 01777\n",
            "map.yaml:2: control.mode: '01777' is not a file mode (octal, 0000-0777, such as 0600 or 0660)",
        ),
        (
            "control:\n  mode: true\n",
            "map.yaml:2: control.mode: expected a file mode such as 0600, got a boolean",
        ),
        (
            "control:\n  sock: /x\n",
            "map.yaml:2: control: unknown key 'sock' (expected one of: socket, mode)",
        ),
        (
            f"control:\n  socket: /{'x' * 120}\n",
            f"map.yaml:2: control.socket: /{'x' * 120} is 121 bytes long; a unix socket path has at most 107",
        ),
    ],
)
def test_controlInvalid(section: str, message: str) -> None:
    """
    A bad control section is reported with its line, like every section.
    """
    assert errorsOf(section) == [message]


def test_manholePreAuthenticationLimits() -> None:
    """
    login_grace_time and max_startups set the manhole's pre-authentication
    limits, and default to 30 seconds and 10 connections.
    """
    text = "manhole:\n  listen: 2222\n  " + _MANHOLE_KEYS
    manhole = parseMap(text, "map.yaml").manhole
    assert (manhole.loginGraceTime, manhole.maxStartups) == (30.0, 10)
    text += "\n  login_grace_time: 2m\n  max_startups: 3\n"
    manhole = parseMap(text, "map.yaml").manhole
    assert (manhole.loginGraceTime, manhole.maxStartups) == (120.0, 3)


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            "login_grace_time: 0",
            "map.yaml:5: manhole.login_grace_time: must be more than 0, got 0",
        ),
        (
            "login_grace_time: soon",
            "map.yaml:5: manhole.login_grace_time: 'soon' is not a duration",
        ),
        (
            "max_startups: -1",
            "map.yaml:5: manhole.max_startups: must not be negative, got -1",
        ),
        (
            "max_startups: many",
            "map.yaml:5: manhole.max_startups: expected a whole number",
        ),
    ],
)
def test_manholePreAuthenticationLimitErrors(line: str, expected: str) -> None:
    """
    Bad pre-authentication limits are reported with their line.
    """
    text = "manhole:\n  listen: 2222\n  " + _MANHOLE_KEYS + f"  {line}\n"
    with pytest.raises(ConfigError) as e:
        parseMap(text, "map.yaml")
    assert any(error.startswith(expected) for error in e.value.errors), e.value.errors


# message hygiene and limits


@pytest.mark.parametrize(
    "key, shown",
    [
        ('"a\\nb"', "'a\\\\nb'"),
        ('"a\\tb"', "'a\\\\tb'"),
        ('"a\\eb"', "'a\\\\x1bb'"),
        ('"a\\0b"', "'a\\\\x00b'"),
        ('"a\\u2028b"', "'a\\\\u2028b'"),
        ('"a\\\\nb"', "'a\\\\\\\\nb'"),
    ],
)
def test_controlCharactersEscaped(key: str, shown: str) -> None:
    """
    A key with a newline, tab, ESC, NUL, line separator or lone surrogate
    is quoted into its message escaped as in a Python string literal (and
    a backslash doubled), so the error is exactly one printable line.
    """
    errors = errorsOf(oneMapping("listen: 80", "target: db:80", f"{key}: 1"))
    assert errors == [
        f"map.yaml:5: mappings[0]: unknown key {shown.encode().decode('unicode_escape')}"
        f" (expected one of: {', '.join(MAPPING_KEYS)})"
    ]
    assert errors[0].isprintable()
    errors[0].encode("utf-8")


def test_everyMessageOneLine() -> None:
    """
    Values with control characters in every quoted place (a duplicate key,
    a protocol, a name, a port, a host) give one printable line each.
    """
    text = (
        "mappings:\n"
        '  - {name: "n\\x1b", proto: "t\\ncp", listen: "1\\r2", target: "h\\0st:80"}\n'
        '  - {"k\\n": 1, "k\\n": 2, listen: 80, target: "db:80"}\n'
    )
    errors = errorsOf(text)
    assert len(errors) == 6
    for error in errors:
        assert error.isprintable() and error.startswith("map.yaml:")


def test_errorsCapped() -> None:
    """
    At most 100 errors are listed, sorted by line, then one line saying how
    many more there are and from which line; the error counts them all.
    """
    text = "mappings:\n" + "".join(
        f"  - {{listen: {70000 + i}, target: db:80}}\n" for i in range(250)
    )
    with pytest.raises(ConfigError) as caught:
        parseMap(text, "map.yaml")
    errors = caught.value.errors
    assert len(errors) == 101
    assert errors[0] == "map.yaml:2: listen: port 70000 is out of range (1-65535)"
    assert errors[99] == "map.yaml:101: listen: port 70099 is out of range (1-65535)"
    assert errors[100] == "map.yaml:102: and 150 more errors, from this line on"
    assert caught.value.count == 250


def test_repeatedErrorOnce() -> None:
    """
    A bad value that aliases repeat in many mappings is reported once.
    """
    text = "defaults: {idle_timeout: &t soon}\nmappings:\n" + "".join(
        f"  - {{listen: {8000 + i}, target: db:80, idle_timeout: *t}}\n"
        for i in range(500)
    )
    assert errorsOf(text) == [
        f"map.yaml:1: {key}: 'soon' is not a duration ({_FORMS})"
        for key in ("defaults.idle_timeout", "idle_timeout")
    ]


def test_aliasOfMappingReportedOnce() -> None:
    """
    A mapping repeated by aliases (- *m) is one error on its line, naming
    the first repeat and counting the rest, and is read only once.
    """
    text = (
        "mappings:\n  - &m {name: m, listen: 80, target: db:80}\n" + "  - *m\n" * 4000
    )
    text += "  - &n {name: n, listen: 81, target: db:80}\n  - *n\n"
    assert errorsOf(text) == [
        "map.yaml:2: mappings[0]: an alias repeats it as mappings[1] and 3999 more;"
        " list each mapping once",
        "map.yaml:4003: mappings[4001]: an alias repeats it as mappings[4002];"
        " list each mapping once",
    ]


def test_protoListTooLong() -> None:
    """
    A protocol list longer than two is one error, however long, so an alias
    repeating it costs nothing per item.
    """
    errors = errorsOf(
        oneMapping("proto: [tcp, udp, tcp, udp, tcp]", "listen: 80", "target: db:80")
    )
    assert errors == [
        "map.yaml:3: proto: a list of 5 items (expected tcp, udp or both)"
    ]


@pytest.mark.parametrize("key", ["authorized_keys", "host_key"])
@pytest.mark.parametrize(
    "path, shown",
    [
        ('"/etc/k\\0x"', "'/etc/k\\x00x'"),
        ('"/etc/k\\nx"', "'/etc/k\\nx'"),
        ('"/etc/k\\ex"', "'/etc/k\\x1bx'"),
        ('"/etc/k\\x7f"', "'/etc/k\\x7f'"),
    ],
)
def test_manholePathUnusable(key: str, path: str, shown: str) -> None:
    """
    A manhole path with a NUL or another control character, or one the file
    system cannot encode, is an error of the map (so C{check} finds it), not
    a crash when the manhole starts.
    """
    paths = {"authorized_keys": "/etc/keys", "host_key": "/etc/host", key: path}
    text = "manhole:\n  listen: 2222\n" + "".join(
        f"  {k}: {v}\n" for k, v in paths.items()
    )
    errors = errorsOf(text, "map.yaml")
    line = 3 if key == "authorized_keys" else 4
    assert errors == [
        f"map.yaml:{line}: manhole.{key}: {shown} is not a usable path"
        " (it has control characters or is not valid text)"
    ]


def test_configErrorLinesPrintable() -> None:
    """
    Whatever a ConfigError is given, its lines have no control characters
    or lone surrogates (which could not even be printed as UTF-8).
    """
    error = ConfigError(["map.yaml:1: a\nb\x1b\ud800c", "map.yaml:2: plain"])
    assert error.errors == ["map.yaml:1: a\\nb\\x1b\\ud800c", "map.yaml:2: plain"]
    assert str(error).encode("utf-8")


def test_pureLoaderSameLines(monkeypatch) -> None:
    """
    libyaml's loader, used where PyYAML has it, and PyYAML's own
    pure-Python one give the same errors on the same lines (and the libyaml
    one is in use here, so the rest of these tests test it).
    """
    import yaml

    from twistedproxy import config

    assert issubclass(config._Loader, yaml.CSafeLoader)
    text = dedent(
        """\
        # a comment
        defaults: {connect_timeout: 017}
        mappings:
          - &m
            name: "a\\tb"
            listen: 127.0.0.1:80
            target: "db:80"

          - *m
          - {name: c, listen: "127.0.0.1:80-81", target: "db:80",
             max_connections: 1:30, udp_timeout: 5d}
        manhole: {listen: 2222, authorized_keys: "k\\0", host_key: h}
        """
    )
    first = errorsOf(text)
    monkeypatch.setattr(config, "_Loader", yaml.SafeLoader)
    assert errorsOf(text) == first
    assert [line.split(":")[1] for line in first] == [
        "2",
        "4",
        "5",
        "10",
        "11",
        "11",
        "12",
    ]


def test_modelInitializersTakeEveryField() -> None:
    """
    The hand-written initializers of the values a big map builds most of
    (Listener, Target, Mapping) take every field of the dataclass, in its
    order, with its default, and set each, as the generated ones would.
    """
    import dataclasses
    import inspect

    from twistedproxy.model import Listener, Mapping, Target

    for cls in (Listener, Target, Mapping):
        fields = dataclasses.fields(cls)
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert [p.name for p in parameters] == [f.name for f in fields]
        for parameter, field in zip(parameters, fields, strict=True):
            default = (
                inspect.Parameter.empty
                if field.default is dataclasses.MISSING
                else field.default
            )
            assert parameter.default == default, (cls, field.name)
        made = cls(*[object() for _ in fields])
        assert all(hasattr(made, f.name) for f in fields)
