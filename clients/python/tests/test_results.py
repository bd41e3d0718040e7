"""Results that read natively, from both controllers against a stand-in
gRPC server on loopback that answers canned responses:

- the spawn result is a sequence of its sandboxes (len, iteration,
  indexing, negative indexes, slices, truthiness) with ``.failures``,
  ``.elapsed_ms``, ``.sandboxes`` and the message's methods as before;
- each sandbox reads as ``sb.id`` and ``sb["id"]``;
- a branch result (and a create-snapshot result) has ``.tag`` and
  ``["tag"]`` besides the response's own fields;
- ``.message`` is the generated message, for the APIs that need it.
"""

from __future__ import annotations

import asyncio
import copy
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any, cast

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

import forkd
from forkd.v1 import sandbox_pb2, snapshot_pb2

SANDBOXES = [
    sandbox_pb2.Sandbox(
        id="sb-one",
        state=sandbox_pb2.SANDBOX_STATE_RUNNING,
        snapshot_tag="warm",
        memory_mib=128,
        vcpus=2,
        labels={"team": "py"},
        vmm_pid=4242,
        boot_ms=1.5,
    ),
    sandbox_pb2.Sandbox(id="sb-two", snapshot_tag="warm", memory_mib=128),
    sandbox_pb2.Sandbox(
        id="sb-three",
        image="debian-12",
        guest_boot=sandbox_pb2.GuestBoot(kernel_ms=100.0, init_ms=2.0),
    ),
]
SPAWNED = sandbox_pb2.SpawnSandboxesResponse(
    sandboxes=SANDBOXES,
    failures=[sandbox_pb2.SpawnFailure(index=3, code="RESOURCE_EXHAUSTED", message="no memory")],
    elapsed_ms=12.5,
)
BRANCHED = sandbox_pb2.BranchSandboxResponse(
    snapshot=snapshot_pb2.Snapshot(
        tag="branch-1",
        status=snapshot_pb2.SNAPSHOT_STATUS_WRITING,
        mode=snapshot_pb2.BRANCH_MODE_LIVE,
        source_sandbox_id="sb-one",
    ),
    pause_ms=0.4,
    bytes_written=4096,
    dirty_pages=7,
    faults_served=1,
)
CREATED = snapshot_pb2.CreateSnapshotResponse(
    snapshot=snapshot_pb2.Snapshot(tag="warm", status=snapshot_pb2.SNAPSHOT_STATUS_READY, image="debian-12"),
    sandbox_id="sb-warm",
)


class StandIn:
    """Answers SpawnSandboxes, BranchSandbox and CreateSnapshot with the
    responses above (SpawnSandboxes with ``spawned``, replaceable)."""

    def __init__(self) -> None:
        self.spawned = SPAWNED
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

        def unary(reply: Callable[[], Message]) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: reply().SerializeToString()
            )

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "forkd.v1.SandboxService",
                    {"SpawnSandboxes": unary(lambda: self.spawned), "BranchSandbox": unary(lambda: BRANCHED)},
                ),
                grpc.method_handlers_generic_handler(
                    "forkd.v1.SnapshotService", {"CreateSnapshot": unary(lambda: CREATED)}
                ),
            )
        )
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    s = StandIn()
    s.server.start()
    try:
        yield s
    finally:
        s.server.stop(None)


@pytest.fixture
def ctl(stand_in: StandIn) -> Iterator[forkd.Controller]:
    with forkd.Controller(stand_in.target, timeout=10) as c:
        yield c


def test_spawn_result_is_a_sequence_of_its_sandboxes(ctl: forkd.Controller) -> None:
    res = ctl.spawn_sandboxes("warm", 4)
    assert isinstance(res, forkd.SpawnResult) and isinstance(res, Sequence)
    assert len(res) == 3 and res
    assert [sb.id for sb in res] == ["sb-one", "sb-two", "sb-three"]
    assert res[0].id == "sb-one" and res[-1].id == "sb-three" and res[1].id == "sb-two"
    assert [sb.id for sb in res[1:]] == ["sb-two", "sb-three"] and res[5:] == []
    assert [sb.id for sb in reversed(res)] == ["sb-three", "sb-two", "sb-one"]
    first, *rest = res
    assert first.id == "sb-one" and len(rest) == 2
    with pytest.raises(IndexError):
        res[3]
    assert res[0] is res[0], "one view per sandbox"
    assert res.index(res[1]) == 1 and res[2] in res


