"""The forkd MCP server: sixteen tools over one forkd gRPC connection.

:class:`ForkdTools` holds the connection (an :class:`forkd.AsyncController`
created on the first tool call and closed when the server stops) and
implements the tools; :func:`build_server` registers them on an
:class:`mcp.server.mcpserver.MCPServer`. A failed forkd call becomes a tool
error (``isError``) carrying the gRPC code name and the daemon's message,
for example ``Error executing tool kill_sandbox: NOT_FOUND: sandbox sb-x not
found``, so the model can correct its call.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

import forkd
from forkd_mcp import results
from forkd_mcp.results import (
    BranchResult,
    ConsoleOutput,
    DeletedSnapshots,
    DirListing,
    ExecOutput,
    FileContent,
    FileStat,
    FileWritten,
    KilledSandbox,
    RemovedFile,
    SandboxList,
    SandboxTtl,
    SnapshotInfo,
    SnapshotList,
    SpawnResult,
    WatchResult,
)

VERSION = "0.1.0"

DEFAULT_CALL_TIMEOUT_S = 600.0
"""Deadline for each unary forkd call (a spawn of many sandboxes, a waited live branch)."""
DEFAULT_OUTPUT_LIMIT = 64 * 1024
"""Bytes of stdout, and of stderr, that exec returns; the rest is dropped."""
DEFAULT_WATCH_TIMEOUT_S = 120.0
WATCH_UPDATES_KEPT = 50
"""watch_snapshot returns at most this many of the most recent updates."""
MAX_FILE_BYTES = 1 << 20
"""The most bytes write_file takes, and read_file returns, in one call (1 MiB)."""
DEFAULT_READ_BYTES = 64 * 1024
"""What read_file returns when max_bytes is not given."""
LIST_DIR_LIMIT = 200
"""The most entries list_dir returns in one call."""

BranchModeName = Literal["full", "diff", "live"]
StatusName = Literal["WRITING", "READY", "FAILED"]
FileEncoding = Literal["utf-8", "base64"]
OCTAL_MODE = r"^(0o?)?[0-7]{1,4}$"

INSTRUCTIONS = """\
forkd runs KVM microVM sandboxes and snapshots them. A typical session:
spawn_sandboxes (cold boot) -> exec commands in it -> branch_sandbox to
capture it as a snapshot -> spawn_sandboxes with that tag to fork copies ->
kill_sandbox and delete_snapshot to clean up (or spawn with ttl_seconds,
or set_sandbox_ttl, to have a sandbox deleted when its time is up). By default sandboxes run the
forkd reference guest, not a Linux shell: exec ["help"] lists its
commands. spawn_sandboxes with image boots a Linux image instead (only on
hosts with Intel VMX or AMD SVM): there exec runs real programs, with env,
cwd and stdin, and read_console shows the boot log; write_file and
read_file move files in and out (text or base64, up to 1 MiB a call), and
list_dir, stat_file and remove_file manage them (Linux sandboxes only).
Linux sandboxes branch
and fork like any other: children of a Linux snapshot run its image. A
tool error names the gRPC code (NOT_FOUND, INVALID_ARGUMENT,
FAILED_PRECONDITION, ...) followed by the daemon's explanation."""

_TERMINAL = frozenset({"READY", "FAILED"})


