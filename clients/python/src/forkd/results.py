"""Plain result types that the API messages do not already give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import grpc

from forkd.errors import ForkdError
from forkd.v1 import sandbox_pb2


@dataclass(frozen=True)
class ExecEvent:
    """One event of a streamed exec: an output chunk, or the final exit."""

    kind: Literal["stdout", "stderr", "exit"]
    data: bytes = b""
    exit_code: int | None = None
    duration_us: int | None = None
    signal: int | None = None
    """On ``exit``: the signal that killed the command (0 if it exited)."""

    @staticmethod
    def from_message(msg: sandbox_pb2.ExecResponse) -> ExecEvent:
        """Converts one ExecResponse of the stream."""
        which = msg.WhichOneof("event")
        if which == "stdout":
            return ExecEvent("stdout", data=msg.stdout)
        if which == "stderr":
            return ExecEvent("stderr", data=msg.stderr)
        if which == "exit":
            return ExecEvent(
                "exit",
                exit_code=msg.exit.exit_code,
                duration_us=msg.exit.duration_us,
                signal=msg.exit.signal,
            )
        raise ValueError(f"ExecResponse carries no event: {msg!r}")


@dataclass
class ExecResult:
    """A finished command: its whole output and its exit status.

    A non-zero ``exit_code`` is a result, not an error: the command ran.
    ``signal`` is the signal that killed it (for example 9 for SIGKILL), or 0
    if it exited by itself; when set, ``exit_code`` is ``128 + signal``, as
    shells report it. It is always 0 in a reference-guest sandbox.
    """

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    duration_us: int = 0
    signal: int = 0

    @property
    def ok(self) -> bool:
        """True when the command exited with 0."""
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")


class ExecCollector:
    """Folds the events of one exec stream into an ExecResult."""

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._exit: ExecEvent | None = None

    def add(self, ev: ExecEvent) -> None:
        """Records one event."""
        if ev.kind == "stdout":
            self._out.append(ev.data)
        elif ev.kind == "stderr":
            self._err.append(ev.data)
        else:
            self._exit = ev

    def result(self, method: str) -> ExecResult:
        """The folded result; a stream that ended without an exit is an error."""
        if self._exit is None:
            raise ForkdError(grpc.StatusCode.UNKNOWN, "the exec stream ended without an exit status", method=method)
        return ExecResult(
            stdout=b"".join(self._out),
            stderr=b"".join(self._err),
            exit_code=self._exit.exit_code or 0,
            duration_us=self._exit.duration_us or 0,
            signal=self._exit.signal or 0,
        )
