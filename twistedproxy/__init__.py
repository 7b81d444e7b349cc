"""
portproxy: publish host ip:port endpoints to backend ip:port endpoints, TCP
and UDP, from one Twisted process driven by a YAML map.
"""

__version__ = "0.1.0"


def _loadEngines() -> None:
    """
    Load the compiled engines built into C{twistedproxy/tcp/} and
    C{twistedproxy/udp/} under their names C{twistedproxy.tcp._engine} and
    C{twistedproxy.udp._engine}, which the import system cannot reach while
    C{tcp.py} and C{udp.py} are modules rather than those packages (issue
    16 makes them packages; this function then goes).  An engine that is
    not built, or does not load, is left out, as its import would be.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    loaders = [
        (
            importlib.machinery.ExtensionFileLoader,
            importlib.machinery.EXTENSION_SUFFIXES,
        )
    ]
    for protocol in ("tcp", "udp"):
        name = f"{__name__}.{protocol}._engine"
        folder = os.path.join(os.path.dirname(__file__), protocol)
        spec = importlib.machinery.FileFinder(folder, *loaders).find_spec(name)
        if spec is None or spec.loader is None or name in sys.modules:
            continue
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError:
            continue
        sys.modules[name] = module


_loadEngines()
