"""
Build hook for the optional compiled engines.

All metadata lives in pyproject.toml; this file only declares the C
extensions C{twistedproxy._fastrelay} (TCP relays; Linux: splice, epoll,
eventfd) and C{twistedproxy._fastudp} (UDP sessions; Linux: epoll,
eventfd, recvmmsg/sendmmsg, IP_PKTINFO), which share C{_engine.h}.  They
are optional: where there is
no C compiler, or on another platform, C{pip install .} installs portproxy
without them and the pure-Python relays are used.

For development, build them next to the sources with::

    python setup.py build_ext --inplace
"""

import sys

from setuptools import Extension, setup

COMPILE_ARGS = [
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-missing-field-initializers",
]

extensions = []
if sys.platform.startswith("linux"):
    for name in ("_fastrelay", "_fastudp"):
        extensions.append(
            Extension(
                f"twistedproxy.{name}",
                [f"twistedproxy/{name}.c"],
                depends=["twistedproxy/_engine.h"],
                extra_compile_args=COMPILE_ARGS,
                optional=True,
            )
        )

setup(ext_modules=extensions)
