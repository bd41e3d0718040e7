"""Request builders: the client's parameters turned into API messages.

The wire compatibility rules live here, once, for the sync and the asyncio
controller alike:

* ``mode`` wins over the legacy ``diff`` flag: when both are given only
  ``mode`` is sent (``diff`` stays unset on the wire);
* ``wait`` is on the wire only when it is False (the server's default is
  True; proto3 ``optional`` gives the field presence);
* ``live_fork`` is on the wire only when it is True.

Fields the reference guest does not know (``image``, and Exec's ``env``,
``cwd`` and ``stdin``) are on the wire only when given, so a request made
without them is byte for byte what older clients sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from forkd.v1 import sandbox_pb2, snapshot_pb2

BranchMode = Literal["full", "diff", "live"]
"""How a branch captures guest memory (see ``Controller.branch_sandbox``)."""

_MODES: dict[BranchMode, snapshot_pb2.BranchMode.ValueType] = {
    "full": snapshot_pb2.BRANCH_MODE_FULL,
    "diff": snapshot_pb2.BRANCH_MODE_DIFF,
    "live": snapshot_pb2.BRANCH_MODE_LIVE,
}

SnapshotStatusName = Literal["writing", "ready", "failed"]
"""A snapshot status filter for ``list_snapshots``."""

_STATUSES: dict[SnapshotStatusName, snapshot_pb2.SnapshotStatus.ValueType] = {
    "writing": snapshot_pb2.SNAPSHOT_STATUS_WRITING,
    "ready": snapshot_pb2.SNAPSHOT_STATUS_READY,
    "failed": snapshot_pb2.SNAPSHOT_STATUS_FAILED,
}


def status_name(value: int) -> SnapshotStatusName | Literal["unspecified"]:
    """The lowercase name of a SnapshotStatus value, e.g. ``"ready"``."""
    for name, v in _STATUSES.items():
        if v == value:
            return name
    return "unspecified"


def mode_name(value: int) -> BranchMode | Literal["unspecified"]:
    """The lowercase name of a BranchMode value, e.g. ``"live"``."""
    for name, v in _MODES.items():
        if v == value:
            return name
    return "unspecified"


def branch_mode_value(mode: str) -> snapshot_pb2.BranchMode.ValueType:
    """The enum value for a BranchMode name; ValueError names the choices."""
    for name, value in _MODES.items():
        if name == mode:
            return value
    choices = ", ".join(repr(m) for m in get_args(BranchMode))
    raise ValueError(f"mode must be one of {choices} (or None), not {mode!r}")


def _check_image(image: object) -> None:
    """TypeError unless ``image`` is a Linux image name or None."""
    if image is not None and not isinstance(image, str):
        raise TypeError(f"image must be a string (a Linux image name) or None, not {type(image).__name__}")


def spawn_request(
    tag: str | None,
    n: int,
    *,
    live_fork: bool,
    memory_mib: int | None,
    labels: Mapping[str, str] | None,
    vcpus: int | None = None,
    wait_for_snapshot: bool = False,
    image: str | None = None,
    ttl_seconds: int | None = None,
    huge_pages: bool = False,
) -> sandbox_pb2.SpawnSandboxesRequest:
    """SpawnSandboxesRequest; ``live_fork`` is present only when True,
    ``image`` only when non-empty, ``ttl_seconds`` None is 0 (the daemon's
    ``--default-ttl``)."""
    _check_image(image)
    ttl = check_ttl(ttl_seconds or 0)
    req = sandbox_pb2.SpawnSandboxesRequest(
        snapshot_tag=tag or "",
        n=n,
        memory_mib=memory_mib or 0,
        vcpus=vcpus or 0,
        labels=dict(labels or {}),
        wait_for_snapshot=wait_for_snapshot,
        image=image or "",
        ttl_seconds=ttl,
        huge_pages=huge_pages,
    )
    if live_fork:
        req.live_fork = True
    return req


def branch_request(
    sandbox_id: str,
    tag: str | None,
    diff: bool,
    measure_diff: bool,
    mode: BranchMode | None,
    wait: bool,
) -> sandbox_pb2.BranchSandboxRequest:
    """BranchSandboxRequest under the compatibility rules (module docstring)."""
    req = sandbox_pb2.BranchSandboxRequest(
        sandbox_id=sandbox_id,
        tag=tag or "",
        measure_diff=measure_diff,
    )
    if mode is not None:
        req.mode = branch_mode_value(mode)
    elif diff:
        req.diff = True
    if not wait:
        req.wait = False
    return req


def exec_request(
    sandbox_id: str,
    argv: Sequence[str],
    timeout: float | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | str | None = None,
) -> sandbox_pb2.ExecRequest:
    """ExecRequest; ``timeout`` (seconds) becomes the guest-side limit.

    ``env``, ``cwd`` and ``stdin`` (Linux sandboxes only) are sent only when
    given; a ``str`` stdin is encoded as UTF-8. The server checks their
    contents (absolute cwd, no NUL, stdin at most 1 MiB).
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of strings, e.g. ['echo', 'hi'], not one string")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    timeout_ms = 0 if timeout is None else max(1, round(timeout * 1000))
    req = sandbox_pb2.ExecRequest(sandbox_id=sandbox_id, argv=list(argv), timeout_ms=timeout_ms)
    if env is not None:
        if isinstance(env, (str, bytes)) or not isinstance(env, Mapping):
            raise TypeError(f"env must be a mapping of strings to strings, not {type(env).__name__}")
        for key, value in env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"env must map strings to strings; got {key!r}: {value!r}")
            req.env[key] = value
    if cwd is not None:
        if not isinstance(cwd, str):
            raise TypeError(f"cwd must be a string (an absolute guest path) or None, not {type(cwd).__name__}")
        req.cwd = cwd
    if stdin is not None:
        if isinstance(stdin, str):
            req.stdin = stdin.encode("utf-8")
        elif isinstance(stdin, (bytes, bytearray, memoryview)):
            req.stdin = bytes(stdin)
        else:
            raise TypeError(f"stdin must be bytes or str (sent as UTF-8) or None, not {type(stdin).__name__}")
    return req


