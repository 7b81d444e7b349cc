# The types of the compiled TLS termination engine
# (twistedproxy/tcp/_tlsengine.c), for mypy; the C source's docstrings say
# what each does.

from typing import Any

class Context:
    def __init__(
        self,
        pairs: list[tuple[bytes, bytes]],
        names: list[tuple[str, int]],
        clientCA: bytes | None,
        minVersion: str,
        /,
    ) -> None: ...

class TLSEngine:
    wakeFd: int
    notifyFd: int
    def __init__(self, threads: int = 0) -> None: ...
    def adopt(
        self,
        fd: int,
        flowId: int,
        context: Context,
        target: tuple[str, int],
        connectTimeout: float,
        idleTimeout: float,
    ) -> None: ...
    def close(self, flowId: int, reset: bool = True) -> bool: ...
    def counters(self, flowId: int, /) -> tuple[int, int] | None: ...
    # ("handshake", flowId, serverName, subject) and
    # ("ended", flowId, bytesIn, bytesOut, reason)
    def reports(self) -> list[tuple[Any, ...]]: ...
    def flowCount(self) -> int: ...
    def fileno(self) -> int: ...
    def stop(self) -> None: ...
    def threadFlows(self) -> list[int]: ...
