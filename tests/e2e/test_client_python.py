"""The generated Python client (`clients/python`, package `forkd`) against a
real daemon and real microVMs: spawn, exec, branch full/diff/live,
wait=false followed on WatchSnapshot, delete, error mapping, the bearer
token, the wire compatibility rules as the daemon receives them, and the
asyncio controller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

import forkd
from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc, snapshot_pb2

MEM = 64  # MiB per sandbox: small and quick on two cores

READY = forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_READY")
WRITING = forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_WRITING")
RUNNING = forkd.SandboxState.Value("SANDBOX_STATE_RUNNING")


@pytest.fixture
def ctl(daemon) -> Iterator[forkd.Controller]:
    with forkd.Controller(daemon.listen, timeout=60) as c:
        yield c


def spawn_one(ctl: forkd.Controller, **kwargs: Any) -> forkd.Sandbox:
    kwargs.setdefault("memory_mib", MEM)
    resp = ctl.spawn_sandboxes(**kwargs)
    assert not resp.failures, resp.failures
    assert len(resp.sandboxes) == 1
    return resp.sandboxes[0]


def checksum(ctl: forkd.Controller, sandbox_id: str) -> str:
    res = ctl.exec(sandbox_id, ["checksum"])
    assert res.exit_code == 0, res
    return res.text.strip()


# ---- sandboxes and exec -------------------------------------------------------


def test_spawn_list_get_delete(ctl: forkd.Controller) -> None:
    resp = ctl.spawn_sandboxes(n=2, memory_mib=MEM, labels={"team": "py"}, live_fork=True)
    assert len(resp.sandboxes) == 2 and not resp.failures
    assert resp.elapsed_ms > 0
    ids = {sb.id for sb in resp.sandboxes}
    for sb in resp.sandboxes:
        assert sb.state == RUNNING
        assert sb.memory_mib == MEM
        assert sb.live_fork is True
        assert dict(sb.labels) == {"team": "py"}
        assert sb.vmm_pid > 0
    other = spawn_one(ctl)
    assert other.live_fork is False

    assert {sb.id for sb in ctl.list_sandboxes(labels={"team": "py"})} == ids
    assert {sb.id for sb in ctl.list_sandboxes()} == ids | {other.id}
    first = resp.sandboxes[0]
    assert ctl.get_sandbox(first.id).id == first.id

    gone = ctl.delete_sandbox(first.id)
    assert gone.id == first.id
    with pytest.raises(forkd.NotFoundError) as e:
        ctl.get_sandbox(first.id)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert first.id in e.value.message


def test_exec_results_and_stream(ctl: forkd.Controller) -> None:
    sb = spawn_one(ctl)
    res = ctl.exec(sb.id, ["echo", "hello", "forkd"])
    assert (res.stdout, res.stderr, res.exit_code) == (b"hello forkd\n", b"", 0)
    assert res.ok and res.text == "hello forkd\n"

    failed = ctl.exec(sb.id, ["exit", "7"])
    assert failed.exit_code == 7 and not failed.ok

    unknown = ctl.exec(sb.id, ["no-such-builtin"])
    assert unknown.exit_code != 0 and unknown.stderr

    events = list(ctl.exec_stream(sb.id, ["emit", "300000"]))
    assert events[-1].kind == "exit" and events[-1].exit_code == 0
    out = b"".join(ev.data for ev in events if ev.kind == "stdout")
    assert len(out) == 300000
    assert all(ev.kind == "stdout" for ev in events[:-1])

    with pytest.raises(forkd.DeadlineExceededError):
        ctl.exec(sb.id, ["sleep", "5000"], timeout=0.2)
    assert ctl.exec(sb.id, ["echo", "still", "usable"]).stdout == b"still usable\n"


# ---- branches -------------------------------------------------------------------


def test_branch_full_diff_live_and_fork(ctl: forkd.Controller) -> None:
    sb = spawn_one(ctl)
    assert ctl.exec(sb.id, ["fill", "16", "1"]).ok

    full = ctl.branch_sandbox(sb.id, "py-full", mode="full")
    assert full.snapshot.tag == "py-full"
    assert full.snapshot.status == READY
    assert full.snapshot.mode == forkd.BranchModeEnum.Value("BRANCH_MODE_FULL")
    assert full.bytes_written >= 16 << 20
    assert full.pause_ms > 0

    assert ctl.exec(sb.id, ["fill", "1", "2"]).ok
    diff = ctl.branch_sandbox(sb.id, "py-diff", mode="diff")
    assert diff.snapshot.mode == forkd.BranchModeEnum.Value("BRANCH_MODE_DIFF")
    assert diff.snapshot.parent_tag == "py-full"
    assert diff.dirty_pages >= 256  # 1 MiB refilled
    assert diff.bytes_written < full.bytes_written

    # The legacy flag alone still means DIFF.
    legacy = ctl.branch_sandbox(sb.id, "py-legacy-diff", diff=True)
    assert legacy.snapshot.mode == forkd.BranchModeEnum.Value("BRANCH_MODE_DIFF")

    at_branch = checksum(ctl, sb.id)
    live = ctl.branch_sandbox(sb.id, "py-live", mode="live")
    assert live.snapshot.status == READY
    assert live.snapshot.mode == forkd.BranchModeEnum.Value("BRANCH_MODE_LIVE")
    assert ctl.exec(sb.id, ["fill", "16", "3"]).ok  # the source moves on

    child = spawn_one(ctl, tag="py-live", memory_mib=None)
    assert child.snapshot_tag == "py-live"
    assert checksum(ctl, child.id) == at_branch
    assert checksum(ctl, sb.id) != at_branch

    tags = [s.tag for s in ctl.list_snapshots()]
    assert tags == ["py-full", "py-diff", "py-legacy-diff", "py-live"]
    assert [s.tag for s in ctl.list_snapshots(status="ready")] == tags
    assert ctl.list_snapshots(status="writing") == []

    with pytest.raises(forkd.FailedPreconditionError):
        ctl.delete_snapshot("py-full")  # diffs depend on it
    deleted = ctl.delete_snapshot("py-full", cascade=True)
    assert deleted[-1] == "py-full"
    assert set(deleted) == {"py-full", "py-diff", "py-legacy-diff"}
    assert [s.tag for s in ctl.list_snapshots()] == ["py-live"]


def test_live_wait_false_then_watch_to_ready(ctl: forkd.Controller) -> None:
    sb = spawn_one(ctl)
    assert ctl.exec(sb.id, ["fill", "32", "5"]).ok
    at_branch = checksum(ctl, sb.id)

    resp = ctl.branch_sandbox(sb.id, "py-bg", mode="live", wait=False)
    assert resp.snapshot.status == WRITING
    assert resp.pause_ms > 0

    updates = list(ctl.watch_snapshot("py-bg", timeout=120))
    assert updates, "WatchSnapshot sent nothing"
    assert all(u.tag == "py-bg" for u in updates)
    last = updates[-1]
    assert last.status == READY, last
    assert last.bytes_total > 0 and last.bytes_copied == last.bytes_total
    assert all(u.status == WRITING for u in updates[:-1])

    snap = ctl.get_snapshot("py-bg")
    assert snap.status == READY
    child = spawn_one(ctl, tag="py-bg", memory_mib=None)
    assert checksum(ctl, child.id) == at_branch

    assert ctl.delete_snapshot("py-bg", force=True) == ["py-bg"]
    with pytest.raises(forkd.NotFoundError):
        ctl.get_snapshot("py-bg")


# ---- errors ---------------------------------------------------------------------


def test_error_mapping(ctl: forkd.Controller) -> None:
    cases: list[tuple[Callable[[], object], type[forkd.ForkdError], str]] = [
        (lambda: ctl.get_sandbox("sb-doesnotexist"), forkd.NotFoundError, "sb-doesnotexist"),
        (lambda: ctl.get_snapshot("no-such-snap"), forkd.NotFoundError, "no-such-snap"),
        (lambda: ctl.delete_snapshot("no-such-snap"), forkd.NotFoundError, "no-such-snap"),
        (lambda: ctl.exec("sb-doesnotexist", ["echo"]), forkd.NotFoundError, "sb-doesnotexist"),
        (lambda: list(ctl.watch_snapshot("no-such-snap")), forkd.NotFoundError, "no-such-snap"),
        (lambda: ctl.spawn_sandboxes(n=0), forkd.InvalidArgumentError, "n must be"),
        (lambda: ctl.spawn_sandboxes(tag="no-such-snap"), forkd.NotFoundError, "no-such-snap"),
    ]
    sb = spawn_one(ctl)
    cases += [
        (lambda: ctl.branch_sandbox(sb.id, "bad tag!"), forkd.InvalidArgumentError, "tag"),
        (lambda: ctl.exec(sb.id, []), forkd.InvalidArgumentError, "argv"),
        (lambda: ctl.branch_sandbox(sb.id, mode="full", wait=False), forkd.InvalidArgumentError, "wait"),
    ]
    for call, kind, needle in cases:
        with pytest.raises(kind) as e:
            call()
        assert needle in e.value.message, e.value
        assert e.value.code_name == e.value.code.name
        assert str(e.value).startswith(e.value.method)

    ctl.branch_sandbox(sb.id, "dup")
    with pytest.raises(forkd.AlreadyExistsError):
        ctl.branch_sandbox(sb.id, "dup")
    # Caught before any call: a mode that does not exist.
    with pytest.raises(ValueError, match="mode must be one of"):
        ctl.branch_sandbox(sb.id, mode="fast")  # type: ignore[arg-type]


def test_diff_after_its_base_was_deleted(ctl: forkd.Controller) -> None:
    sb = spawn_one(ctl)
    ctl.branch_sandbox(sb.id, "base-gone", mode="full")
    assert ctl.delete_snapshot("base-gone") == ["base-gone"]
    with pytest.raises(forkd.FailedPreconditionError) as e:
        ctl.branch_sandbox(sb.id, "diff-of-gone", mode="diff")
    assert "base snapshot base-gone was deleted" in e.value.message
    assert [s.tag for s in ctl.list_snapshots()] == []
    # A new FULL branch is a new base.
    ctl.branch_sandbox(sb.id, "new-base", mode="full")
    assert ctl.branch_sandbox(sb.id, "diff-ok", mode="diff").snapshot.parent_tag == "new-base"


def test_delete_while_exec_output_is_unread(daemon) -> None:
    """A client that stops reading an Exec stream blocks that VMM's output;
    DeleteSandbox then kills the VMM, and the stream ends ABORTED saying
    the daemon stopped it (not a protocol error)."""
    with forkd.Controller(daemon.listen, timeout=60) as ctl:
        sb = spawn_one(ctl)
        stub = sandbox_pb2_grpc.SandboxServiceStub(grpc.insecure_channel(daemon.listen))
        call = stub.Exec(sandbox_pb2.ExecRequest(sandbox_id=sb.id, argv=["emit", str(256 << 20)]))
        first = next(call)
        assert first.WhichOneof("event") == "stdout"
        time.sleep(1.0)  # the VMM fills every buffer and blocks

        gone = ctl.delete_sandbox(sb.id)
        assert gone.id == sb.id
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert "stopped by the daemon" in e.value.details(), e.value.details()
        with pytest.raises(forkd.NotFoundError):
            ctl.get_sandbox(sb.id)
    assert "bad control frame" not in daemon.log_path.read_text()


def test_unreachable_daemon_is_unavailable() -> None:
    with forkd.Controller("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(forkd.UnavailableError):
            c.list_sandboxes()


def test_bearer_token(daemon_factory) -> None:
    d = daemon_factory(token="py-client-secret")
    with forkd.Controller(d.listen, timeout=30) as anon:
        with pytest.raises(forkd.UnauthenticatedError):
            anon.list_sandboxes()
    with forkd.Controller(d.listen, "wrong", timeout=30) as wrong:
        with pytest.raises(forkd.UnauthenticatedError):
            wrong.list_sandboxes()
    with forkd.Controller(d.listen, "py-client-secret", timeout=30) as c:
        sb = spawn_one(c)
        assert c.exec(sb.id, ["echo", "authorized"]).stdout == b"authorized\n"


# ---- the compatibility rules, as the daemon receives them ----------------------


class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records every unary request message the client sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        self.sent.append(request)
        return continuation(client_call_details, request)


def test_compat_rules_on_the_wire(daemon) -> None:
    rec = Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(daemon.listen), rec)
    with forkd.Controller(daemon.listen, channel=channel, timeout=60) as c:
        sb = spawn_one(c, live_fork=True)
        plain = spawn_one(c)
        spawn_live, spawn_plain = rec.sent[0], rec.sent[1]
        assert spawn_live.HasField("live_fork") and spawn_live.live_fork is True
        assert not spawn_plain.HasField("live_fork")
        assert sb.live_fork and not plain.live_fork

        # mode wins over the legacy diff flag; wait=false is sent.
        resp = c.branch_sandbox(sb.id, "wire-live", diff=True, mode="live", wait=False)
        req = rec.sent[-1]
        assert isinstance(req, sandbox_pb2.BranchSandboxRequest)
        assert req.mode == snapshot_pb2.BRANCH_MODE_LIVE
        assert req.diff is False
        assert req.HasField("wait") and req.wait is False
        assert resp.snapshot.status == WRITING
        assert list(c.watch_snapshot("wire-live"))[-1].status == READY

        # wait=true (the default) leaves the field off the wire.
        resp = c.branch_sandbox(sb.id, "wire-live-wait", mode="live")
        req = rec.sent[-1]
        assert not req.HasField("wait")
        assert resp.snapshot.status == READY
    channel.close()


# ---- asyncio --------------------------------------------------------------------


def test_async_controller(daemon) -> None:
    async def scenario() -> None:
        async with forkd.AsyncController(daemon.listen, timeout=60) as c:
            resp = await c.spawn_sandboxes(n=1, memory_mib=MEM, live_fork=True)
            sb = resp.sandboxes[0]
            assert sb.live_fork
            res = await c.exec(sb.id, ["echo", "async"])
            assert (res.stdout, res.exit_code) == (b"async\n", 0)
            chunks = [ev async for ev in c.exec_stream(sb.id, ["emit", "5000"])]
            assert chunks[-1].kind == "exit"
            assert sum(len(ev.data) for ev in chunks if ev.kind == "stdout") == 5000

            br = await c.branch_sandbox(sb.id, "aio-live", mode="live", wait=False)
            assert br.snapshot.status == WRITING
            updates = [u async for u in c.watch_snapshot("aio-live", timeout=120)]
            assert updates[-1].status == READY
            assert (await c.get_snapshot("aio-live")).status == READY
            assert [s.tag for s in await c.list_snapshots(status="ready")] == ["aio-live"]

            with pytest.raises(forkd.NotFoundError):
                await c.get_sandbox("sb-doesnotexist")
            with pytest.raises(forkd.InvalidArgumentError):
                await c.spawn_sandboxes(n=1001)
            with pytest.raises(forkd.NotFoundError):
                async for _ in c.watch_snapshot("no-such-snap"):
                    pass

            assert await c.delete_snapshot("aio-live", force=True) == ["aio-live"]
            assert (await c.delete_sandbox(sb.id)).id == sb.id
            assert await c.list_sandboxes() == []

    asyncio.run(asyncio.wait_for(scenario(), timeout=180))


def test_ttl_sync_and_async(daemon_factory) -> None:
    d = daemon_factory(extra_args=["--max-ttl", "600"])
    with forkd.Controller(d.listen, timeout=60) as ctl:
        sb = spawn_one(ctl, ttl_seconds=600)
        assert sb.HasField("expire_time")
        assert 590 < sb.expire_time.ToSeconds() - time.time() <= 601, sb.expire_time
        with pytest.raises(forkd.InvalidArgumentError, match="--max-ttl 600"):
            ctl.set_sandbox_ttl(sb.id, 601)
        cleared = ctl.set_sandbox_ttl(sb.id, 0)
        assert not cleared.HasField("expire_time")
        assert not ctl.get_sandbox(sb.id).HasField("expire_time")
        short = ctl.set_sandbox_ttl(sb.id, 1)
        assert short.HasField("expire_time")
        deadline = time.monotonic() + 60
        while any(s.id == sb.id for s in ctl.list_sandboxes()):
            assert time.monotonic() < deadline, f"{sb.id} never expired"
            time.sleep(0.2)
        with pytest.raises(forkd.NotFoundError):
            ctl.set_sandbox_ttl(sb.id, 5)

    async def scenario() -> None:
        async with forkd.AsyncController(d.listen, timeout=60) as c:
            resp = await c.spawn_sandboxes(n=1, memory_mib=MEM, ttl_seconds=300)
            asb = resp.sandboxes[0]
            assert asb.HasField("expire_time")
            got = await c.set_sandbox_ttl(asb.id, 0)
            assert not got.HasField("expire_time")
            with pytest.raises(forkd.InvalidArgumentError):
                await c.spawn_sandboxes(n=1, memory_mib=MEM, ttl_seconds=601)
            await c.delete_sandbox(asb.id)

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