def check_ttl(ttl_seconds: int) -> int:
    """A lifetime in seconds as the wire carries it (uint64); ValueError
    for anything else. The daemon applies its own ``--max-ttl``."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 0 <= ttl_seconds < 2**64:
        raise ValueError(f"ttl_seconds must be an integer number of seconds from 0 up, not {ttl_seconds!r}")
    return ttl_seconds


def set_sandbox_ttl_request(sandbox_id: str, ttl_seconds: int) -> sandbox_pb2.SetSandboxTtlRequest:
    """SetSandboxTtlRequest; ``ttl_seconds`` 0 clears the expiry."""
    return sandbox_pb2.SetSandboxTtlRequest(sandbox_id=sandbox_id, ttl_seconds=check_ttl(ttl_seconds))


def read_console_request(sandbox_id: str, tail_bytes: int) -> sandbox_pb2.ReadConsoleRequest:
    """ReadConsoleRequest; ``tail_bytes`` 0 means the server's 64 KiB."""
    if isinstance(tail_bytes, bool) or not isinstance(tail_bytes, int) or not 0 <= tail_bytes <= 0xFFFF_FFFF:
        raise ValueError(f"tail_bytes must be an integer from 0 (the server's default) up, not {tail_bytes!r}")
    return sandbox_pb2.ReadConsoleRequest(sandbox_id=sandbox_id, tail_bytes=tail_bytes)


def create_snapshot_request(
    tag: str | None,
    memory_mib: int | None,
    vcpus: int | None,
    warmup: Sequence[Sequence[str]],
    keep_running: bool,
    image: str | None = None,
) -> snapshot_pb2.CreateSnapshotRequest:
    """CreateSnapshotRequest; each warmup entry is one argv, ``image`` is
    on the wire only when non-empty."""
    _check_image(image)
    return snapshot_pb2.CreateSnapshotRequest(
        tag=tag or "",
        memory_mib=memory_mib or 0,
        vcpus=vcpus or 0,
        warmup=[snapshot_pb2.WarmupCommand(argv=list(argv)) for argv in warmup],
        keep_running=keep_running,
        image=image or "",
    )


