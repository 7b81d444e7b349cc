"""
Build hook for the optional compiled UDP engine.

All metadata lives in pyproject.toml; this file only declares the C
extension C{twistedproxy._fastudp} (Linux: epoll, eventfd, recvmmsg,
IP_PKTINFO).  It is optional: where there is no C compiler, or on another
platform, C{pip install .} installs portproxy without it and the
pure-Python UDP forwarding is used.

For development, build it next to the sources with::

    python setup.py build_ext --inplace
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "twistedproxy._fastudp",
            ["twistedproxy/_fastudp.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
