"""The blocking client: one gRPC channel to a forkd daemon."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from types import TracebackType
from typing import TypeVar, overload

import grpc

from forkd import files, wire
from forkd.errors import from_rpc_error
from forkd.files import BinaryWriter, StrPath, UploadSource
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

DEFAULT_TARGET = "127.0.0.1:50051"


#: Target prefixes grpcio resolves to Unix domain sockets.
UNIX_SCHEMES = ("unix:", "unix-abstract:")


def channel_options(target: str) -> list[tuple[str, str | int]]:
    """Channel options a target needs. For a Unix socket the HTTP/2
    ``:authority`` is set to ``localhost``: grpcio would otherwise send the
    socket path, which the daemon's HTTP/2 stack rejects as malformed (every
    call would fail with INTERNAL "Stream removed")."""
    if target.startswith(UNIX_SCHEMES):
        return [("grpc.default_authority", "localhost")]
    return []


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: a bearer token when one is set."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class Controller:
    """A connection to one forkd daemon.

    ``target`` is ``host:port`` or ``unix:/path/to/socket`` (sent with
    authority ``localhost``, see :func:`channel_options`); ``token`` is the
    daemon's bearer token, if it has one. ``timeout`` (seconds) is a deadline
    for each unary call; streams (``exec_stream``, ``watch_snapshot``) take
    their own. Every failed call raises a :class:`forkd.ForkdError` subclass
    that carries the gRPC status code. Use it as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        token: str | None = None,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self._channel = channel if channel is not None else grpc.insecure_channel(
            target, options=channel_options(target)
        )
        self._owns_channel = channel is None
        self._metadata = auth_metadata(token)
        self._timeout = timeout
        self._sandboxes = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self._snapshots = snapshot_pb2_grpc.SnapshotServiceStub(self._channel)

    # ---- plumbing -----------------------------------------------------------

    def _unary(self, method: str, fn: grpc.UnaryUnaryMultiCallable[Req, Resp], req: Req) -> Resp:
        try:
            return fn(req, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None

    def _stream(
        self,
        method: str,
        fn: grpc.UnaryStreamMultiCallable[Req, Resp],
        req: Req,
        timeout: float | None,
    ) -> Generator[Resp, None, None]:
        call = fn(req, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None
        finally:
            # Stopping early (break, garbage collection) cancels the stream.
            call.cancel()

    def close(self) -> None:
        """Closes the channel (when the controller created it)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- sandboxes ----------------------------------------------------------

    def spawn_sandboxes(
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
        """Starts ``n`` sandboxes: cold boots when ``tag`` is None, else
        children forked copy-on-write from snapshot ``tag``.

        ``image`` names a Linux image in the daemon's images directory to
        cold boot instead of the reference guest (None: the reference
        guest). A Linux guest needs a host with Intel VMX or AMD SVM;
        elsewhere the call raises FailedPreconditionError, and an unknown
        image NotFoundError. ``image`` with ``tag`` is InvalidArgumentError:
        children of a snapshot run the image it was taken of (see
        ``create_snapshot``).

        ``memory_mib`` and ``vcpus`` apply to cold boots (None: the daemon's
        256 MiB, or the image's default, and 2 vCPUs). ``labels`` go on every
        new sandbox.
        ``live_fork`` only records intent (every sandbox can be live
        branched) and is sent only when True. ``wait_for_snapshot`` forks
        from a snapshot that is still WRITING once it is READY instead of
        failing with FAILED_PRECONDITION.
        ``ttl_seconds`` is each sandbox's lifetime from when it starts: it is
        then deleted as ``delete_sandbox`` would (its snapshots stay); None
        or 0 means the daemon's ``--default-ttl`` (no expiry unless set), and
        above the daemon's ``--max-ttl`` is InvalidArgumentError. Each
        sandbox's ``expire_time`` says when (unset: never).
        ``huge_pages`` backs a cold-booted reference guest's RAM with 2 MiB
        huge pages from the host's pool (``memory_mib`` even; too few free
        pages is ResourceExhaustedError); children of a snapshot use its
        page size.

        Returns a :class:`forkd.SpawnResult`: a sequence of the sandboxes
        that started (``res[0]``, ``len(res)``, ``for sb in res``; each a
        :class:`forkd.SandboxView`, so ``res[0].id`` and ``res[0]["id"]``),
        with ``.failures`` for those that did not (the call fails only when
        none started), ``.elapsed_ms``, and ``.sandboxes`` and ``.message``
        from the SpawnSandboxesResponse as before.
        """
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
        return SpawnResult(self._unary("SpawnSandboxes", self._sandboxes.SpawnSandboxes, req))

    def get_sandbox(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """One sandbox by id (NotFoundError when there is none)."""
        req = sandbox_pb2.GetSandboxRequest(id=sandbox_id)
        return self._unary("GetSandbox", self._sandboxes.GetSandbox, req).sandbox

    def list_sandboxes(self, labels: Mapping[str, str] | None = None) -> list[sandbox_pb2.Sandbox]:
        """The sandboxes, oldest first; only those carrying every label in ``labels``."""
        req = sandbox_pb2.ListSandboxesRequest(label_selector=dict(labels or {}))
        return list(self._unary("ListSandboxes", self._sandboxes.ListSandboxes, req).sandboxes)

    def delete_sandbox(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """Stops the sandbox's VM and removes it; returns it as it was."""
        req = sandbox_pb2.DeleteSandboxRequest(id=sandbox_id)
        return self._unary("DeleteSandbox", self._sandboxes.DeleteSandbox, req).sandbox

    def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        timeout: float | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> ExecResult:
        """Runs ``argv`` in the sandbox and returns its output and exit code.

        ``timeout`` (seconds) stops the command inside the guest and raises
        DeadlineExceededError; the sandbox stays usable. A non-zero exit code
        is returned, not raised; so is death by a signal (``result.signal``,
        with ``exit_code`` 128 + signal).

        Linux sandboxes only (the reference guest refuses them with
        FailedPreconditionError): ``env`` adds variables to the guest's
        default environment, ``cwd`` is the absolute working directory
        (None: ``/``), and ``stdin`` is written to the command's standard
        input, which is then closed (``str`` is sent as UTF-8; None: stdin
        is ``/dev/null``; at most 1 MiB).
        """
        collector = ExecCollector()
        for ev in self.exec_stream(sandbox_id, argv, timeout, env=env, cwd=cwd, stdin=stdin):
            collector.add(ev)
        return collector.result("Exec")

    def exec_stream(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        timeout: float | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> Iterator[ExecEvent]:
        """Runs ``argv`` and yields its stdout/stderr chunks as they come,
        then one ``exit`` event (with ``signal``). Leaving the loop early
        cancels the call. ``env``, ``cwd`` and ``stdin`` as for :meth:`exec`."""
        req = wire.exec_request(sandbox_id, argv, timeout, env=env, cwd=cwd, stdin=stdin)
        with closing(self._stream("Exec", self._sandboxes.Exec, req, None)) as stream:
            for msg in stream:
                yield ExecEvent.from_message(msg)

    def branch_sandbox(
        self,
        sandbox_id: str,
        tag: str | None = None,
        diff: bool = False,
        measure_diff: bool = False,
        mode: BranchMode | None = None,
        wait: bool = True,
    ) -> BranchResult:
        """Captures a running sandbox as a new snapshot.

        ``mode``: ``"full"`` (pause, write all RAM), ``"diff"`` (write only
        pages dirtied since the sandbox's base snapshot) or ``"live"`` (pause
        only to save vCPU state, copy memory while the guest runs). None
        means full, or diff when the legacy ``diff`` flag is True; ``mode``
        wins when both are given. ``tag`` None lets the daemon name it.
        ``measure_diff`` also reports the dirtied page count.
        ``wait=False`` applies to live only: return as soon as the guest runs
        again, with the snapshot still WRITING; follow it with
        :meth:`watch_snapshot`.

        Returns a :class:`forkd.BranchResult`: the BranchSandboxResponse's
        fields (``.snapshot``, ``.pause_ms``, ...) plus ``.tag``, the new
        snapshot's tag, each also as ``res["tag"]``.
        """
        req = wire.branch_request(sandbox_id, tag, diff, measure_diff, mode, wait)
        return BranchResult(self._unary("BranchSandbox", self._sandboxes.BranchSandbox, req))

    def set_sandbox_ttl(self, sandbox_id: str, ttl_seconds: int) -> sandbox_pb2.Sandbox:
        """Sets the sandbox's lifetime to ``ttl_seconds`` from now, or clears
        it with 0 (it then lives until ``delete_sandbox``); returns the
        sandbox with its new ``expire_time`` (unset when cleared).

        Above the daemon's ``--max-ttl``: InvalidArgumentError; an unknown
        sandbox: NotFoundError; one being deleted or stopped:
        FailedPreconditionError.
        """
        req = wire.set_sandbox_ttl_request(sandbox_id, ttl_seconds)
        return self._unary("SetSandboxTtl", self._sandboxes.SetSandboxTtl, req).sandbox

    def read_console(self, sandbox_id: str, tail_bytes: int = 0) -> sandbox_pb2.ReadConsoleResponse:
        """The end of a Linux sandbox's serial console log (kernel messages,
        early userland output): ``.data`` (bytes, as the guest wrote them)
        and ``.truncated`` (older output was cut off).

        ``tail_bytes`` is how much of the end to return, at most 1 MiB; 0
        means the server's 64 KiB. A reference-guest sandbox has no serial
        console: FailedPreconditionError.
        """
        req = wire.read_console_request(sandbox_id, tail_bytes)
        return self._unary("ReadConsole", self._sandboxes.ReadConsole, req)

    # ---- files (Linux sandboxes) --------------------------------------------

    def write_file(
        self,
        sandbox_id: str,
        path: str,
        source: UploadSource,
        *,
        mode: int = 0,
        make_parents: bool = False,
        no_overwrite: bool = False,
        chunk_size: int = wire.DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,
    ) -> WriteFileResult:
        """Uploads a file to ``path`` (absolute) in a Linux sandbox.

        ``source`` is what to upload, streamed in chunks of at most
        ``chunk_size`` bytes (1 MiB by default, 1 byte to 3 MiB):

        * ``bytes``, ``bytearray`` or ``memoryview``: the data itself;
        * a ``str`` or ``os.PathLike`` (``pathlib.Path``): the path of a
          LOCAL file, whose contents are uploaded. A ``str`` is never
          uploaded as content: send text as ``text.encode()``;
        * a binary file object (anything with ``read``, e.g.
          ``open(p, "rb")`` or ``io.BytesIO``), read ``chunk_size`` bytes
          at a time from where it stands, up to its end;
        * an iterable of bytes chunks (a generator, say), consumed lazily;
          a chunk larger than ``chunk_size`` is split.

        A file or iterable is never read whole: the source is read in the
        calling thread, one chunk at a time and only as fast as the call
        sends them (as far as HTTP/2 flow control lets the data through).
        When reading the source raises, the upload is cancelled and the
        exception propagates.

        The guest writes to a temporary file beside ``path`` and renames it
        over ``path`` only once the whole upload arrived: a failed or
        cancelled upload leaves ``path`` as it was. ``mode`` is the new
        file's permission bits (0: 0o644; the umask is not applied),
        ``make_parents`` creates missing parent directories (0755), and
        ``no_overwrite`` raises AlreadyExistsError when ``path`` exists.
        ``timeout`` (seconds) bounds the whole upload (None: no deadline;
        the controller's per-call ``timeout`` does not apply to it).

        Returns the path written, its size and the SHA-256 the guest
        computed. Errors: a bad path, InvalidArgumentError; a missing parent
        (without ``make_parents``), NotFoundError; a parent that is not a
        directory, ``path`` a directory, or a reference-guest sandbox,
        FailedPreconditionError; the guest's filesystem full,
        ResourceExhaustedError.
        """
        header = wire.write_file_header(
            sandbox_id, path, mode=mode, make_parents=make_parents, no_overwrite=no_overwrite
        )
        wire.check_chunk_size(chunk_size)
        with files.upload_chunks(source, chunk_size) as chunks:
            pipe = files.RequestPipe(header)
            call = self._sandboxes.WriteFile.future(pipe, timeout=timeout, metadata=self._metadata)
            # The call ending (an error from the guest, the deadline) stops
            # the source being read, and grpcio's sending thread.
            call.add_done_callback(lambda _: pipe.abort())
            try:
                for chunk in chunks:
                    if not pipe.put(sandbox_pb2.WriteFileRequest(data=chunk)):
                        break
                pipe.finish()
                return WriteFileResult.from_message(call.result())
            except grpc.RpcError as e:
                raise from_rpc_error(e, "WriteFile") from None
            except BaseException:
                # The source failed (or the caller was interrupted): cancel
                # first, so that the stream is never closed as complete.
                call.cancel()
                pipe.abort()
                raise

    @overload
    def read_file(
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
    def read_file(
        self,
        sandbox_id: str,
        path: str,
        dest: StrPath | BinaryWriter,
        *,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> ReadFileResult: ...

    def read_file(
        self,
        sandbox_id: str,
        path: str,
        dest: StrPath | BinaryWriter | None = None,
        *,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> bytes | ReadFileResult:
        """Downloads the file at ``path`` (absolute; symlinks are followed)
        from a Linux sandbox, or ``length`` bytes of it (0: to the end)
        from ``offset`` on.

        ``dest`` says where the bytes go:

        * None: they are returned, as ``bytes`` (the whole download is then
          held in memory);
        * a ``str`` or ``os.PathLike``: a LOCAL path, written atomically:
          the bytes go to a temporary file in the same directory, which
          replaces ``dest`` only once the download is complete and
          verified; on any error it is removed and ``dest`` is untouched.
          Returns a :class:`forkd.ReadFileResult` (``size``, ``sha256``,
          ``file_size``);
        * a binary file object (anything with ``write``): the chunks are
          written to it as they arrive; returns a ReadFileResult. When the
          download fails part-way, what arrived was written already.

        Every download is checked against the size and SHA-256 the guest
        sends at its end: a mismatch, or a stream that ends without them,
        raises :class:`forkd.DataLossError`. ``timeout`` (seconds) bounds
        the whole download (None: no deadline). Errors: a missing file,
        NotFoundError; a directory or device, or a reference-guest sandbox,
        FailedPreconditionError; a bad path, InvalidArgumentError. For the
        chunks as they come, see :meth:`iter_file`.
        """
        req = wire.read_file_request(sandbox_id, path, offset, length)
        check = files.DownloadCheck(path)
        if dest is None:
            data = bytearray()
            with closing(self._download(req, check, timeout)) as chunks:
                for chunk in chunks:
                    data += chunk
            check.result()
            return bytes(data)
        if files.is_path(dest):
            out = files.AtomicFile(dest)
            try:
                with closing(self._download(req, check, timeout)) as chunks:
                    for chunk in chunks:
                        out.write(chunk)
                result = check.result()
            except BaseException:
                out.discard()
                raise
            out.commit()
            return result
        if files.is_writer(dest):
            with closing(self._download(req, check, timeout)) as chunks:
                for chunk in chunks:
                    dest.write(chunk)
            return check.result()
        raise files.dest_type_error(dest)

    def iter_file(
        self,
        sandbox_id: str,
        path: str,
        *,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> Iterator[bytes]:
        """Yields the file's bytes as they arrive (chunks of at most 64
        KiB), as :meth:`read_file` downloads them. The download is verified
        at its end: when the size or SHA-256 do not match, or the stream
        ends without them, the iteration raises
        :class:`forkd.DataLossError` after the last chunk, so treat the
        chunks as unverified until it finishes. Leaving the loop early
        cancels the call."""
        req = wire.read_file_request(sandbox_id, path, offset, length)
        check = files.DownloadCheck(path)
        with closing(self._download(req, check, timeout)) as chunks:
            yield from chunks
        check.result()

    def _download(
        self, req: sandbox_pb2.ReadFileRequest, check: files.DownloadCheck, timeout: float | None
    ) -> Generator[bytes, None, None]:
        with closing(self._stream("ReadFile", self._sandboxes.ReadFile, req, timeout)) as stream:
            for msg in stream:
                chunk = check.add(msg)
                if chunk:
                    yield chunk

    def stat_file(self, sandbox_id: str, path: str) -> FileInfo:
        """Describes ``path`` (absolute) in a Linux sandbox as ``lstat``
        does (a symlink is described, not followed): a
        :class:`forkd.FileInfo` with ``name``, ``size``, ``mode``, ``type``
        and ``modify_time``. A missing path: NotFoundError."""
        req = wire.stat_file_request(sandbox_id, path)
        return FileInfo.from_message(self._unary("StatFile", self._sandboxes.StatFile, req).info)

    def list_dir(self, sandbox_id: str, path: str) -> ListDirResult:
        """Lists the directory ``path`` (absolute; a symlink to one is
        followed) of a Linux sandbox: a :class:`forkd.ListDirResult` with
        ``entries`` (each a :class:`forkd.FileInfo`), sorted by name,
        without ``.`` and ``..``, and ``truncated`` (the daemon lists at
        most 4096). A missing directory: NotFoundError; not a directory:
        FailedPreconditionError."""
        req = wire.list_dir_request(sandbox_id, path)
        return ListDirResult.from_message(self._unary("ListDir", self._sandboxes.ListDir, req))

    def remove_file(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        """Removes a file, symlink or empty directory of a Linux sandbox;
        with ``recursive``, a directory and everything in it. A missing
        path: NotFoundError; a non-empty directory without ``recursive``:
        FailedPreconditionError; ``/``: InvalidArgumentError."""
        req = wire.remove_file_request(sandbox_id, path, recursive)
        self._unary("RemoveFile", self._sandboxes.RemoveFile, req)

    # ---- snapshots ----------------------------------------------------------

    def create_snapshot(
        self,
        tag: str | None = None,
        *,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        warmup: Sequence[Sequence[str]] = (),
        keep_running: bool = False,
        image: str | None = None,
    ) -> CreateSnapshotResult:
        """Boots a sandbox, runs each ``warmup`` argv in it, and snapshots it.

        ``image`` names a Linux image in the daemon's images directory to
        boot instead of the reference guest (None: the reference guest);
        ``memory_mib`` None then means the image's default. The snapshot's
        ``.image`` records it, and children spawned from the snapshot run
        it. The same host requirements and errors as
        :meth:`spawn_sandboxes` with ``image`` apply.

        ``keep_running`` keeps the warmed sandbox (its id is in the response).

        Returns a :class:`forkd.CreateSnapshotResult`: ``.snapshot``,
        ``.sandbox_id`` and ``.tag`` (the snapshot's), also as
        ``res["tag"]``.
        """
        req = wire.create_snapshot_request(tag, memory_mib, vcpus, warmup, keep_running, image)
        return CreateSnapshotResult(self._unary("CreateSnapshot", self._snapshots.CreateSnapshot, req))

    def get_snapshot(self, tag: str) -> snapshot_pb2.Snapshot:
        """One snapshot by tag (NotFoundError when there is none)."""
        req = snapshot_pb2.GetSnapshotRequest(tag=tag)
        return self._unary("GetSnapshot", self._snapshots.GetSnapshot, req).snapshot

    def list_snapshots(self, status: SnapshotStatusName | None = None) -> list[snapshot_pb2.Snapshot]:
        """Every snapshot, oldest first; or only those with ``status``."""
        req = wire.list_snapshots_request(status)
        return list(self._unary("ListSnapshots", self._snapshots.ListSnapshots, req).snapshots)

    def delete_snapshot(self, tag: str, *, cascade: bool = False, force: bool = False) -> list[str]:
        """Deletes a snapshot; returns the tags removed, this one last.

        Refused (FailedPreconditionError) when diff snapshots depend on it or
        children run from it, unless ``cascade`` (delete the dependents too)
        or ``force`` (orphan them). A WRITING live snapshot's copy is
        cancelled first.
        """
        req = snapshot_pb2.DeleteSnapshotRequest(tag=tag, cascade=cascade, force=force)
        return list(self._unary("DeleteSnapshot", self._snapshots.DeleteSnapshot, req).deleted_tags)

    def watch_snapshot(self, tag: str, *, timeout: float | None = None) -> Iterator[snapshot_pb2.WatchSnapshotResponse]:
        """Yields the snapshot's status now, then copy progress while it is
        WRITING, then READY or FAILED, and ends. ``timeout`` (seconds) bounds
        the whole stream (DeadlineExceededError)."""
        req = snapshot_pb2.WatchSnapshotRequest(tag=tag)
        yield from self._stream("WatchSnapshot", self._snapshots.WatchSnapshot, req, timeout)
