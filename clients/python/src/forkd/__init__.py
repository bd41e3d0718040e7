"""Python client for forkd, the microVM sandbox runtime.

    import forkd

    with forkd.Controller("127.0.0.1:50051") as ctl:
        sb = ctl.spawn_sandboxes(n=1).sandboxes[0]
        print(ctl.exec(sb.id, ["echo", "hi"]).stdout)      # b'hi\\n'
        snap = ctl.branch_sandbox(sb.id, mode="live", wait=False).snapshot
        for update in ctl.watch_snapshot(snap.tag):
            print(forkd.status_name(update.status))   # writing ... ready

The API messages (``forkd.v1.sandbox_pb2`` / ``snapshot_pb2``) are generated
from the same .proto files as the server and the TypeScript client.
"""

from forkd.aio import AsyncController
from forkd.controller import DEFAULT_TARGET, Controller
from forkd.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    ForkdError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from forkd.results import ExecEvent, ExecResult
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
from forkd.wire import BranchMode, SnapshotStatusName, mode_name, status_name

__all__ = [
    "AlreadyExistsError",
    "AsyncController",
    "BranchMode",
    "BranchModeEnum",
    "BranchSandboxResponse",
    "Controller",
    "CreateSnapshotResponse",
    "DEFAULT_TARGET",
    "DeadlineExceededError",
    "ExecEvent",
    "ExecResult",
    "FailedPreconditionError",
    "ForkdError",
    "GuestBoot",
    "InvalidArgumentError",
    "NotFoundError",
    "ReadConsoleResponse",
    "ResourceExhaustedError",
    "Sandbox",
    "SandboxState",
    "Snapshot",
    "SnapshotStatus",
    "SnapshotStatusName",
    "SpawnSandboxesResponse",
    "UnauthenticatedError",
    "UnavailableError",
    "WatchSnapshotResponse",
    "mode_name",
    "status_name",
]
