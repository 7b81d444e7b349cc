# The types of the compiled TCP engine (twistedproxy/tcp/_engine.c), for
# mypy; the C source's docstrings say what each does.

from typing import Any

DEFAULT_BUFFER_SIZE: int
DEFAULT_BUSY_POLL_US: int
DEFAULT_PIPE_SIZE: int

def accept(listeningFd: int, /) -> tuple[int, str] | None: ...
def acceptBatch(
    listeningFd: int, most: int, /
) -> tuple[list[tuple[int, str]], int]: ...

class TCPEngine:
    def __init__(
        self,
        pipeSize: int = ...,
        bufferSize: int = ...,
        busyPoll: int = ...,
        threads: int = ...,
    ) -> None: ...
    def adopt(
        self,
        clientFd: int,
        targetFd: int,
        flowId: int,
        idleTimeout: float,
        exclusive: bool = False,
    ) -> None: ...
    def dial(
        self,
        clientFds: list[int],
        flowIds: list[int],
        host: str,
        port: int,
        idleTimeout: float,
        headers: list[bytes] | None = None,
        access: tuple[Any, Any, str, str] | None = None,
        clients: list[str] | None = None,
        started: float = 0.0,
        /,
    ) -> list[int | str | None]: ...
    def close(self, flowId: int, /) -> bool: ...
    def counters(self, flowId: int, /) -> tuple[int, int] | None: ...
    def snapshot(self) -> list[tuple[int, int, int]]: ...
    def reports(self) -> list[tuple[int, int, int, str]]: ...
    def finished(
        self, now: float, /
    ) -> tuple[
        list[tuple[int, int, int, str]],
        list[tuple[Any, list[int], str, list[tuple], list[float], int, int]],
    ]: ...
    def flowCount(self) -> int: ...
    def fileno(self) -> int: ...
    def stop(self) -> None: ...
    def threadFlows(self) -> list[int]: ...
    def pollCounters(self) -> tuple[int, int, int]: ...