def test_spawn_result_keeps_the_response_fields(ctl: forkd.Controller) -> None:
    res = ctl.spawn_sandboxes("warm", 4)
    # What callers wrote before: the response's own fields and methods.
    assert [sb.id for sb in res.sandboxes] == ["sb-one", "sb-two", "sb-three"]
    assert isinstance(res.sandboxes[0], forkd.Sandbox)
    assert res.sandboxes[0].id == "sb-one" and len(res.sandboxes) == 3
    assert [(f.index, f.code, f.message) for f in res.failures] == [(3, "RESOURCE_EXHAUSTED", "no memory")]
    assert res.elapsed_ms == 12.5
    assert res.ListFields() == SPAWNED.ListFields()
    assert res.SerializeToString() == SPAWNED.SerializeToString()
    # The generated message itself, for APIs that need its type.
    assert isinstance(res.message, forkd.SpawnSandboxesResponse)
    assert res.message == SPAWNED and res == SPAWNED
    assert json_format.MessageToDict(res.message)["elapsedMs"] == 12.5
    rebuilt = sandbox_pb2.SpawnSandboxesResponse()
    rebuilt.CopyFrom(res.message)
    assert rebuilt == res
    # Each view equals (and wraps) the message in .sandboxes.
    assert res[0] == res.sandboxes[0] and res[0].message is not None
    assert res[0] != res[1] and res[0] != "sb-one"


def test_a_spawn_result_without_sandboxes_is_false(stand_in: StandIn, ctl: forkd.Controller) -> None:
    stand_in.spawned = sandbox_pb2.SpawnSandboxesResponse(
        failures=[sandbox_pb2.SpawnFailure(index=0, code="INTERNAL", message="boom")]
    )
    res = ctl.spawn_sandboxes()
    assert not res and len(res) == 0 and list(res) == []
    assert res.failures[0].message == "boom"


def test_sandbox_items_and_attributes(ctl: forkd.Controller) -> None:
    sb = ctl.spawn_sandboxes("warm", 4)[0]
    assert isinstance(sb, forkd.SandboxView) and isinstance(sb, Mapping)
    assert sb["id"] == sb.id == "sb-one"
    assert sb["state"] == sb.state == forkd.SandboxState.Value("SANDBOX_STATE_RUNNING")
    assert sb["snapshot_tag"] == "warm" and sb["memory_mib"] == 128 and sb["vcpus"] == 2
    assert dict(sb["labels"]) == {"team": "py"} == dict(sb.labels)
    assert sb["vmm_pid"] == 4242 and sb["boot_ms"] == 1.5 and sb["image"] == "" and sb["exit_reason"] == ""
    assert sb["live_fork"] is False
    assert not sb.HasField("guest_boot")
    # Every field is a key, set or not, as in the message.
    assert list(sb) == [f.name for f in forkd.Sandbox.DESCRIPTOR.fields]
    assert "id" in sb and "guest_boot" in sb and "nope" not in sb and 0 not in cast(Any, sb)
    assert sb.get("image") == "" and sb.get("nope", "dflt") == "dflt"
    assert dict(sb)["id"] == "sb-one"
    with pytest.raises(KeyError):
        sb["nope"]
    with pytest.raises(KeyError):
        sb[0]  # type: ignore[index]
    with pytest.raises(AttributeError):
        sb.nope  # noqa: B018
    linux = ctl.spawn_sandboxes("warm", 4)[-1]
    assert linux["guest_boot"].kernel_ms == 100.0 and linux.HasField("guest_boot")
    assert isinstance(linux.message, forkd.Sandbox) and linux.message.image == "debian-12"


