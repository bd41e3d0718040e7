"""The JSON shapes the tools return, and their conversion from API messages.

Enums become their short names (``"RUNNING"``, ``"READY"``, ``"LIVE"``),
timestamps RFC 3339 strings, and 64-bit counters plain JSON numbers, so a
model reads them without knowing protobuf's JSON mapping. The TypedDicts
double as each tool's published output schema.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
from collections.abc import Iterable
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from pydantic import ConfigDict, with_config

# pydantic, which derives the output schemas, needs typing_extensions'
# TypedDict below Python 3.12 (for nested ones too).
from typing_extensions import NotRequired, TypedDict

import forkd
from forkd.results import ExecEvent
from forkd.v1 import sandbox_pb2, snapshot_pb2


# The attribute docstrings below become field descriptions in the schemas.
_FIELD_DOCS = ConfigDict(use_attribute_docstrings=True)


@with_config(_FIELD_DOCS)
class GuestBootInfo(TypedDict):
    """Where a Linux guest's boot time went, measured inside the guest."""

    kernel_ms: float
    """From the kernel's start until the forkd agent started."""
    init_ms: float
    """The agent's own setup before it was ready."""


@with_config(_FIELD_DOCS)
class SandboxInfo(TypedDict):
    """One sandbox."""

    id: str
    state: str
    """STARTING, RUNNING, PAUSED, EXITED or FAILED."""
    snapshot_tag: str
    """The snapshot it was forked from; empty for a cold boot."""
    memory_mib: int
    vcpus: int
    labels: dict[str, str]
    create_time: str | None
    """When the spawn was requested (RFC 3339)."""
    exit_reason: str
    """Why it stopped, when state is EXITED or FAILED."""
    vmm_pid: int
    """Host pid of the sandbox's forkd-vmm (0 once it is gone)."""
    live_fork: bool
    boot_ms: float
    """Milliseconds from the spawn request to the guest's first answer."""
    image: str
    """The Linux image it booted; empty for the reference guest."""
    guest_boot: GuestBootInfo | None
    """A Linux guest's boot split; null for the reference guest."""
    expire_time: str | None
    """When it expires and is deleted (RFC 3339); null: never."""


@with_config(_FIELD_DOCS)
class SnapshotInfo(TypedDict):
    """One snapshot."""

    tag: str
    status: str
    """WRITING (a live copy in progress), READY or FAILED."""
    mode: str
    """FULL, DIFF or LIVE."""
    parent_tag: str
    """The snapshot a DIFF is against; empty for FULL and LIVE."""
    source_sandbox_id: str
    memory_mib: int
    vcpus: int
    memory_bytes: int
    """Guest memory held in this snapshot's own memory file."""
    disk_bytes: int
    """Bytes allocated on disk (the memory file is sparse)."""
    create_time: str | None
    failure_reason: str
    """Why writing failed, when status is FAILED."""
    chain: list[str]
    """Tags from this snapshot up to its full root, this one first."""
    dependents: list[str]
    """DIFF snapshots taken against this one."""
    children: list[str]
    """Ids of running sandboxes forked from this one."""
    image: str
    """The Linux image its guest booted (children run it too); empty for the
    reference guest."""


@with_config(_FIELD_DOCS)
class SpawnFailureInfo(TypedDict):
    """One requested sandbox that did not start."""

    index: int
    """Position in the request, 0 to n-1."""
    code: str
    """gRPC code name, for example RESOURCE_EXHAUSTED."""
    message: str


@with_config(_FIELD_DOCS)
class SpawnResult(TypedDict):
    """What spawn_sandboxes started."""

    sandboxes: list[SandboxInfo]
    failures: list[SpawnFailureInfo]
    """Requested sandboxes that did not start (the call fails only when none did)."""
    elapsed_ms: float


@with_config(_FIELD_DOCS)
class BranchResult(TypedDict):
    """The snapshot a branch_sandbox call made."""

    snapshot: SnapshotInfo
    pause_ms: float
    """How long the guest's vCPUs were stopped."""
    bytes_written: int
    """Bytes of memory written to the snapshot so far."""
    dirty_pages: int
    """Pages dirtied since the base snapshot (DIFF, or with measure_diff)."""
    faults_served: int
    """LIVE with wait: guest writes served by copying the page first."""


