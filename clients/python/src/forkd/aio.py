"""The asyncio client: :class:`AsyncController`, the same API as
:class:`forkd.Controller` with ``await`` and ``async for``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any, TypeVar, cast, overload

import grpc
from grpc import aio

from forkd import files, wire
from forkd.controller import DEFAULT_TARGET, auth_metadata, channel_options
from forkd.errors import ForkdError, error_for, from_rpc_error
from forkd.files import AsyncUploadSource, BinaryWriter, StrPath
from forkd.results import (
    BranchResult,
    CreateSnapshotResult,
    ExecCollector,
    ExecEvent,
    ExecResult,
    FileInfo,
    ListDirResult,
    ReadFileResult,
    SpawnResult,
    WriteFileResult,
)
from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc, snapshot_pb2, snapshot_pb2_grpc
from forkd.wire import BranchMode, SnapshotStatusName

Req = TypeVar("Req")
Resp = TypeVar("Resp")


_T = TypeVar("_T")

# grpc.aio reports a write that fails because the server already ended the
# call (an upload the guest refused part-way) as INTERNAL "Internal error
# from Core", and may record that over the status the server sent
# (grpc/grpc#36066). write_file keeps the first status the call ended with
# and reports that one instead.
_CORE_WRITE_FAILURE = "Internal error from Core"


def _now(coro: Coroutine[Any, Any, _T]) -> _T | None:
    """The result of a coroutine that finishes without waiting, else None."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    coro.close()
    return None


def _record_status(call: aio.Call, into: list[tuple[grpc.StatusCode, str]]) -> None:
    """Done callback: appends the status the call has just ended with (it is
    set, so reading it does not wait)."""
    code, details = _now(call.code()), _now(call.details())
    if code is not None:
        into.append((code, details or ""))


def _write_error(err: grpc.RpcError, first_status: list[tuple[grpc.StatusCode, str]]) -> ForkdError:
    """The ForkdError of a failed upload: the server's status rather than the
    INTERNAL error of a write that raced with it."""
    error = from_rpc_error(err, "WriteFile")
    if error.code == grpc.StatusCode.INTERNAL and error.message == _CORE_WRITE_FAILURE:
        for code, details in first_status:
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL):
                return error_for(code, details, method="WriteFile")
    return error


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
        huge_pages: bool = False,
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
            huge_pages=huge_pages,
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

    # ---- files (Linux sandboxes) --------------------------------------------

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        source: AsyncUploadSource,
        *,
        mode: int = 0,
        make_parents: bool = False,
        no_overwrite: bool = False,
        chunk_size: int = wire.DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,
    ) -> WriteFileResult:
        """See :meth:`forkd.Controller.write_file`; ``source`` may also be
        an async iterable of bytes chunks. A local path (``str`` or
        ``os.PathLike``) is opened and read in a worker thread; file objects
        and iterables are consumed in the event loop's thread, one chunk per
        message as the call sends them."""
        header = wire.write_file_header(
            sandbox_id, path, mode=mode, make_parents=make_parents, no_overwrite=no_overwrite
        )
        wire.check_chunk_size(chunk_size)
        async with files.async_upload_chunks(source, chunk_size) as chunks:
            call = self._sandboxes.WriteFile(timeout=timeout, metadata=self._metadata)
            first_status: list[tuple[grpc.StatusCode, str]] = []
            call.add_done_callback(lambda done: _record_status(done, first_status))
            try:
                try:
                    await call.write(header)
                    async for chunk in chunks:
                        await call.write(sandbox_pb2.WriteFileRequest(data=chunk))
                    await call.done_writing()
                except (asyncio.InvalidStateError, grpc.RpcError):
                    pass  # the call ended while we wrote (an error from the guest): its status follows
                return WriteFileResult.from_message(await call)
            except grpc.RpcError as e:
                raise _write_error(e, first_status) from None
            except BaseException:
                # The source failed, or the task was cancelled: the upload
                # is cut off, never closed as complete.
                call.cancel()
                raise

    @overload
    async def read_file(
        self,
        sandbox_id: str,
        path: str,
        dest: None = None,
        *,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> bytes: ...

    @overload
    async def read_file(
        self,
        sandbox_id: str,
        path: str,
        dest: StrPath | BinaryWriter,
        *,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> ReadFileResult: ...

    async def read_file(
        self,
        sandbox_id: str,
        path: str,
        dest: StrPath | BinaryWriter | None = None,
        *,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> bytes | ReadFileResult:
        """See :meth:`forkd.Controller.read_file`. A local ``dest`` path is
        written, flushed and renamed in a worker thread; a file object is
        written in the event loop's thread."""
        req = wire.read_file_request(sandbox_id, path, offset, length)
        check = files.DownloadCheck(path)
        if dest is None:
            data = bytearray()
            async with aclosing(self._download(req, check, timeout)) as chunks:
                async for chunk in chunks:
                    data += chunk
            check.result()
            return bytes(data)
        if files.is_path(dest):
            out = files.AtomicFile(dest)  # a create in the loop's thread: nothing to leak if cancelled
            try:
                async with aclosing(self._download(req, check, timeout)) as chunks:
                    async for chunk in chunks:
                        await asyncio.to_thread(out.write, chunk)
                result = check.result()
            except BaseException:
                await asyncio.shield(asyncio.to_thread(out.discard))
                raise
            await asyncio.shield(asyncio.to_thread(out.commit))
            return result
        if files.is_writer(dest):
            async with aclosing(self._download(req, check, timeout)) as chunks:
                async for chunk in chunks:
                    dest.write(chunk)
            return check.result()
        raise files.dest_type_error(dest)

    async def iter_file(
        self,
        sandbox_id: str,
        path: str,
        *,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """See :meth:`forkd.Controller.iter_file`."""
        req = wire.read_file_request(sandbox_id, path, offset, length)
        check = files.DownloadCheck(path)
        async with aclosing(self._download(req, check, timeout)) as chunks:
            async for chunk in chunks:
                yield chunk
        check.result()

    async def _download(
        self, req: sandbox_pb2.ReadFileRequest, check: files.DownloadCheck, timeout: float | None
    ) -> AsyncGenerator[bytes, None]:
        stream = self._stream("ReadFile", self._sandboxes.ReadFile, req, timeout)
        try:
            async for msg in stream:
                chunk = check.add(msg)
                if chunk:
                    yield chunk
        finally:
            await stream.aclose()

    async def stat_file(self, sandbox_id: str, path: str) -> FileInfo:
        """See :meth:`forkd.Controller.stat_file`."""
        req = wire.stat_file_request(sandbox_id, path)
        return FileInfo.from_message((await self._unary("StatFile", self._sandboxes.StatFile, req)).info)

    async def list_dir(self, sandbox_id: str, path: str) -> ListDirResult:
        """See :meth:`forkd.Controller.list_dir`."""
        req = wire.list_dir_request(sandbox_id, path)
        return ListDirResult.from_message(await self._unary("ListDir", self._sandboxes.ListDir, req))

    async def remove_file(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        """See :meth:`forkd.Controller.remove_file`."""
        req = wire.remove_file_request(sandbox_id, path, recursive)
        await self._unary("RemoveFile", self._sandboxes.RemoveFile, req)

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
