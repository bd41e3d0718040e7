"""Request builders: the client's parameters turned into API messages.

The wire compatibility rules live here, once, for the sync and the asyncio
controller alike:

* ``mode`` wins over the legacy ``diff`` flag: when both are given only
  ``mode`` is sent (``diff`` stays unset on the wire);
* ``wait`` is on the wire only when it is False (the server's default is
  True; proto3 ``optional`` gives the field presence);
* ``live_fork`` is on the wire only when it is True.
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


def spawn_request(
    tag: str | None,
    n: int,
    *,
    live_fork: bool,
    memory_mib: int | None,
    labels: Mapping[str, str] | None,
    vcpus: int | None = None,
    wait_for_snapshot: bool = False,
) -> sandbox_pb2.SpawnSandboxesRequest:
    """SpawnSandboxesRequest; ``live_fork`` is present only when True."""
    req = sandbox_pb2.SpawnSandboxesRequest(
        snapshot_tag=tag or "",
        n=n,
        memory_mib=memory_mib or 0,
        vcpus=vcpus or 0,
        labels=dict(labels or {}),
        wait_for_snapshot=wait_for_snapshot,
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


def exec_request(sandbox_id: str, argv: Sequence[str], timeout: float | None) -> sandbox_pb2.ExecRequest:
    """ExecRequest; ``timeout`` (seconds) becomes the guest-side limit."""
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of strings, e.g. ['echo', 'hi'], not one string")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    timeout_ms = 0 if timeout is None else max(1, round(timeout * 1000))
    return sandbox_pb2.ExecRequest(sandbox_id=sandbox_id, argv=list(argv), timeout_ms=timeout_ms)


def create_snapshot_request(
    tag: str | None,
    memory_mib: int | None,
    vcpus: int | None,
    warmup: Sequence[Sequence[str]],
    keep_running: bool,
) -> snapshot_pb2.CreateSnapshotRequest:
    """CreateSnapshotRequest; each warmup entry is one argv."""
    return snapshot_pb2.CreateSnapshotRequest(
        tag=tag or "",
        memory_mib=memory_mib or 0,
        vcpus=vcpus or 0,
        warmup=[snapshot_pb2.WarmupCommand(argv=list(argv)) for argv in warmup],
        keep_running=keep_running,
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