@with_config(_FIELD_DOCS)
class SnapshotUpdate(TypedDict):
    """One WatchSnapshot status update."""

    status: str
    bytes_copied: int
    bytes_total: int
    faults_served: int
    failure_reason: str


@with_config(_FIELD_DOCS)
class WatchResult(TypedDict):
    """Where a watched snapshot ended up."""

    tag: str
    status: str
    """The last status seen: READY or FAILED when done, else WRITING."""
    done: bool
    """True once the snapshot reached READY or FAILED."""
    failure_reason: str
    updates: list[SnapshotUpdate]
    """The most recent updates (at most 50), oldest first."""
    updates_seen: int


@with_config(_FIELD_DOCS)
class SandboxList(TypedDict):
    """The matching sandboxes, oldest first."""

    sandboxes: list[SandboxInfo]


@with_config(_FIELD_DOCS)
class SnapshotList(TypedDict):
    """The matching snapshots, oldest first."""

    snapshots: list[SnapshotInfo]


@with_config(_FIELD_DOCS)
class DeletedSnapshots(TypedDict):
    """The tags delete_snapshot removed, the requested one last."""

    deleted_tags: list[str]


@with_config(_FIELD_DOCS)
class SandboxTtl(TypedDict):
    """The sandbox set_sandbox_ttl changed, with its new expire_time."""

    sandbox: SandboxInfo


@with_config(_FIELD_DOCS)
class KilledSandbox(TypedDict):
    """The sandbox kill_sandbox removed, as it was just before."""

    sandbox: SandboxInfo


@with_config(_FIELD_DOCS)
class ExecOutput(TypedDict):
    """A finished command."""

    stdout: str
    stderr: str
    exit_code: int
    """128 + signal when the command was killed by a signal."""
    duration_us: int
    truncated: bool
    """True when stdout or stderr was cut to the server's output limit."""
    signal: NotRequired[int]
    """The signal that killed the command (for example 9 for SIGKILL); present only then."""


@with_config(_FIELD_DOCS)
class ConsoleOutput(TypedDict):
    """The end of a Linux sandbox's serial console log."""

    sandbox_id: str
    text: str
    """The console bytes as UTF-8 text (invalid bytes replaced)."""
    data_bytes: int
    """How many bytes of console log the text holds."""
    truncated: bool
    """True when older console output exists beyond what was returned."""


@with_config(_FIELD_DOCS)
class FileWritten(TypedDict):
    """The file write_file created or replaced."""

    path: str
    size: int
    """Bytes written."""
    sha256: str
    """SHA-256 of the bytes written, computed in the sandbox (lowercase hex)."""


@with_config(_FIELD_DOCS)
class FileContent(TypedDict):
    """Bytes read_file read from a file."""

    path: str
    offset: int
    """Where in the file these bytes start."""
    encoding: Literal["utf-8", "base64"]
    """How content is given: "utf-8" (the bytes are valid UTF-8 and content
    is that text) or "base64" (anything else, base64-encoded)."""
    content: str
    size: int
    """How many bytes content holds (decoded)."""
    sha256: str
    """SHA-256 of the bytes content holds (lowercase hex)."""
    truncated: bool
    """True when the file goes on after these bytes; read on from next_offset."""
    next_offset: int | None
    """Where the rest starts (offset + size) when truncated, else null."""
    file_size: int
    """The file's size when it was opened (0 for /proc files)."""


@with_config(_FIELD_DOCS)
class FileInfo(TypedDict):
    """One file, as lstat describes it (a symlink itself, not its target)."""

    name: str
    type: str
    """FILE, DIRECTORY, SYMLINK or OTHER (a device, FIFO or socket)."""
    size: int
    """Bytes (a symlink's is the length of its target)."""
    mode: str
    """Permission bits in octal, for example "0644"."""
    modify_time: str | None
    """Last modification (RFC 3339)."""


@with_config(_FIELD_DOCS)
class FileStat(FileInfo):
    """What stat_file found at a path."""

    path: str