class ForkdTools:
    """The tools, bound to one forkd daemon.

    ``target`` is ``host:port`` or ``unix:/path``; ``token`` the daemon's
    bearer token, if it has one. ``call_timeout`` (seconds, None for none)
    bounds each unary call; ``output_limit`` caps exec's stdout and stderr.
    """

    def __init__(
        self,
        target: str = forkd.DEFAULT_TARGET,
        token: str | None = None,
        *,
        call_timeout: float | None = DEFAULT_CALL_TIMEOUT_S,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> None:
        self.target = target
        self._token = token
        self._call_timeout = call_timeout
        self._output_limit = output_limit
        self._ctl: forkd.AsyncController | None = None

    def controller(self) -> forkd.AsyncController:
        """The connection, created on first use (inside the server's event loop)."""
        if self._ctl is None:
            self._ctl = forkd.AsyncController(self.target, self._token, timeout=self._call_timeout)
        return self._ctl

    async def aclose(self) -> None:
        """Closes the connection, if one was made."""
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            await ctl.close()

    @contextmanager
    def _forkd_errors(self) -> Iterator[None]:
        """Turns a ForkdError into a ToolError: code name, then the message."""
        try:
            yield
        except forkd.ForkdError as e:
            hint = ""
            if e.code_name == "UNAVAILABLE":
                hint = f" (is the forkd daemon running at {self.target}?)"
            elif e.code_name == "UNAUTHENTICATED":
                hint = " (start forkd-mcp with the daemon's token: FORKD_TOKEN or --token-file)"
            raise ToolError(f"{e.code_name}: {e.message}{hint}") from e

    # ---- sandboxes ----------------------------------------------------------

    async def spawn_sandboxes(
        self,
        tag: str | None = None,
        n: int = 1,
        live_fork: bool = False,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        labels: dict[str, str] | None = None,
        wait_for_snapshot: bool = False,
        image: str | None = None,
        ttl_seconds: Annotated[int | None, Field(ge=0)] = None,
    ) -> SpawnResult:
        """Start n microVM sandboxes: cold boots of the reference guest or of
        a Linux image, or children forked copy-on-write from a snapshot.

        Args:
            tag: snapshot to fork the children from; omit for cold boots. The
                snapshot must be READY (see wait_for_snapshot). Children run
                the snapshot's guest: its Linux image, if it has one.
            image: name of a Linux image (built on the daemon's host with
                `forkd image build NAME`) to cold boot instead of the
                reference guest; omit for the reference guest. Cold boots
                only: not with tag (children of a Linux snapshot run its
                image already). Needs a host with Intel VMX or AMD SVM,
                elsewhere FAILED_PRECONDITION; an unknown image is NOT_FOUND.
            n: how many sandboxes to start, 1 to 1000.
            live_fork: set true when you mean to live-branch these sandboxes
                (branch_sandbox mode "live"). Every forkd sandbox can be
                live-branched, so this only records the intent on each sandbox.
            memory_mib: guest RAM in MiB, cold boots only (36 to 65536; omit
                for 256, or for the image's own default with image). When forking, omit it: children get the snapshot's size.
            vcpus: number of vCPUs, cold boots only (1 to 8; omit for 2).
            labels: labels put on every new sandbox, for list_sandboxes
                filtering. Keys: lowercase letters, digits, '.', '_', '-',
                starting with a letter; values up to 63 characters.
            wait_for_snapshot: forking only. When the snapshot is still
                WRITING (a live branch made with wait=false), wait until it is
                READY instead of failing with FAILED_PRECONDITION.
            ttl_seconds: lifetime of each sandbox in seconds: it is deleted
                that long after it started, as kill_sandbox would (snapshots
                taken of it stay). Omit or 0 for the daemon's default (no
                expiry unless the daemon sets one); above the daemon's
                maximum is INVALID_ARGUMENT. Change it later with
                set_sandbox_ttl; each sandbox's expire_time says when.

        Returns the sandboxes that started (use their ids with exec,
        branch_sandbox and kill_sandbox) and failures for any that did not;
        the call fails only when none started.
        """
        with self._forkd_errors():
            resp = await self.controller().spawn_sandboxes(
                tag,
                n,
                live_fork=live_fork,
                memory_mib=memory_mib,
                vcpus=vcpus,
                labels=labels,
                wait_for_snapshot=wait_for_snapshot,
                image=image,
                ttl_seconds=ttl_seconds,
            )
        return results.spawn_result(resp.message)

    async def list_sandboxes(self, labels: dict[str, str] | None = None) -> SandboxList:
        """List the sandboxes, oldest first, with their state (RUNNING, EXITED,
        FAILED, ...), the snapshot each was forked from, and their labels.

        Args:
            labels: only sandboxes carrying every one of these labels with the
                same value; omit to list all.
        """
        with self._forkd_errors():
            sandboxes = await self.controller().list_sandboxes(labels)
        return SandboxList(sandboxes=[results.sandbox_info(sb) for sb in sandboxes])

    async def exec(
        self,
        sandbox_id: str,
        argv: list[str],
        timeout_s: Annotated[float | None, Field(gt=0)] = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
    ) -> ExecOutput:
        """Run a command in a sandbox and return its output and exit code.

        In a reference-guest sandbox (the default) there is no shell: argv[0]
        names one of its builtins (echo, fill, checksum, sleep, exit, ...;
        run ["help"] for the list), and commands in one sandbox run one at a
        time. In a Linux sandbox (spawned with image) argv[0] is a program,
        looked up on the guest's PATH; use ["sh", "-c", "..."] for a shell
        line.

        Args:
            sandbox_id: the sandbox to run it in.
            argv: the command and its arguments, for example ["echo", "hi"].
            timeout_s: stop the command after this many seconds; the call then
                fails with DEADLINE_EXCEEDED and the sandbox stays usable. Omit
                for no limit.
            env: Linux sandboxes only: environment variables added to the
                guest's defaults, for example {"LANG": "C.UTF-8"}.
            cwd: Linux sandboxes only: absolute working directory (omit for /).
            stdin: Linux sandboxes only: text written to the command's
                standard input (as UTF-8, at most 1 MiB), which is then
                closed; omit for /dev/null.

        Returns stdout and stderr as text (UTF-8, invalid bytes replaced; each
        cut to the server's limit, with truncated=true when it was), the
        exit_code (non-zero is a result, not an error), the time the command
        ran inside the guest (duration_us) and, when a signal killed it,
        signal (exit_code is then 128 + signal).
        """
        collector = results.ExecCollector(self._output_limit)
        with self._forkd_errors():
            stream = self.controller().exec_stream(sandbox_id, argv, timeout_s, env=env, cwd=cwd, stdin=stdin)
            async for event in stream:
                collector.add(event)
        output = collector.output()
        if output is None:
            raise ToolError("UNKNOWN: the exec stream ended without an exit status")
        return output

    async def read_console(
        self,
        sandbox_id: str,
        tail_bytes: Annotated[int, Field(ge=0, le=1 << 20)] = 0,
    ) -> ConsoleOutput:
        """Read the end of a Linux sandbox's serial console log: kernel
        messages and early userland output, useful when a Linux guest failed
        to boot or a service misbehaves. Reference-guest sandboxes have no
        console (FAILED_PRECONDITION).

        Args:
            sandbox_id: the Linux sandbox.
            tail_bytes: how many bytes of the log's end to return, up to
                1048576; omit (or 0) for 65536.

        Returns the text (UTF-8, invalid bytes replaced), data_bytes (its
        length in bytes) and truncated (true when older output was left out).
        """
        with self._forkd_errors():
            resp = await self.controller().read_console(sandbox_id, tail_bytes)
        return results.console_output(sandbox_id, resp)

    async def branch_sandbox(
        self,
        sandbox_id: str,
        tag: str | None = None,
        mode: BranchModeName = "full",
        wait: bool = True,
        measure_diff: bool = False,
    ) -> BranchResult:
        """Capture a running sandbox (reference guest or Linux) as a new
        snapshot, which spawn_sandboxes can then fork copies from. The
        sandbox keeps running.

        Args:
            sandbox_id: the sandbox to branch.
            tag: name of the new snapshot (1-64 letters, digits, '.', '_',
                '-', starting with a letter or digit); omit for a generated
                one, returned in snapshot.tag.
            mode: how memory is captured. "full" (default): pause, write all
                of RAM, resume. "diff": write only the pages dirtied since the
                sandbox's base snapshot (the one it was forked from, or its
                latest branch); smaller, and depends on that parent. "live":
                pause only to save the vCPU state, then copy memory while the
                guest keeps running.
            wait: live mode only. True (default) returns once the snapshot is
                READY; false returns as soon as the guest runs again, with the
                snapshot still WRITING: follow it with watch_snapshot, or fork
                from it with spawn_sandboxes wait_for_snapshot=true. Leave it
                true for full and diff (false is INVALID_ARGUMENT there).
            measure_diff: also count the pages dirtied since the base snapshot
                (dirty_pages in the result); diff mode counts them anyway.

        Returns the snapshot (READY, or WRITING for live with wait=false),
        how long the guest was paused (pause_ms), bytes_written, dirty_pages
        and, for a waited live branch, faults_served.
        """
        with self._forkd_errors():
            resp = await self.controller().branch_sandbox(
                sandbox_id, tag, mode=mode, wait=wait, measure_diff=measure_diff
            )
        return results.branch_result(resp.message)

    async def set_sandbox_ttl(
        self,
        sandbox_id: str,
        ttl_seconds: Annotated[int, Field(ge=0)],
    ) -> SandboxTtl:
        """Set how long a sandbox lives from now, or make it live until
        kill_sandbox. When its time is up the sandbox is deleted as
        kill_sandbox would; snapshots branched from it are kept.

        Args:
            sandbox_id: the sandbox.
            ttl_seconds: seconds from now until it is deleted; 0 clears the
                expiry. Above the daemon's maximum (--max-ttl) is
                INVALID_ARGUMENT; a stopped sandbox is FAILED_PRECONDITION.

        Returns the sandbox with its new expire_time (null: never).
        """
        with self._forkd_errors():
            sandbox = await self.controller().set_sandbox_ttl(sandbox_id, ttl_seconds)
        return SandboxTtl(sandbox=results.sandbox_info(sandbox))

    async def kill_sandbox(self, sandbox_id: str) -> KilledSandbox:
        """Stop a sandbox's microVM and delete the sandbox; its id is gone
        afterwards. Snapshots branched from it are kept.

        Args:
            sandbox_id: the sandbox to delete.

        Returns the sandbox as it was just before it was deleted.
        """
        with self._forkd_errors():
            sandbox = await self.controller().delete_sandbox(sandbox_id)
        return KilledSandbox(sandbox=results.sandbox_info(sandbox))

    # ---- files (Linux sandboxes) --------------------------------------------

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        content: str,
        encoding: FileEncoding = "utf-8",
        mode: Annotated[str | None, Field(pattern=OCTAL_MODE)] = None,
        make_parents: bool = False,
        no_overwrite: bool = False,
    ) -> FileWritten:
        """Create or replace a file in a Linux sandbox (spawned with image;
        reference-guest sandboxes have no files: FAILED_PRECONDITION). The
        file appears under path only once it is completely written.

        Args:
            sandbox_id: the Linux sandbox.
            path: absolute path of the file, for example "/root/main.py".
            content: the file's contents: text (encoding "utf-8"), or
                base64 for binary data (encoding "base64"). At most 1048576
                bytes once decoded: write a bigger file as several parts
                and join them with exec, for example ["sh", "-c", "cat
                /tmp/p1 /tmp/p2 > /root/big && rm /tmp/p1 /tmp/p2"].
            encoding: "utf-8" (default): content is text, written as UTF-8.
                "base64": content is base64, written as the decoded bytes.
            mode: permission bits as an octal string, for example "755"
                for an executable script or "600"; omit for "644". The umask
                does not apply.
            make_parents: create missing parent directories (mode 755);
                without it a missing parent is NOT_FOUND.
            no_overwrite: fail with ALREADY_EXISTS if path exists, instead
                of replacing it.

        Returns the path, the bytes written (size) and their sha256.
        """
        data = _decode_content(content, encoding)
        file_mode = int(mode.removeprefix("0o"), 8) if mode else 0
        with self._forkd_errors():
            res = await self.controller().write_file(
                sandbox_id,
                path,
                data,
                mode=file_mode,
                make_parents=make_parents,
                no_overwrite=no_overwrite,
                timeout=self._call_timeout,
            )
        return results.file_written(res)

    async def read_file(
        self,
        sandbox_id: str,
        path: str,
        offset: Annotated[int, Field(ge=0)] = 0,
        max_bytes: Annotated[int, Field(ge=1, le=MAX_FILE_BYTES)] = DEFAULT_READ_BYTES,
    ) -> FileContent:
        """Read a file of a Linux sandbox (spawned with image; symlinks are
        followed). Returns text when the bytes are valid UTF-8, else base64.

        Args:
            sandbox_id: the Linux sandbox.
            path: absolute path of a regular file, for example
                "/etc/os-release". A directory is FAILED_PRECONDITION (use
                list_dir), a missing file NOT_FOUND.
            offset: first byte to read (default 0); past the end returns
                nothing.
            max_bytes: how many bytes to return at most, 1 to 1048576
                (default 65536). When the file goes on, truncated is true:
                call again with offset set to next_offset for the rest.

        Returns content with its encoding ("utf-8" or "base64"), size and
        sha256 of the bytes returned, truncated and next_offset, and
        file_size (the whole file's size; 0 for /proc files).
        """
        out = io.BytesIO()
        with self._forkd_errors():
            end = await self.controller().read_file(
                sandbox_id, path, out, offset=offset, length=max_bytes + 1, timeout=self._call_timeout
            )
        return results.file_content(path, offset, out.getvalue(), max_bytes, end.file_size)

    async def list_dir(
        self,
        sandbox_id: str,
        path: str,
        offset: Annotated[int, Field(ge=0)] = 0,
    ) -> DirListing:
        """List a directory of a Linux sandbox (spawned with image): each
        entry's name, type (FILE, DIRECTORY, SYMLINK, OTHER), size, mode and
        modify_time, sorted by name, at most 200 per call.

        Args:
            sandbox_id: the Linux sandbox.
            path: absolute path of the directory, for example "/root" (a
                symlink to a directory is followed). A missing directory is
                NOT_FOUND, a file FAILED_PRECONDITION.
            offset: skip this many entries (default 0): when truncated is
                true, call again with offset increased by 200 for the next
                ones.

        Returns the entries, truncated (more entries exist than returned)
        and entries_listed (how many the sandbox listed; it lists at most
        4096).
        """
        with self._forkd_errors():
            listing = await self.controller().list_dir(sandbox_id, path)
        return results.dir_listing(path, listing, offset, LIST_DIR_LIMIT)

    async def stat_file(self, sandbox_id: str, path: str) -> FileStat:
        """Describe one path of a Linux sandbox (spawned with image) as
        lstat does: type (FILE, DIRECTORY, SYMLINK, OTHER; a symlink is
        described, not followed), size, mode and modify_time. Use it to
        check whether a path exists: a missing path is NOT_FOUND.

        Args:
            sandbox_id: the Linux sandbox.
            path: absolute path, for example "/usr/bin/python3".
        """
        with self._forkd_errors():
            info = await self.controller().stat_file(sandbox_id, path)
        return results.file_stat(path, info)

    async def remove_file(self, sandbox_id: str, path: str, recursive: bool = False) -> RemovedFile:
        """Delete a file, symlink or empty directory of a Linux sandbox
        (spawned with image); with recursive, a directory and everything in
        it.

        Args:
            sandbox_id: the Linux sandbox.
            path: absolute path to remove; "/" is INVALID_ARGUMENT, a
                missing path NOT_FOUND.
            recursive: also remove a non-empty directory and all its
                contents; without it a non-empty directory is
                FAILED_PRECONDITION.
        """
        with self._forkd_errors():
            await self.controller().remove_file(sandbox_id, path, recursive=recursive)
        return RemovedFile(path=path, recursive=recursive)

    # ---- snapshots ----------------------------------------------------------

    async def get_snapshot(self, tag: str) -> SnapshotInfo:
        """Get one snapshot: its status (WRITING, READY, FAILED with
        failure_reason), mode, sizes, diff chain, dependents and the running
        sandboxes forked from it (children).

        Args:
            tag: the snapshot's tag.
        """
        with self._forkd_errors():
            snap = await self.controller().get_snapshot(tag)
        return results.snapshot_info(snap)

    async def list_snapshots(self, status: StatusName | None = None) -> SnapshotList:
        """List the snapshots, oldest first.

        Args:
            status: only snapshots with this status: "WRITING" (a live copy
                still running), "READY" or "FAILED"; omit to list all.
        """
        with self._forkd_errors():
            snaps = await self.controller().list_snapshots(_STATUS_FILTER[status] if status else None)
        return SnapshotList(snapshots=[results.snapshot_info(s) for s in snaps])

    async def watch_snapshot(
        self,
        tag: str,
        ctx: Context,
        timeout_s: Annotated[float, Field(gt=0)] = DEFAULT_WATCH_TIMEOUT_S,
    ) -> WatchResult:
        """Follow a snapshot until it is READY or FAILED; use it after
        branch_sandbox with mode "live" and wait=false. Returns at once for a
        snapshot that is already READY or FAILED.

        Args:
            tag: the snapshot to follow.
            timeout_s: how long to follow it, in seconds (default 120). If it
                runs out first, the result has done=false and status WRITING;
                call again to keep waiting.

        Returns the last status (READY, FAILED with failure_reason, or
        WRITING when not done), done, and the most recent updates (status,
        bytes_copied of bytes_total, faults_served), with updates_seen
        counting them all. Copy progress is also sent as MCP progress
        notifications when the client asks for them.
        """
        updates: deque[results.SnapshotUpdate] = deque(maxlen=WATCH_UPDATES_KEPT)
        seen = 0
        with self._forkd_errors():
            try:
                async for msg in self.controller().watch_snapshot(tag, timeout=timeout_s):
                    update = results.snapshot_update(msg)
                    seen += 1
                    updates.append(update)
                    if msg.bytes_total:
                        await ctx.report_progress(msg.bytes_copied, msg.bytes_total, update["status"])
            except forkd.DeadlineExceededError:
                pass  # timeout_s ran out: report where the snapshot is
            if updates:
                status, failure_reason = updates[-1]["status"], updates[-1]["failure_reason"]
            else:  # timed out before the first update
                snap = results.snapshot_info(await self.controller().get_snapshot(tag))
                status, failure_reason = snap["status"], snap["failure_reason"]
        return WatchResult(
            tag=tag,
            status=status,
            done=status in _TERMINAL,
            failure_reason=failure_reason,
            updates=list(updates),
            updates_seen=seen,
        )

    async def delete_snapshot(self, tag: str, cascade: bool = False, force: bool = False) -> DeletedSnapshots:
        """Delete a snapshot and its files. A live snapshot still WRITING has
        its copy cancelled first.

        Args:
            tag: the snapshot to delete.
            cascade: also delete every diff snapshot that depends on it,
                directly or not. Without cascade (or force), a snapshot with
                dependents is refused with FAILED_PRECONDITION.
            force: delete it even while sandboxes forked from it run, or,
                without cascade, while diff snapshots depend on it (those
                then become FAILED).

        Returns deleted_tags: the tags removed, this one last.
        """
        with self._forkd_errors():
            deleted = await self.controller().delete_snapshot(tag, cascade=cascade, force=force)
        return DeletedSnapshots(deleted_tags=deleted)


