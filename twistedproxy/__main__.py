"""
C{python -m twistedproxy check MAP...}: validate map files without running
the proxy; C{python -m twistedproxy docker-setup}: print the daemon.json
fragment that makes dockerd use portproxy.

For each valid map one summary line goes to standard output (and its
warnings, C{FILE:LINE: warning: message}, to standard error); for each
invalid one every problem goes to standard error, one C{FILE:LINE: message}
per line.  The exit status is 0 when every map is valid, 1 when any is not,
and 2 for a command line that cannot be understood.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from twistedproxy.config import ConfigError, loadMap
from twistedproxy.model import PROTOCOLS, ProxyMap


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def summarize(proxyMap: ProxyMap) -> str:
    """
    One line saying what a valid map holds, such as C{map.yaml: OK,
    3 mappings, 12 listeners (10 tcp, 2 udp), manhole on 127.0.0.1:2222},
    and C{, http on 127.0.0.1:9180} when the map has an http section.
    """
    byProto = {proto: 0 for proto in PROTOCOLS}
    for listener in proxyMap.listeners():
        byProto[listener.proto] += 1
    protos = ", ".join(f"{count} {proto}" for proto, count in byProto.items())
    manhole = (
        f"manhole on {proxyMap.manhole.listen}"
        if proxyMap.manhole is not None
        else "no manhole"
    )
    http = f", http on {proxyMap.http.listen}" if proxyMap.http is not None else ""
    control = ""
    if proxyMap.control is not None:
        control = f", control socket {proxyMap.control.socket}"
    return (
        f"{proxyMap.path}: OK, {_plural(len(proxyMap.mappings), 'mapping')},"
        f" {_plural(sum(byProto.values()), 'listener')} ({protos}), {manhole}{http}{control}"
    )


def check(paths: Sequence[str], out: TextIO, err: TextIO) -> int:
    """
    Validate each map file in C{paths}; return the exit status.
    """
    status = 0
    for path in paths:
        try:
            proxyMap = loadMap(path)
        except ConfigError as e:
            for line in e.errors:
                print(line, file=err)
            status = 1
        else:
            for warning in proxyMap.warnings:
                print(warning, file=err)
            print(summarize(proxyMap), file=out)
    return status


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(
        prog="python -m twistedproxy",
        description="portproxy tools; the proxy itself runs as 'twistd portproxy -c MAP'.",
    )
    subcommands = commands.add_subparsers(
        dest="command", required=True, metavar="COMMAND"
    )
    checkCommand = subcommands.add_parser(
        "check",
        help="validate map files",
        description=(
            "Validate map files without running the proxy. Prints one summary line"
            " per valid map on standard output and every problem, one"
            " FILE:LINE: message per line, on standard error. Exit status: 0 all"
            " valid, 1 a map is invalid, 2 usage error."
        ),
    )
    checkCommand.add_argument("maps", nargs="+", metavar="MAP", help="a YAML map file")
    subcommands.add_parser(
        "docker-setup",
        help="print the daemon.json setting that makes dockerd use portproxy",
        description=(
            "Print, as JSON, the daemon.json fragment that makes dockerd run this"
            " installation's shim as its userland proxy. Exit status 1 when the"
            " shim was not built (no C compiler at install time)."
        ),
    )
    return commands


def dockerSetup(out: TextIO, err: TextIO) -> int:
    """
    Print C{{"userland-proxy-path": "/abs/path"}} for this installation's
    Docker shim; return the exit status.
    """
    from twistedproxy.control import shimPath

    path = shimPath()
    if not os.access(path, os.X_OK):
        print(
            f"{path}: the Docker shim is not built (was a C compiler missing when"
            " portproxy was installed?); install gcc and reinstall portproxy, or run"
            " 'python setup.py build_ext --inplace' in a checkout",
            file=err,
        )
        return 1
    print(json.dumps({"userland-proxy-path": path}), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line C{argv} (default: C{sys.argv[1:]}); return the
    exit status.  argparse exits with status 2 on a usage error.
    """
    arguments = parser().parse_args(argv)
    if arguments.command == "docker-setup":
        return dockerSetup(sys.stdout, sys.stderr)
    return check(arguments.maps, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