@with_config(_FIELD_DOCS)
class DirListing(TypedDict):
    """A directory's entries, sorted by name, without . and .."""

    path: str
    entries: list[FileInfo]
    truncated: bool
    """True when the directory has more entries than returned (after these,
    or beyond what the sandbox lists at all); page with offset."""
    entries_listed: int
    """How many entries the sandbox listed (at most 4096), of which entries
    holds up to 200 from offset on."""


@with_config(_FIELD_DOCS)
class RemovedFile(TypedDict):
    """The path remove_file removed."""

    path: str
    recursive: bool


def _enum_name(name_of: dict[int, str], value: int) -> str:
    return name_of.get(value, str(value))


def _short_names(values: Iterable[tuple[str, int]], prefix: str) -> dict[int, str]:
    return {number: name.removeprefix(prefix) for name, number in values}


_SANDBOX_STATE = _short_names(sandbox_pb2.SandboxState.items(), "SANDBOX_STATE_")
_SNAPSHOT_STATUS = _short_names(snapshot_pb2.SnapshotStatus.items(), "SNAPSHOT_STATUS_")
_BRANCH_MODE = _short_names(snapshot_pb2.BranchMode.items(), "BRANCH_MODE_")


def snapshot_status_name(value: int) -> str:
    """``"WRITING"``, ``"READY"``, ``"FAILED"`` (or the number, if unknown)."""
    return _enum_name(_SNAPSHOT_STATUS, value)


def _time(has: bool, ts: Timestamp) -> str | None:
    return ts.ToJsonString() if has else None


def sandbox_info(sb: sandbox_pb2.Sandbox) -> SandboxInfo:
    """A Sandbox message as JSON."""
    return SandboxInfo(
        id=sb.id,
        state=_enum_name(_SANDBOX_STATE, sb.state),
        snapshot_tag=sb.snapshot_tag,
        memory_mib=sb.memory_mib,
        vcpus=sb.vcpus,
        labels=dict(sb.labels),
        create_time=_time(sb.HasField("create_time"), sb.create_time),
        exit_reason=sb.exit_reason,
        vmm_pid=sb.vmm_pid,
        live_fork=sb.live_fork,
        boot_ms=sb.boot_ms,
        image=sb.image,
        guest_boot=(
            GuestBootInfo(kernel_ms=sb.guest_boot.kernel_ms, init_ms=sb.guest_boot.init_ms)
            if sb.HasField("guest_boot")
            else None
        ),
        expire_time=_time(sb.HasField("expire_time"), sb.expire_time),
    )


def snapshot_info(snap: snapshot_pb2.Snapshot) -> SnapshotInfo:
    """A Snapshot message as JSON."""
    return SnapshotInfo(
        tag=snap.tag,
        status=snapshot_status_name(snap.status),
        mode=_enum_name(_BRANCH_MODE, snap.mode),
        parent_tag=snap.parent_tag,
        source_sandbox_id=snap.source_sandbox_id,
        memory_mib=snap.memory_mib,
        vcpus=snap.vcpus,
        memory_bytes=snap.memory_bytes,
        disk_bytes=snap.disk_bytes,
        create_time=_time(snap.HasField("create_time"), snap.create_time),
        failure_reason=snap.failure_reason,
        chain=list(snap.chain),
        dependents=list(snap.dependents),
        children=list(snap.children),
        image=snap.image,
    )


def spawn_result(resp: sandbox_pb2.SpawnSandboxesResponse) -> SpawnResult:
    """A SpawnSandboxesResponse as JSON."""
    return SpawnResult(
        sandboxes=[sandbox_info(sb) for sb in resp.sandboxes],
        failures=[SpawnFailureInfo(index=f.index, code=f.code, message=f.message) for f in resp.failures],
        elapsed_ms=resp.elapsed_ms,
    )


def branch_result(resp: sandbox_pb2.BranchSandboxResponse) -> BranchResult:
    """A BranchSandboxResponse as JSON."""
    return BranchResult(
        snapshot=snapshot_info(resp.snapshot),
        pause_ms=resp.pause_ms,
        bytes_written=resp.bytes_written,
        dirty_pages=resp.dirty_pages,
        faults_served=resp.faults_served,
    )


