"""Result types: plain ones the API messages do not already give, and
wrappers that make some messages read natively (see below)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Generic, Literal, TypeVar, overload

import grpc
from google.protobuf import text_format
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer, ScalarMap
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from forkd.errors import ForkdError
from forkd.v1 import sandbox_pb2, snapshot_pb2
from forkd.wire import FileTypeName, file_type_name


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


# ---- files (Linux sandboxes) ---------------------------------------------------


@dataclass(frozen=True)
class WriteFileResult:
    """A finished upload (``write_file``): the file is under its final name."""

    path: str
    """The path written, in the sandbox."""
    size: int
    """Bytes written."""
    sha256: str
    """SHA-256 of the bytes written, as the guest computed it (lowercase hex)."""

    @staticmethod
    def from_message(msg: sandbox_pb2.WriteFileResponse) -> WriteFileResult:
        """Converts the WriteFileResponse."""
        return WriteFileResult(path=msg.path, size=msg.size, sha256=msg.sha256)


@dataclass(frozen=True)
class ReadFileResult:
    """A finished, verified download (``read_file`` into a local path or a
    file object): the received bytes matched ``size`` and ``sha256``."""

    size: int
    """Bytes received (those of the range asked for)."""
    sha256: str
    """SHA-256 of the bytes received (lowercase hex), as the guest sent and the client checked it."""
    file_size: int
    """The file's size when the guest opened it (0 for ``/proc`` files)."""

    @staticmethod
    def from_message(end: sandbox_pb2.ReadFileEnd) -> ReadFileResult:
        """Converts the stream's ReadFileEnd."""
        return ReadFileResult(size=end.size, sha256=end.sha256, file_size=end.file_size)


@dataclass(frozen=True)
class FileInfo:
    """One path of a Linux sandbox as ``lstat`` describes it (``stat_file``,
    and each entry of ``list_dir``)."""

    name: str
    """The last component of the path (``/`` for the root); bytes that are
    not UTF-8 show as U+FFFD."""
    size: int
    """Size in bytes (a symlink's is the length of its target)."""
    mode: int
    """Permission bits (``mode & 0o7777``); ``oct(info.mode)`` reads ``'0o644'``."""
    type: FileTypeName
    """``"file"``, ``"directory"``, ``"symlink"`` or ``"other"`` (a device, FIFO or socket)."""
    modify_time: datetime | None
    """Last modification (UTC), or None when the server sent none."""

    @property
    def is_file(self) -> bool:
        """True for a regular file."""
        return self.type == "file"

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return self.type == "directory"

    @property
    def is_symlink(self) -> bool:
        """True for a symbolic link (described, not followed)."""
        return self.type == "symlink"

    @staticmethod
    def from_message(msg: sandbox_pb2.FileInfo) -> FileInfo:
        """Converts a FileInfo message."""
        return FileInfo(
            name=msg.name,
            size=msg.size,
            mode=msg.mode,
            type=file_type_name(msg.type),
            modify_time=(
                msg.modify_time.ToDatetime(tzinfo=timezone.utc) if msg.HasField("modify_time") else None
            ),
        )


@dataclass
class ListDirResult:
    """A directory's entries (``list_dir``), sorted by name (bytewise),
    without ``.`` and ``..``. Iterating it (and ``len``) goes over
    ``entries``."""

    entries: list[FileInfo]
    truncated: bool = False
    """True when entries were left out: the daemon lists at most 4096 (and
    at most 512 KiB of them)."""

    @property
    def names(self) -> list[str]:
        """The entries' names, in order."""
        return [e.name for e in self.entries]

    def __iter__(self) -> Iterator[FileInfo]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def from_message(msg: sandbox_pb2.ListDirResponse) -> ListDirResult:
        """Converts the ListDirResponse."""
        return ListDirResult(entries=[FileInfo.from_message(e) for e in msg.entries], truncated=msg.truncated)