def test_sandbox_view_writes_reach_the_message() -> None:
    # The typed properties are read-only; a write that worked on the message
    # before still reaches it at run time (typed code writes to .message).
    msg = sandbox_pb2.Sandbox(id="sb-a")
    view = forkd.SandboxView(msg)
    cast(Any, view).exit_reason = "gone"
    assert msg.exit_reason == "gone" == view["exit_reason"]
    view.message.vcpus = 4
    assert view.vcpus == 4
    with pytest.raises(AttributeError):
        cast(Any, view).not_a_field = 1
    with pytest.raises(TypeError):
        hash(view)


def test_results_copy_and_pickle(ctl: forkd.Controller) -> None:
    res = ctl.spawn_sandboxes("warm", 4)
    for clone in (copy.copy(res), copy.deepcopy(res), pickle.loads(pickle.dumps(res))):
        assert isinstance(clone, forkd.SpawnResult) and clone == res and clone[1]["id"] == "sb-two"
    br = ctl.branch_sandbox("sb-one", "branch-1", mode="live", wait=False)
    assert pickle.loads(pickle.dumps(br))["tag"] == "branch-1"
    assert "sb-one" in repr(res) and repr(br).startswith("BranchResult(")


def test_branch_result_has_the_tag(ctl: forkd.Controller) -> None:
    br = ctl.branch_sandbox("sb-one", "branch-1", mode="live", wait=False)
    assert isinstance(br, forkd.BranchResult)
    assert br.tag == br["tag"] == br.snapshot.tag == "branch-1"
    # The response's fields, as attributes (as before) and as items.
    assert br.snapshot.status == forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_WRITING")
    assert forkd.status_name(br["snapshot"].status) == "writing"
    assert (br.pause_ms, br.bytes_written, br.dirty_pages, br.faults_served) == (0.4, 4096, 7, 1)
    assert (br["pause_ms"], br["bytes_written"], br["dirty_pages"], br["faults_served"]) == (0.4, 4096, 7, 1)
    assert list(br) == ["snapshot", "pause_ms", "bytes_written", "dirty_pages", "faults_served", "tag"]
    assert br.HasField("snapshot") and br == BRANCHED
    assert isinstance(br.message, forkd.BranchSandboxResponse) and br.message == BRANCHED


def test_create_snapshot_result_has_the_tag(ctl: forkd.Controller) -> None:
    res = ctl.create_snapshot("warm", keep_running=True)
    assert isinstance(res, forkd.CreateSnapshotResult)
    assert res.tag == res["tag"] == res.snapshot.tag == "warm"
    assert res.sandbox_id == res["sandbox_id"] == "sb-warm"
    assert res["snapshot"].image == "debian-12"
    assert isinstance(res.message, forkd.CreateSnapshotResponse) and res == CREATED


def test_async_controller_returns_the_same_results(stand_in: StandIn) -> None:
    async def main() -> tuple[forkd.SpawnResult, forkd.BranchResult, forkd.CreateSnapshotResult]:
        async with forkd.AsyncController(stand_in.target, timeout=10) as actl:
            return (
                await actl.spawn_sandboxes("warm", 4),
                await actl.branch_sandbox("sb-one", "branch-1"),
                await actl.create_snapshot("warm"),
            )

    res, br, created = asyncio.run(main())
    assert len(res) == 3 and res[0]["id"] == "sb-one" and res[-1].image == "debian-12"
    assert [sb["id"] for sb in res] == [sb.id for sb in res.sandboxes]
    assert res.failures[0].index == 3 and res.elapsed_ms == 12.5
    assert br.tag == br["tag"] == "branch-1" and br.pause_ms == 0.4
    assert created.tag == "warm" and created["sandbox_id"] == "sb-warm"


def test_earlier_sdk_idioms() -> None:
    """What users of the earlier SDK wrote, on results built from messages."""
    children: Any = forkd.SpawnResult(SPAWNED)
    branch: Any = forkd.BranchResult(BRANCHED)
    assert children[0]["id"] == "sb-one"
    assert [c["id"] for c in children] == ["sb-one", "sb-two", "sb-three"]
    assert branch["tag"] == "branch-1"
