"""
Build hook for the optional compiled relay engine.

All metadata lives in pyproject.toml; this file only declares the C
extension C{twistedproxy._fastrelay} (Linux: splice, epoll, eventfd).  It
is optional: where there is no C compiler, or on another platform, C{pip
install .} installs portproxy without it and the pure-Python relay is used.

For development, build it next to the sources with::

    python setup.py build_ext --inplace
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "twistedproxy._fastrelay",
            ["twistedproxy/_fastrelay.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