# ---- results that wrap API messages -------------------------------------------
#
# The Python protobuf runtime (upb) refuses subclasses of generated message
# classes, so the results below wrap the message instead: every attribute
# the message has (fields and methods such as HasField or
# SerializeToString) is read from it, ``["field"]`` reads the same value as
# ``.field``, and ``.message`` is the generated message itself, for APIs
# that need the real type (json_format.MessageToDict, CopyFrom, a repeated
# field's append, isinstance against the generated class).

M = TypeVar("M", bound=Message)


class _MessageWrapper(Generic[M]):
    """Attribute access delegated to a protobuf message."""

    __slots__ = ("_message",)
    _message: M

    def __init__(self, message: M) -> None:
        object.__setattr__(self, "_message", message)

    @property
    def message(self) -> M:
        """The generated protobuf message this result wraps."""
        return self._message

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks: the message's fields
        # and methods. _message itself is missing only mid-unpickling.
        if name == "_message" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(self._message, name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._message.DESCRIPTOR.fields_by_name:
            setattr(self._message, name, value)
            return
        raise AttributeError(f"{type(self).__name__} has no field {name!r} to set")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _MessageWrapper):
            other = other._message
        if isinstance(other, Message):
            return bool(self._message == other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # messages are mutable, so unhashable

    def __reduce__(self) -> tuple[type[_MessageWrapper[M]], tuple[M]]:
        return (type(self), (self._message,))

    def __repr__(self) -> str:
        body = text_format.MessageToString(self._message, as_one_line=True)
        return f"{type(self).__name__}({body})"


class MessageView(_MessageWrapper[M], Mapping[str, Any]):
    """A protobuf message read like a dict as well: ``view["id"]`` is
    ``view.id``. The keys are the message's field names (every field, set
    or not, as in the message), then any extra keys the class adds (for
    example ``tag``); values are what attribute access returns (enums are
    ints, maps and repeated fields the message's containers, nested
    messages the generated messages). An unknown key raises KeyError."""

    __slots__ = ()
    _extra_keys: ClassVar[tuple[str, ...]] = ()

    def _keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in self._message.DESCRIPTOR.fields) + self._extra_keys

    def __getitem__(self, key: str) -> Any:
        if isinstance(key, str):
            if key in self._extra_keys:
                return getattr(self, key)
            if key in self._message.DESCRIPTOR.fields_by_name:
                return getattr(self._message, key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (
            key in self._extra_keys or key in self._message.DESCRIPTOR.fields_by_name
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


class SandboxView(MessageView[sandbox_pb2.Sandbox]):
    """A :class:`forkd.Sandbox` message with item access: ``sb["id"]`` and
    ``sb.id`` alike. The fields are typed here; anything else the message
    has (``HasField``, ...) is read from it, and ``.message`` is the
    message itself. Writes to fields go to the message."""

    __slots__ = ()

    @property
    def id(self) -> str:
        return self._message.id

    @property
    def state(self) -> sandbox_pb2.SandboxState.ValueType:
        return self._message.state

    @property
    def snapshot_tag(self) -> str:
        return self._message.snapshot_tag

    @property
    def memory_mib(self) -> int:
        return self._message.memory_mib

    @property
    def vcpus(self) -> int:
        return self._message.vcpus

    @property
    def labels(self) -> ScalarMap[str, str]:
        return self._message.labels

    @property
    def create_time(self) -> Timestamp:
        return self._message.create_time

    @property
    def exit_reason(self) -> str:
        return self._message.exit_reason

    @property
    def vmm_pid(self) -> int:
        return self._message.vmm_pid

    @property
    def live_fork(self) -> bool:
        return self._message.live_fork

    @property
    def boot_ms(self) -> float:
        return self._message.boot_ms

    @property
    def huge_pages(self) -> bool:
        return self._message.huge_pages

    @property
    def image(self) -> str:
        return self._message.image

    @property
    def guest_boot(self) -> sandbox_pb2.GuestBoot:
        return self._message.guest_boot


class SpawnResult(_MessageWrapper[sandbox_pb2.SpawnSandboxesResponse], Sequence[SandboxView]):
    """What ``spawn_sandboxes`` returns: a sequence of the sandboxes that
    started (``len(res)``, ``res[0]``, ``res[-1]``, ``res[1:]``, ``for sb in
    res``; each a :class:`SandboxView`, so ``res[0]["id"]`` works), with the
    response's fields alongside: ``.failures`` (the sandboxes that did not
    start), ``.elapsed_ms``, and ``.sandboxes``, the response's own repeated
    field of plain :class:`forkd.Sandbox` messages, as before. It is true
    when at least one sandbox started. ``.message`` is the
    SpawnSandboxesResponse itself."""

    __slots__ = ("_views",)
    _views: tuple[SandboxView, ...]

    def __init__(self, message: sandbox_pb2.SpawnSandboxesResponse) -> None:
        super().__init__(message)
        object.__setattr__(self, "_views", tuple(SandboxView(sb) for sb in message.sandboxes))

    @property
    def sandboxes(self) -> RepeatedCompositeFieldContainer[sandbox_pb2.Sandbox]:
        return self._message.sandboxes

    @property
    def failures(self) -> RepeatedCompositeFieldContainer[sandbox_pb2.SpawnFailure]:
        return self._message.failures

    @property
    def elapsed_ms(self) -> float:
        return self._message.elapsed_ms

    @overload
    def __getitem__(self, index: int) -> SandboxView: ...

    @overload
    def __getitem__(self, index: slice) -> list[SandboxView]: ...

    def __getitem__(self, index: int | slice) -> SandboxView | list[SandboxView]:
        if isinstance(index, slice):
            return list(self._views[index])
        return self._views[index]

    def __len__(self) -> int:
        return len(self._views)

    def __iter__(self) -> Iterator[SandboxView]:
        return iter(self._views)

    def __bool__(self) -> bool:
        return bool(self._views)


class BranchResult(MessageView[sandbox_pb2.BranchSandboxResponse]):
    """What ``branch_sandbox`` returns: the BranchSandboxResponse's fields
    (``.snapshot``, ``.pause_ms``, ``.bytes_written``, ``.dirty_pages``,
    ``.faults_served``) plus ``.tag``, the new snapshot's tag; each also as
    ``res["tag"]``, ``res["pause_ms"]``, ... ``.message`` is the response
    itself."""

    __slots__ = ()
    _extra_keys = ("tag",)

    @property
    def tag(self) -> str:
        """The new snapshot's tag (``.snapshot.tag``)."""
        return self._message.snapshot.tag

    @property
    def snapshot(self) -> snapshot_pb2.Snapshot:
        return self._message.snapshot

    @property
    def pause_ms(self) -> float:
        return self._message.pause_ms

    @property
    def bytes_written(self) -> int:
        return self._message.bytes_written

    @property
    def dirty_pages(self) -> int:
        return self._message.dirty_pages

    @property
    def faults_served(self) -> int:
        return self._message.faults_served


class CreateSnapshotResult(MessageView[snapshot_pb2.CreateSnapshotResponse]):
    """What ``create_snapshot`` returns: ``.snapshot`` and ``.sandbox_id``
    (the warmed sandbox, with ``keep_running``) plus ``.tag``, the
    snapshot's tag; each also as ``res["tag"]``, ... ``.message`` is the
    CreateSnapshotResponse itself."""

    __slots__ = ()
    _extra_keys = ("tag",)

    @property
    def tag(self) -> str:
        """The snapshot's tag (``.snapshot.tag``)."""
        return self._message.snapshot.tag

    @property
    def snapshot(self) -> snapshot_pb2.Snapshot:
        return self._message.snapshot

    @property
    def sandbox_id(self) -> str:
        return self._message.sandbox_id
