"""The asyncio client: :class:`AsyncController`, the same API as
:class:`forkd.Controller` with ``await`` and ``async for``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
from grpc import aio

from forkd import wire
from forkd.controller import DEFAULT_TARGET, auth_metadata, channel_options
from forkd.errors import from_rpc_error
from forkd.results import (
    BranchResult,
    CreateSnapshotResult,
    ExecCollector,
    ExecEvent,
    ExecResult,
    SpawnResult,
)
from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc, snapshot_pb2, snapshot_pb2_grpc
from forkd.wire import BranchMode, SnapshotStatusName

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class AsyncController:
    """A grpc.aio connection to one forkd daemon; see :class:`forkd.Controller`
    for what each method does. Use ``async with``, or ``await close()``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        token: str | None = None,
        *,
        timeout: float | None = None,
        channel: aio.Channel | None = None,
    ) -> None:
        self.target = target
        self._channel = channel if channel is not None else aio.insecure_channel(
            target, options=channel_options(target)
        )
        self._owns_channel = channel is None
        self._metadata = auth_metadata(token)
        self._timeout = timeout
        self._sandboxes = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self._snapshots = snapshot_pb2_grpc.SnapshotServiceStub(self._channel)

    async def _unary(self, method: str, fn: aio.UnaryUnaryMultiCallable[Req, Resp], req: Req) -> Resp:
        try:
            return await fn(req, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None

    async def _stream(
        self,
        method: str,
        fn: aio.UnaryStreamMultiCallable[Req, Resp],
        req: Req,
        timeout: float | None,
    ) -> AsyncGenerator[Resp, None]:
        call = fn(req, timeout=timeout, metadata=self._metadata)
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        """Closes the channel (when the controller created it)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncController:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- sandboxes ----------------------------------------------------------

    async def spawn_sandboxes(
        self,
        tag: str | None = None,
        n: int = 1,
        *,
        live_fork: bool = False,
        memory_mib: int | None = None,
        labels: Mapping[str, str] | None = None,
        vcpus: int | None = None,
        wait_for_snapshot: bool = False,
        image: str | None = None,
        ttl_seconds: int | None = None,
    ) -> SpawnResult:
        """See :meth:`forkd.Controller.spawn_sandboxes`."""
        req = wire.spawn_request(
            tag,
            n,
            live_fork=live_fork,
            memory_mib=memory_mib,
            labels=labels,
            vcpus=vcpus,
            wait_for_snapshot=wait_for_snapshot,
            image=image,
            ttl_seconds=ttl_seconds,
        )
        return SpawnResult(await self._unary("SpawnSandboxes", self._sandboxes.SpawnSandboxes, req))

    async def get_sandbox(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """See :meth:`forkd.Controller.get_sandbox`."""
        req = sandbox_pb2.GetSandboxRequest(id=sandbox_id)
        return (await self._unary("GetSandbox", self._sandboxes.GetSandbox, req)).sandbox

    async def list_sandboxes(self, labels: Mapping[str, str] | None = None) -> list[sandbox_pb2.Sandbox]:
        """See :meth:`forkd.Controller.list_sandboxes`."""
        req = sandbox_pb2.ListSandboxesRequest(label_selector=dict(labels or {}))
        return list((await self._unary("ListSandboxes", self._sandboxes.ListSandboxes, req)).sandboxes)

    async def delete_sandbox(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """See :meth:`forkd.Controller.delete_sandbox`."""
        req = sandbox_pb2.DeleteSandboxRequest(id=sandbox_id)
        return (await self._unary("DeleteSandbox", self._sandboxes.DeleteSandbox, req)).sandbox

    async def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        timeout: float | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> ExecResult:
        """See :meth:`forkd.Controller.exec`."""
        collector = ExecCollector()
        async for ev in self.exec_stream(sandbox_id, argv, timeout, env=env, cwd=cwd, stdin=stdin):
            collector.add(ev)
        return collector.result("Exec")

    async def exec_stream(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        timeout: float | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> AsyncIterator[ExecEvent]:
        """See :meth:`forkd.Controller.exec_stream`."""
        req = wire.exec_request(sandbox_id, argv, timeout, env=env, cwd=cwd, stdin=stdin)
        stream = self._stream("Exec", self._sandboxes.Exec, req, None)
        try:
            async for msg in stream:
                yield ExecEvent.from_message(msg)
        finally:
            await stream.aclose()

    async def branch_sandbox(
        self,
        sandbox_id: str,
        tag: str | None = None,
        diff: bool = False,
        measure_diff: bool = False,
        mode: BranchMode | None = None,
        wait: bool = True,
    ) -> BranchResult:
        """See :meth:`forkd.Controller.branch_sandbox`."""
        req = wire.branch_request(sandbox_id, tag, diff, measure_diff, mode, wait)
        return BranchResult(await self._unary("BranchSandbox", self._sandboxes.BranchSandbox, req))

    async def set_sandbox_ttl(self, sandbox_id: str, ttl_seconds: int) -> sandbox_pb2.Sandbox:
        """See :meth:`forkd.Controller.set_sandbox_ttl`."""
        req = wire.set_sandbox_ttl_request(sandbox_id, ttl_seconds)
        return (await self._unary("SetSandboxTtl", self._sandboxes.SetSandboxTtl, req)).sandbox

    async def read_console(self, sandbox_id: str, tail_bytes: int = 0) -> sandbox_pb2.ReadConsoleResponse:
        """See :meth:`forkd.Controller.read_console`."""
        req = wire.read_console_request(sandbox_id, tail_bytes)
        return await self._unary("ReadConsole", self._sandboxes.ReadConsole, req)

    # ---- snapshots ----------------------------------------------------------

    async def create_snapshot(
        self,
        tag: str | None = None,
        *,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        warmup: Sequence[Sequence[str]] = (),
        keep_running: bool = False,
        image: str | None = None,
    ) -> CreateSnapshotResult:
        """See :meth:`forkd.Controller.create_snapshot`."""
        req = wire.create_snapshot_request(tag, memory_mib, vcpus, warmup, keep_running, image)
        return CreateSnapshotResult(await self._unary("CreateSnapshot", self._snapshots.CreateSnapshot, req))

    async def get_snapshot(self, tag: str) -> snapshot_pb2.Snapshot:
        """See :meth:`forkd.Controller.get_snapshot`."""
        req = snapshot_pb2.GetSnapshotRequest(tag=tag)
        return (await self._unary("GetSnapshot", self._snapshots.GetSnapshot, req)).snapshot

    async def list_snapshots(self, status: SnapshotStatusName | None = None) -> list[snapshot_pb2.Snapshot]:
        """See :meth:`forkd.Controller.list_snapshots`."""
        req = wire.list_snapshots_request(status)
        return list((await self._unary("ListSnapshots", self._snapshots.ListSnapshots, req)).snapshots)

    async def delete_snapshot(self, tag: str, *, cascade: bool = False, force: bool = False) -> list[str]:
        """See :meth:`forkd.Controller.delete_snapshot`."""
        req = snapshot_pb2.DeleteSnapshotRequest(tag=tag, cascade=cascade, force=force)
        return list((await self._unary("DeleteSnapshot", self._snapshots.DeleteSnapshot, req)).deleted_tags)

    async def watch_snapshot(
        self, tag: str, *, timeout: float | None = None
    ) -> AsyncIterator[snapshot_pb2.WatchSnapshotResponse]:
        """See :meth:`forkd.Controller.watch_snapshot`."""
        req = snapshot_pb2.WatchSnapshotRequest(tag=tag)
        stream = self._stream("WatchSnapshot", self._snapshots.WatchSnapshot, req, timeout)
        try:
            async for msg in stream:
                yield msg
        finally:
            await stream.aclose()
