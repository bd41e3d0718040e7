"""The MCP tools' Linux-guest arguments and results, without a daemon.

The tools run against a stand-in gRPC server on loopback that records the
requests and answers with canned messages: spawn_sandboxes passes
``image``, exec passes ``env``/``cwd``/``stdin`` and reports ``signal``
only when one killed the command, read_console returns the console text,
snapshots (branched, got, listed) report their ``image``, and every tool
argument is documented. (tests/e2e/test_mcp_server.py runs
the server over stdio against a real daemon.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import anyio
import grpc
import pytest

from google.protobuf.timestamp_pb2 import Timestamp

from forkd.v1 import sandbox_pb2, snapshot_pb2
from forkd_mcp import ForkdTools, build_server


class StandIn:
    """Records SandboxService and SnapshotService requests (decoded) and
    answers canned replies."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.exit = sandbox_pb2.ExecExit(exit_code=137, duration_us=12, signal=9)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        spawned = sandbox_pb2.SpawnSandboxesResponse(
            sandboxes=[
                sandbox_pb2.Sandbox(
                    id="sb-linux",
                    image="debian-12",
                    guest_boot=sandbox_pb2.GuestBoot(kernel_ms=110.5, init_ms=4.0),
                ),
                sandbox_pb2.Sandbox(id="sb-ref"),
            ]
        )
        console = sandbox_pb2.ReadConsoleResponse(data=b"Linux version 6.1\n\xff", truncated=True)
        linux_snap = snapshot_pb2.Snapshot(
            tag="deb-warm",
            status=snapshot_pb2.SNAPSHOT_STATUS_READY,
            source_sandbox_id="sb-linux",
            image="debian-12",
        )
        ref_snap = snapshot_pb2.Snapshot(tag="ref", status=snapshot_pb2.SNAPSHOT_STATUS_READY)
        branched = sandbox_pb2.BranchSandboxResponse(snapshot=linux_snap, pause_ms=2.5)
        handlers = {
            "SpawnSandboxes": self._unary("SpawnSandboxes", sandbox_pb2.SpawnSandboxesRequest, spawned),
            "BranchSandbox": self._unary("BranchSandbox", sandbox_pb2.BranchSandboxRequest, branched),
            "ReadConsole": self._unary("ReadConsole", sandbox_pb2.ReadConsoleRequest, console),
            "SetSandboxTtl": self._unary(
                "SetSandboxTtl",
                sandbox_pb2.SetSandboxTtlRequest,
                sandbox_pb2.SetSandboxTtlResponse(
                    sandbox=sandbox_pb2.Sandbox(id="sb-ref", expire_time=Timestamp(seconds=1_800_000_000))
                ),
            ),
            "Exec": grpc.unary_stream_rpc_method_handler(
                self._exec,
                request_deserializer=sandbox_pb2.ExecRequest.FromString,
                response_serializer=sandbox_pb2.ExecResponse.SerializeToString,
            ),
        }
        snapshot_handlers = {
            "GetSnapshot": self._unary(
                "GetSnapshot", snapshot_pb2.GetSnapshotRequest, snapshot_pb2.GetSnapshotResponse(snapshot=linux_snap)
            ),
            "ListSnapshots": self._unary(
                "ListSnapshots",
                snapshot_pb2.ListSnapshotsRequest,
                snapshot_pb2.ListSnapshotsResponse(snapshots=[ref_snap, linux_snap]),
            ),
        }
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("forkd.v1.SandboxService", handlers),
                grpc.method_handlers_generic_handler("forkd.v1.SnapshotService", snapshot_handlers),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _unary(self, name: str, req_type: Any, reply: Any) -> grpc.RpcMethodHandler[Any, Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            self.requests.append((name, request))
            return reply

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=req_type.FromString, response_serializer=type(reply).SerializeToString
        )

    def _exec(self, request: sandbox_pb2.ExecRequest, context: grpc.ServicerContext) -> Iterator[sandbox_pb2.ExecResponse]:
        self.requests.append(("Exec", request))
        yield sandbox_pb2.ExecResponse(stdout=request.stdin)
        yield sandbox_pb2.ExecResponse(exit=self.exit)

    def last(self, name: str) -> Any:
        got = [req for method, req in self.requests if method == name]
        assert got, f"no {name} request was sent"
        return got[-1]


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    s = StandIn()
    s.server.start()
    try:
        yield s
    finally:
        s.server.stop(None)


def run(s: StandIn, scenario: Callable[[ForkdTools], Awaitable[None]]) -> None:
    """Runs ``scenario`` in one event loop (the tools' gRPC channel is bound to it)."""

    async def main() -> None:
        tools = ForkdTools(f"127.0.0.1:{s.port}", call_timeout=10)
        try:
            await scenario(tools)
        finally:
            await tools.aclose()

    anyio.run(main)


def test_spawn_passes_image_and_reports_it(stand_in: StandIn) -> None:
    async def scenario(tools: ForkdTools) -> None:
        res = await tools.spawn_sandboxes(image="debian-12", memory_mib=512)
        req = stand_in.last("SpawnSandboxes")
        assert (req.image, req.memory_mib, req.snapshot_tag) == ("debian-12", 512, "")
        linux, ref = res["sandboxes"]
        assert linux["image"] == "debian-12" and linux["guest_boot"] == {"kernel_ms": 110.5, "init_ms": 4.0}
        assert ref["image"] == "" and ref["guest_boot"] is None

        await tools.spawn_sandboxes()
        assert stand_in.last("SpawnSandboxes").image == ""

    run(stand_in, scenario)