def snapshot_update(msg: snapshot_pb2.WatchSnapshotResponse) -> SnapshotUpdate:
    """A WatchSnapshotResponse as JSON (its tag is the watch's own)."""
    return SnapshotUpdate(
        status=snapshot_status_name(msg.status),
        bytes_copied=msg.bytes_copied,
        bytes_total=msg.bytes_total,
        faults_served=msg.faults_served,
        failure_reason=msg.failure_reason,
    )


class ExecCollector:
    """Folds an exec stream into an ExecOutput, keeping at most ``limit``
    bytes of each of stdout and stderr (the rest is counted, not held)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._out = bytearray()
        self._err = bytearray()
        self._truncated = False
        self._exit: ExecEvent | None = None

    def add(self, ev: ExecEvent) -> None:
        """Records one event of the stream."""
        if ev.kind == "exit":
            self._exit = ev
            return
        buf = self._out if ev.kind == "stdout" else self._err
        room = self._limit - len(buf)
        if len(ev.data) > room:
            self._truncated = True
        buf += ev.data[: max(room, 0)]

    def output(self) -> ExecOutput | None:
        """The command's output, or None when the stream carried no exit."""
        if self._exit is None:
            return None
        output = ExecOutput(
            stdout=self._out.decode("utf-8", "replace"),
            stderr=self._err.decode("utf-8", "replace"),
            exit_code=self._exit.exit_code or 0,
            duration_us=self._exit.duration_us or 0,
            truncated=self._truncated,
        )
        if self._exit.signal:
            output["signal"] = self._exit.signal
        return output


def console_output(sandbox_id: str, resp: sandbox_pb2.ReadConsoleResponse) -> ConsoleOutput:
    """A ReadConsoleResponse as JSON."""
    return ConsoleOutput(
        sandbox_id=sandbox_id,
        text=resp.data.decode("utf-8", "replace"),
        data_bytes=len(resp.data),
        truncated=resp.truncated,
    )


def file_written(res: forkd.WriteFileResult) -> FileWritten:
    """A write_file result as JSON."""
    return FileWritten(path=res.path, size=res.size, sha256=res.sha256)


def file_content(path: str, offset: int, data: bytes, max_bytes: int, file_size: int) -> FileContent:
    """Up to ``max_bytes`` of ``data`` (read with one byte more, to tell
    whether the file goes on) as JSON: text when the bytes are UTF-8, else
    base64. A cut that splits a UTF-8 character keeps the text and ends
    before that character (the rest is read from next_offset)."""
    truncated = len(data) > max_bytes
    data = data[:max_bytes]
    text: str | None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
        if truncated:
            try:
                whole = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
            except UnicodeDecodeError:
                whole = ""
            if whole:
                text = whole
                data = data[: len(whole.encode("utf-8"))]
    if text is not None:
        encoding: Literal["utf-8", "base64"] = "utf-8"
        content = text
    else:
        encoding, content = "base64", base64.b64encode(data).decode("ascii")
    return FileContent(
        path=path,
        offset=offset,
        encoding=encoding,
        content=content,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        truncated=truncated,
        next_offset=offset + len(data) if truncated else None,
        file_size=file_size,
    )


def file_info(info: forkd.FileInfo) -> FileInfo:
    """A FileInfo as JSON: the type's upper-case name, the mode in octal."""
    return FileInfo(
        name=info.name,
        type=info.type.upper(),
        size=info.size,
        mode=f"{info.mode:04o}",
        modify_time=info.modify_time.isoformat().replace("+00:00", "Z") if info.modify_time else None,
    )


def file_stat(path: str, info: forkd.FileInfo) -> FileStat:
    """A stat_file result as JSON."""
    return FileStat(path=path, **file_info(info))


def dir_listing(path: str, listing: forkd.ListDirResult, offset: int, limit: int) -> DirListing:
    """Up to ``limit`` entries of a listing, from ``offset`` on, as JSON."""
    entries = listing.entries[offset : offset + limit]
    return DirListing(
        path=path,
        entries=[file_info(e) for e in entries],
        truncated=listing.truncated or offset + limit < len(listing.entries),
        entries_listed=len(listing.entries),
    )