_STATUS_FILTER: dict[str, forkd.SnapshotStatusName] = {"WRITING": "writing", "READY": "ready", "FAILED": "failed"}

# base64 of MAX_FILE_BYTES bytes, without whitespace.
_MAX_BASE64_CHARS = 4 * ((MAX_FILE_BYTES + 2) // 3)


def _decode_content(content: str, encoding: str) -> bytes:
    """write_file's content as bytes; a ToolError says what is wrong with it."""
    if encoding == "base64":
        packed = "".join(content.split())  # line breaks and spaces are allowed
        if len(packed) > _MAX_BASE64_CHARS:
            raise ToolError(
                f"INVALID_ARGUMENT: content is {len(packed)} base64 characters, more than the"
                f" {MAX_FILE_BYTES} bytes write_file takes; write parts of at most that size and join them"
                " with exec (cat)"
            )
        try:
            data = base64.b64decode(packed, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ToolError(
                f'INVALID_ARGUMENT: content is not valid base64 ({e}); for text use encoding "utf-8"'
            ) from None
    else:
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ToolError(
                f'INVALID_ARGUMENT: content is not valid Unicode text ({e}); send binary data with encoding "base64"'
            ) from None
    if len(data) > MAX_FILE_BYTES:
        raise ToolError(
            f"INVALID_ARGUMENT: content is {len(data)} bytes, more than the {MAX_FILE_BYTES} bytes"
            " write_file takes; write parts of at most that size and join them with exec (cat)"
        )
    return data


_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_DESTRUCTIVE = ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False)
_CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
# Replaces the sandbox's lifetime: the same call twice gives the same state.
_SETS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
# A command can stop or crash the guest (exit, crash, poweroff).
_RUNS = ToolAnnotations(read_only_hint=False, open_world_hint=False)
# Replaces a file that exists (unless no_overwrite); the same call twice
# leaves the same file.
_WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)