def test_linux_snapshots_report_their_image(stand_in: StandIn) -> None:
    async def scenario(tools: ForkdTools) -> None:
        branch = await tools.branch_sandbox("sb-linux", "deb-warm")
        assert stand_in.last("BranchSandbox").sandbox_id == "sb-linux"
        assert branch["snapshot"]["image"] == "debian-12" and branch["snapshot"]["tag"] == "deb-warm"

        got = await tools.get_snapshot("deb-warm")
        assert (got["image"], got["status"]) == ("debian-12", "READY")

        listed = await tools.list_snapshots()
        assert [(s["tag"], s["image"]) for s in listed["snapshots"]] == [("ref", ""), ("deb-warm", "debian-12")]

        # Forking a Linux snapshot sends only its tag: children run its image.
        await tools.spawn_sandboxes("deb-warm", 2)
        req = stand_in.last("SpawnSandboxes")
        assert (req.snapshot_tag, req.n, req.image) == ("deb-warm", 2, "")

    run(stand_in, scenario)


def test_exec_passes_env_cwd_stdin_and_reports_the_signal(stand_in: StandIn) -> None:
    async def scenario(tools: ForkdTools) -> None:
        out = await tools.exec("sb-linux", ["sh", "-c", "cat"], env={"A": "1"}, cwd="/srv", stdin="héllo")
        req = stand_in.last("Exec")
        assert (list(req.argv), dict(req.env), req.cwd, req.stdin) == (
            ["sh", "-c", "cat"],
            {"A": "1"},
            "/srv",
            "héllo".encode(),
        )
        assert out["stdout"] == "héllo" and out["exit_code"] == 137 and out.get("signal") == 9

        # A normal exit has no signal key; without env/cwd/stdin none is sent.
        stand_in.exit = sandbox_pb2.ExecExit(exit_code=0, duration_us=3)
        out = await tools.exec("sb-ref", ["echo", "hi"])
        assert "signal" not in out and out["exit_code"] == 0
        req = stand_in.last("Exec")
        assert (dict(req.env), req.cwd, req.stdin) == ({}, "", b"")

    run(stand_in, scenario)


def test_read_console(stand_in: StandIn) -> None:
    async def scenario(tools: ForkdTools) -> None:
        out = await tools.read_console("sb-linux", 4096)
        req = stand_in.last("ReadConsole")
        assert (req.sandbox_id, req.tail_bytes) == ("sb-linux", 4096)
        assert out == {
            "sandbox_id": "sb-linux",
            "text": "Linux version 6.1\n\ufffd",
            "data_bytes": 19,
            "truncated": True,
        }

    run(stand_in, scenario)


def test_ttl_on_spawn_and_set_sandbox_ttl(stand_in: StandIn) -> None:
    async def scenario(tools: ForkdTools) -> None:
        res = await tools.spawn_sandboxes(n=2, ttl_seconds=300)
        assert stand_in.last("SpawnSandboxes").ttl_seconds == 300
        assert [sb["expire_time"] for sb in res["sandboxes"]] == [None, None]
        await tools.spawn_sandboxes()
        assert stand_in.last("SpawnSandboxes").ttl_seconds == 0

        out = await tools.set_sandbox_ttl("sb-ref", 60)
        req = stand_in.last("SetSandboxTtl")
        assert (req.sandbox_id, req.ttl_seconds) == ("sb-ref", 60)
        assert out["sandbox"]["expire_time"] == "2027-01-15T08:00:00Z"

    run(stand_in, scenario)


def test_the_new_arguments_are_in_the_schemas_and_documented() -> None:
    async def listed() -> dict[str, Any]:
        server = build_server(ForkdTools("127.0.0.1:1"))
        return {t.name: t for t in await server.list_tools()}

    tools = anyio.run(listed)
    assert "read_console" in tools and "set_sandbox_ttl" in tools and len(tools) == 16
    assert tools["read_console"].annotations is not None and tools["read_console"].annotations.read_only_hint
    for name, args in (
        ("spawn_sandboxes", {"image"}),
        ("exec", {"env", "cwd", "stdin"}),
        ("read_console", {"sandbox_id", "tail_bytes"}),
        ("spawn_sandboxes", {"ttl_seconds"}),
        ("set_sandbox_ttl", {"sandbox_id", "ttl_seconds"}),
    ):
        props = tools[name].input_schema["properties"]
        assert args <= set(props), (name, set(props))
        for arg in props:
            assert f"{arg}:" in (tools[name].description or ""), f"{name}: argument {arg} is not documented"
    snapshot_schema = tools["get_snapshot"].output_schema
    assert "image" in snapshot_schema["properties"], snapshot_schema
    assert "signal" in tools["exec"].output_schema["properties"]
    assert "signal" not in tools["exec"].output_schema.get("required", [])
    assert tools["read_console"].input_schema["properties"]["tail_bytes"]["maximum"] == 1 << 20
    # SandboxInfo (in $defs) carries expire_time.
    assert "expire_time" in str(tools["set_sandbox_ttl"].output_schema)
    annotations = tools["set_sandbox_ttl"].annotations
    assert annotations is not None and annotations.idempotent_hint and not annotations.destructive_hint
