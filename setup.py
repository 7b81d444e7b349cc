"""
Build hook for the optional compiled engines.

All metadata lives in pyproject.toml; this file only declares the C
extensions C{twistedproxy.tcp._engine} (TCP relays; Linux: splice, epoll,
eventfd), C{twistedproxy.udp._engine} (UDP sessions; Linux: epoll,
eventfd, recvmmsg/sendmmsg, IP_PKTINFO) and C{twistedproxy.tcp._tlsengine}
(TLS termination; OpenSSL, where its headers are installed), which share
one skeleton, C{twistedproxy/_engine.h}.  They are optional: where there is
no C compiler, or on another platform, C{pip install .} installs portproxy
without them and the pure-Python relays are used.

For development, build them next to the sources with::

    python setup.py build_ext --inplace
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: The Docker shim: an executable, not an extension module (see
#: docs/docker.md), built next to the extensions.
SHIM_SOURCE = "twistedproxy/_dockershim.c"
SHIM_NAME = "portproxy-docker-proxy"

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
    for protocol in ("tcp", "udp"):
        extensions.append(
            Extension(
                f"twistedproxy.{protocol}._engine",
                [f"twistedproxy/{protocol}/_engine.c"],
                include_dirs=["twistedproxy"],
                depends=["twistedproxy/_engine.h"],
                extra_compile_args=COMPILE_ARGS,
                optional=True,
            )
        )
    # The TLS termination engine needs OpenSSL's headers (libssl-dev).
    if os.path.exists("/usr/include/openssl/ssl.h"):
        extensions.append(
            Extension(
                "twistedproxy.tcp._tlsengine",
                ["twistedproxy/tcp/_tlsengine.c"],
                include_dirs=["twistedproxy"],
                depends=["twistedproxy/_engine.h"],
                extra_compile_args=COMPILE_ARGS,
                libraries=["ssl", "crypto"],
                optional=True,
            )
        )


class BuildWithShim(build_ext):
    """
    C{build_ext}, and then the Docker shim executable into the package
    (the source tree with C{--inplace}).  Like the extensions it is
    optional: without a C compiler it is left out with a warning, and
    C{python -m twistedproxy docker-setup} says so.
    """

    def run(self):
        build_ext.run(self)
        if sys.platform.startswith("linux"):
            self.buildShim()

    def buildShim(self):
        from distutils.errors import CCompilerError, DistutilsError

        if self.inplace:
            outputDir = self.get_finalized_command("build_py").get_package_dir(
                "twistedproxy"
            )
        else:
            outputDir = os.path.join(self.build_lib, "twistedproxy")
        os.makedirs(outputDir, exist_ok=True)
        version = self.distribution.get_version()
        try:
            objects = self.compiler.compile(
                [SHIM_SOURCE],
                output_dir=self.build_temp,
                macros=[("PORTPROXY_VERSION", f'"{version}"')],
                extra_postargs=COMPILE_ARGS,
                depends=[SHIM_SOURCE],
            )
            # Static where the C library allows it: no shared libraries
            # to map keeps each shim's memory at a few hundred KiB.
            for linkArgs in (["-static"], []):
                try:
                    self.compiler.link_executable(
                        objects,
                        SHIM_NAME,
                        output_dir=outputDir,
                        extra_postargs=linkArgs,
                    )
                    break
                except (CCompilerError, DistutilsError):
                    if not linkArgs:
                        raise
        except (CCompilerError, DistutilsError, OSError) as e:
            self.warn(f"the Docker shim {SHIM_NAME} was not built: {e}")


setup(ext_modules=extensions, cmdclass={"build_ext": BuildWithShim})