def _tools(tools: ForkdTools) -> list[tuple[Callable[..., Awaitable[Any]], ToolAnnotations]]:
    return [
        (tools.spawn_sandboxes, _CREATES),
        (tools.branch_sandbox, _CREATES),
        (tools.exec, _RUNS),
        (tools.set_sandbox_ttl, _SETS),
        (tools.write_file, _WRITES),
        (tools.get_snapshot, _READ_ONLY),
        (tools.watch_snapshot, _READ_ONLY),
        (tools.list_snapshots, _READ_ONLY),
        (tools.list_sandboxes, _READ_ONLY),
        (tools.read_console, _READ_ONLY),
        (tools.read_file, _READ_ONLY),
        (tools.list_dir, _READ_ONLY),
        (tools.stat_file, _READ_ONLY),
        (tools.delete_snapshot, _DESTRUCTIVE),
        (tools.kill_sandbox, _DESTRUCTIVE),
        (tools.remove_file, _DESTRUCTIVE),
    ]


def build_server(
    tools: ForkdTools,
    *,
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING",
) -> MCPServer[None]:
    """An MCPServer named "forkd" serving ``tools``; the connection is closed
    when the server stops. Run it with ``.run("stdio")``."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[None]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await tools.aclose()

    server: MCPServer[None] = MCPServer(
        "forkd",
        instructions=INSTRUCTIONS,
        version=VERSION,
        lifespan=lifespan,
        log_level=log_level,
    )
    for fn, annotations in _tools(tools):
        server.add_tool(fn, description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations)
    return server