def list_snapshots_request(status: SnapshotStatusName | None) -> snapshot_pb2.ListSnapshotsRequest:
    """ListSnapshotsRequest filtered by a status name, or unfiltered."""
    if status is None:
        return snapshot_pb2.ListSnapshotsRequest()
    for name, value in _STATUSES.items():
        if name == status:
            return snapshot_pb2.ListSnapshotsRequest(status=value)
    choices = ", ".join(repr(s) for s in get_args(SnapshotStatusName))
    raise ValueError(f"status must be one of {choices} (or None), not {status!r}")


# ---- files (Linux sandboxes) ---------------------------------------------------

FileTypeName = Literal["file", "directory", "symlink", "other", "unspecified"]
"""What kind of file a path names (``FileInfo.type``)."""

_FILE_TYPES: dict[sandbox_pb2.FileType.ValueType, FileTypeName] = {
    sandbox_pb2.FILE_TYPE_FILE: "file",
    sandbox_pb2.FILE_TYPE_DIRECTORY: "directory",
    sandbox_pb2.FILE_TYPE_SYMLINK: "symlink",
    sandbox_pb2.FILE_TYPE_OTHER: "other",
}


def file_type_name(value: int) -> FileTypeName:
    """The lowercase name of a FileType value, e.g. ``"directory"``."""
    for number, name in _FILE_TYPES.items():
        if number == value:
            return name
    return "unspecified"


DEFAULT_CHUNK_SIZE = 1 << 20
"""Bytes per WriteFile data message unless told otherwise (1 MiB)."""
MAX_CHUNK_SIZE = 3 << 20
"""The largest chunk the client sends: a message must stay under gRPC's 4 MiB limit."""


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` if it is an integer from 1 to 3 MiB; ValueError otherwise."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk_size must be an integer from 1 to {MAX_CHUNK_SIZE} bytes (3 MiB: a gRPC message"
            f" must stay under 4 MiB), not {chunk_size!r}"
        )
    return chunk_size


def _check_path(path: object) -> str:
    """``path`` if it is a string; the server checks the rest (absolute, no NUL)."""
    if not isinstance(path, str):
        raise TypeError(f"path must be a string (an absolute path in the sandbox), not {type(path).__name__}")
    return path


def _check_u64(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"{name} must be an integer from 0 up, not {value!r}")
    return value


def write_file_header(
    sandbox_id: str,
    path: str,
    *,
    mode: int = 0,
    make_parents: bool = False,
    no_overwrite: bool = False,
) -> sandbox_pb2.WriteFileRequest:
    """The first WriteFileRequest of an upload: its header. ``mode`` 0 means
    0644; other values must fit the permission bits (0 to 0o7777)."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f"mode must be permission bits from 0 to 0o7777 (e.g. 0o755; 0 means 0o644), not {mode!r}")
    header = sandbox_pb2.WriteFileHeader(
        sandbox_id=sandbox_id,
        path=_check_path(path),
        mode=mode,
        make_parents=make_parents,
        no_overwrite=no_overwrite,
    )
    return sandbox_pb2.WriteFileRequest(header=header)


def read_file_request(sandbox_id: str, path: str, offset: int, length: int) -> sandbox_pb2.ReadFileRequest:
    """ReadFileRequest; ``length`` 0 means to the end of the file."""
    return sandbox_pb2.ReadFileRequest(
        sandbox_id=sandbox_id,
        path=_check_path(path),
        offset=_check_u64("offset", offset),
        length=_check_u64("length", length),
    )


def stat_file_request(sandbox_id: str, path: str) -> sandbox_pb2.StatFileRequest:
    """StatFileRequest."""
    return sandbox_pb2.StatFileRequest(sandbox_id=sandbox_id, path=_check_path(path))


def list_dir_request(sandbox_id: str, path: str) -> sandbox_pb2.ListDirRequest:
    """ListDirRequest."""
    return sandbox_pb2.ListDirRequest(sandbox_id=sandbox_id, path=_check_path(path))


def remove_file_request(sandbox_id: str, path: str, recursive: bool) -> sandbox_pb2.RemoveFileRequest:
    """RemoveFileRequest; ``recursive`` removes a directory and its contents."""
    return sandbox_pb2.RemoveFileRequest(sandbox_id=sandbox_id, path=_check_path(path), recursive=recursive)
