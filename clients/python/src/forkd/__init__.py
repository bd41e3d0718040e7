"""Python client for forkd, the microVM sandbox runtime.

    import forkd

    with forkd.Controller("127.0.0.1:50051") as ctl:
        sb = ctl.spawn_sandboxes(n=1)[0]                   # sb.id, or sb["id"]
        print(ctl.exec(sb.id, ["echo", "hi"]).stdout)      # b'hi\\n'
        branch = ctl.branch_sandbox(sb.id, mode="live", wait=False)
        for update in ctl.watch_snapshot(branch.tag):      # or branch["tag"]
            print(forkd.status_name(update.status))   # writing ... ready

In a Linux sandbox (``spawn_sandboxes(image=...)``) files move in and out
as streams: ``write_file`` (bytes, a local path, a file object or an
iterable of chunks), ``read_file`` / ``iter_file`` (verified against the
guest's SHA-256), ``stat_file``, ``list_dir`` and ``remove_file``.

The API messages (``forkd.v1.sandbox_pb2`` / ``snapshot_pb2``) are generated
from the same .proto files as the server and the TypeScript client.
``spawn_sandboxes``, ``branch_sandbox`` and ``create_snapshot`` return
wrappers over them (:class:`SpawnResult`, :class:`BranchResult`,
:class:`CreateSnapshotResult`; ``.message`` is the generated message).
"""

from forkd.aio import AsyncController
from forkd.controller import DEFAULT_TARGET, Controller
from forkd.errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    ForkdError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from forkd.files import AsyncUploadSource, BinaryReader, BinaryWriter, UploadSource
from forkd.results import (
    BranchResult,
    CreateSnapshotResult,
    ExecEvent,
    ExecResult,
    FileInfo,
    ListDirResult,
    MessageView,
    ReadFileResult,
    SandboxView,
    SpawnResult,
    WriteFileResult,
)
from forkd.v1.sandbox_pb2 import (
    BranchSandboxResponse,
    GuestBoot,
    ReadConsoleResponse,
    Sandbox,
    SandboxState,
    SpawnSandboxesResponse,
)
from forkd.v1.snapshot_pb2 import (
    CreateSnapshotResponse,
    Snapshot,
    SnapshotStatus,
    WatchSnapshotResponse,
)
from forkd.v1.snapshot_pb2 import BranchMode as BranchModeEnum
from forkd.wire import BranchMode, FileTypeName, SnapshotStatusName, mode_name, status_name

__all__ = [
    "AlreadyExistsError",
    "AsyncController",
    "AsyncUploadSource",
    "BinaryReader",
    "BinaryWriter",
    "BranchMode",
    "BranchModeEnum",
    "BranchResult",
    "BranchSandboxResponse",
    "Controller",
    "CreateSnapshotResponse",
    "CreateSnapshotResult",
    "DEFAULT_TARGET",
    "DataLossError",
    "DeadlineExceededError",
    "ExecEvent",
    "ExecResult",
    "FailedPreconditionError",
    "FileInfo",
    "FileTypeName",
    "ForkdError",
    "GuestBoot",
    "InvalidArgumentError",
    "ListDirResult",
    "MessageView",
    "NotFoundError",
    "ReadConsoleResponse",
    "ReadFileResult",
    "ResourceExhaustedError",
    "Sandbox",
    "SandboxView",
    "SandboxState",
    "Snapshot",
    "SnapshotStatus",
    "SnapshotStatusName",
    "SpawnResult",
    "SpawnSandboxesResponse",
    "UnauthenticatedError",
    "UnavailableError",
    "UploadSource",
    "WatchSnapshotResponse",
    "WriteFileResult",
    "mode_name",
    "status_name",
]
