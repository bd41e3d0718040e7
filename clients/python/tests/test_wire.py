"""The wire compatibility rules, checked on the bytes the client sends.

A stand-in gRPC server on loopback records each request's raw bytes, and
the test decodes their field tags: what is on the wire, not what the
message object says. (tests/e2e/test_client_python.py checks the same
rules against the real daemon.)

- mode=live sends field 3 (mode) = 3;
- wait=False puts field 4 on the wire (value 0); wait=True leaves it off;
- mode wins over the legacy diff flag: only field 3 is sent;
- the legacy diff flag alone sends field 5;
- live_fork=True sends SpawnSandboxesRequest field 3; False leaves it off;
- image (SpawnSandboxesRequest field 8, CreateSnapshotRequest field 6), and
  Exec's env (4), cwd (5) and stdin (6), are sent only when given, so calls
  without them send what older clients sent;
- ExecExit.signal comes back as ExecResult.signal; ReadConsole sends
  sandbox_id and tail_bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import asyncio

import grpc
import pytest

import forkd
from forkd import wire
from forkd.v1 import sandbox_pb2, snapshot_pb2


def fields(data: bytes) -> dict[int, int | bytes]:
    """Decodes a message's top-level fields: number -> varint or bytes."""
    out: dict[int, int | bytes] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            out[number] = varint()
        elif wire_type == 2:
            n = varint()
            out[number] = data[i : i + n]
            i += n
        else:
            raise AssertionError(f"unexpected wire type {wire_type} for field {number}")
    return out


class Capture:
    """A gRPC server that records raw request bytes and answers with empty
    (default) responses; Exec answers ``exec_reply`` (stdout "out", stderr
    "err", then an exit killed by SIGKILL) and ReadConsole ``console``."""

    exec_reply = (
        sandbox_pb2.ExecResponse(stdout=b"out"),
        sandbox_pb2.ExecResponse(stderr=b"err"),
        sandbox_pb2.ExecResponse(exit=sandbox_pb2.ExecExit(exit_code=137, duration_us=5, signal=9)),
    )
    console = sandbox_pb2.ReadConsoleResponse(data=b"[    0.000000] Linux version\n", truncated=True)

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handlers = {}
        for name in ("SpawnSandboxes", "BranchSandbox", "SetSandboxTtl"):
            handlers[name] = grpc.unary_unary_rpc_method_handler(self._handler(name))
        handlers["ReadConsole"] = grpc.unary_unary_rpc_method_handler(
            self._handler("ReadConsole", self.console.SerializeToString())
        )
        handlers["Exec"] = grpc.unary_stream_rpc_method_handler(self._exec)
        snapshot_handlers = {
            "CreateSnapshot": grpc.unary_unary_rpc_method_handler(self._handler("CreateSnapshot")),
        }
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("forkd.v1.SandboxService", handlers),
                grpc.method_handlers_generic_handler("forkd.v1.SnapshotService", snapshot_handlers),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _handler(self, name: str, reply: bytes = b""):  # type: ignore[no-untyped-def]
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.requests.append((name, request))
            return reply

        return handle

    def _exec(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.requests.append(("Exec", request))
        for msg in self.exec_reply:
            yield msg.SerializeToString()

    def raw(self, name: str) -> bytes:
        got = [raw for method, raw in self.requests if method == name]
        assert got, f"no {name} request was sent"
        return got[-1]

    def last(self, name: str) -> dict[int, int | bytes]:
        got = [raw for method, raw in self.requests if method == name]
        assert got, f"no {name} request was sent"
        return fields(got[-1])


@pytest.fixture
def capture() -> Iterator[tuple[Capture, forkd.Controller]]:
    cap = Capture()
    cap.server.start()
    ctl = forkd.Controller(f"127.0.0.1:{cap.port}", timeout=10)
    try:
        yield cap, ctl
    finally:
        ctl.close()
        cap.server.stop(None)


MODE, WAIT, DIFF, MEASURE = 3, 4, 5, 6
LIVE_FORK = 3
IMAGE = 8  # SpawnSandboxesRequest
SNAPSHOT_IMAGE, KEEP_RUNNING = 6, 5  # CreateSnapshotRequest
ARGV, TIMEOUT_MS, ENV, CWD, STDIN = 2, 3, 4, 5, 6  # ExecRequest


def test_mode_live_is_field_3(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.branch_sandbox("sb-1", mode="live")
    f = cap.last("BranchSandbox")
    assert f[1] == b"sb-1"
    assert f[MODE] == snapshot_pb2.BRANCH_MODE_LIVE == 3


def test_wait_false_is_present_wait_true_is_omitted(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.branch_sandbox("sb-1", mode="live", wait=False)
    f = cap.last("BranchSandbox")
    assert WAIT in f and f[WAIT] == 0

    ctl.branch_sandbox("sb-1", mode="live", wait=True)
    assert WAIT not in cap.last("BranchSandbox")
    ctl.branch_sandbox("sb-1", mode="live")
    assert WAIT not in cap.last("BranchSandbox")


def test_mode_wins_over_legacy_diff(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.branch_sandbox("sb-1", "t", True, False, "live")  # positional: tag, diff, measure_diff, mode
    f = cap.last("BranchSandbox")
    assert f[MODE] == 3 and DIFF not in f
    assert f[2] == b"t"

    ctl.branch_sandbox("sb-1", diff=True, mode="full")
    f = cap.last("BranchSandbox")
    assert f[MODE] == snapshot_pb2.BRANCH_MODE_FULL and DIFF not in f


def test_legacy_diff_alone_is_sent(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.branch_sandbox("sb-1", diff=True, measure_diff=True)
    f = cap.last("BranchSandbox")
    assert f[DIFF] == 1 and f[MEASURE] == 1 and MODE not in f

    ctl.branch_sandbox("sb-1")
    assert cap.last("BranchSandbox") == {1: b"sb-1"}, "defaults put nothing else on the wire"


def test_live_fork_only_when_true(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.spawn_sandboxes("snap", 3, live_fork=True)
    f = cap.last("SpawnSandboxes")
    assert f[LIVE_FORK] == 1 and f[1] == b"snap" and f[2] == 3

    ctl.spawn_sandboxes(live_fork=False)
    f = cap.last("SpawnSandboxes")
    assert LIVE_FORK not in f and f == {2: 1}


def test_token_travels_as_bearer_metadata() -> None:
    seen: list[tuple[tuple[str, str | bytes], ...]] = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(tuple(context.invocation_metadata()))  # type: ignore[arg-type]
        return b""

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "forkd.v1.SandboxService", {"ListSandboxes": grpc.unary_unary_rpc_method_handler(handle)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with forkd.Controller(f"127.0.0.1:{port}", "s3cret", timeout=10) as ctl:
            ctl.list_sandboxes()
    finally:
        server.stop(None)
    assert ("authorization", "Bearer s3cret") in seen[0]


def test_builders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of 'full', 'diff', 'live'"):
        wire.branch_request("sb-1", None, False, False, "fast", True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of strings"):
        wire.exec_request("sb-1", "echo hi", None)
    with pytest.raises(ValueError, match="timeout"):
        wire.exec_request("sb-1", ["sleep", "1"], 0)
    assert wire.exec_request("sb-1", ["sleep", "1"], 1.5).timeout_ms == 1500
    with pytest.raises(ValueError, match="status must be one of"):
        wire.list_snapshots_request("done")  # type: ignore[arg-type]


def test_exec_event_from_each_oneof_case() -> None:
    out = forkd.ExecEvent.from_message(sandbox_pb2.ExecResponse(stdout=b"a"))
    err = forkd.ExecEvent.from_message(sandbox_pb2.ExecResponse(stderr=b"b"))
    ex = forkd.ExecEvent.from_message(
        sandbox_pb2.ExecResponse(exit=sandbox_pb2.ExecExit(exit_code=3, duration_us=9))
    )
    assert (out.kind, out.data) == ("stdout", b"a")
    assert (err.kind, err.data) == ("stderr", b"b")
    assert (ex.kind, ex.exit_code, ex.duration_us) == ("exit", 3, 9)


def test_image_only_when_given(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.spawn_sandboxes(image="debian-12", memory_mib=512)
    f = cap.last("SpawnSandboxes")
    assert f[IMAGE] == b"debian-12" and f[4] == 512 and 1 not in f
    assert sandbox_pb2.SpawnSandboxesRequest.FromString(cap.raw("SpawnSandboxes")).image == "debian-12"

    ctl.spawn_sandboxes()
    assert IMAGE not in cap.last("SpawnSandboxes")
    ctl.spawn_sandboxes(image="")
    assert IMAGE not in cap.last("SpawnSandboxes"), "an empty image is the reference guest"


def test_create_snapshot_image_only_when_given(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.create_snapshot("deb", image="debian-12", warmup=[["apt-get", "update"]], keep_running=True)
    f = cap.last("CreateSnapshot")
    assert f[SNAPSHOT_IMAGE] == b"debian-12" and f[1] == b"deb" and f[KEEP_RUNNING] == 1
    assert 2 not in f, "memory_mib None (the image's default) is not on the wire"
    req = snapshot_pb2.CreateSnapshotRequest.FromString(cap.raw("CreateSnapshot"))
    assert req.image == "debian-12" and [list(w.argv) for w in req.warmup] == [["apt-get", "update"]]

    ctl.create_snapshot("ref", memory_mib=256)
    f = cap.last("CreateSnapshot")
    assert SNAPSHOT_IMAGE not in f and f == {1: b"ref", 2: 256}, "the reference guest's request, as before"
    ctl.create_snapshot(image="")
    assert cap.last("CreateSnapshot") == {}, "an empty image is the reference guest"


def test_exec_env_cwd_stdin_land_in_the_request(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    env = {"GREETING": "hi", "LANG": "C.UTF-8"}
    ctl.exec("sb-1", ["sh", "-c", "cat; echo $GREETING"], 2, env=env, cwd="/tmp", stdin=b"\x00raw")
    req = sandbox_pb2.ExecRequest.FromString(cap.raw("Exec"))
    assert list(req.argv) == ["sh", "-c", "cat; echo $GREETING"] and req.timeout_ms == 2000
    assert dict(req.env) == env
    assert (req.cwd, req.stdin) == ("/tmp", b"\x00raw")
    f = cap.last("Exec")
    assert f[CWD] == b"/tmp" and f[STDIN] == b"\x00raw" and ENV in f

    # A str stdin is sent as UTF-8.
    ctl.exec("sb-1", ["cat"], stdin="héllo")
    assert sandbox_pb2.ExecRequest.FromString(cap.raw("Exec")).stdin == "héllo".encode()

    # Without them, nothing new is on the wire: the reference guest's request.
    ctl.exec("sb-1", ["echo", "hi"])
    assert set(cap.last("Exec")) == {1, ARGV}


def test_exec_result_and_events_carry_the_signal(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    res = ctl.exec("sb-1", ["sleep", "100"])
    assert (res.stdout, res.stderr, res.exit_code, res.duration_us, res.signal) == (b"out", b"err", 137, 5, 9)
    assert not res.ok
    events = list(ctl.exec_stream("sb-1", ["sleep", "100"], env={"A": "1"}))
    assert [e.kind for e in events] == ["stdout", "stderr", "exit"]
    assert (events[-1].exit_code, events[-1].signal) == (137, 9)
    assert dict(sandbox_pb2.ExecRequest.FromString(cap.raw("Exec")).env) == {"A": "1"}


def test_read_console(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    got = ctl.read_console("sb-1", tail_bytes=4096)
    assert isinstance(got, forkd.ReadConsoleResponse)
    assert (got.data, got.truncated) == (Capture.console.data, True)
    assert cap.last("ReadConsole") == {1: b"sb-1", 2: 4096}
    ctl.read_console("sb-1")
    assert cap.last("ReadConsole") == {1: b"sb-1"}, "tail_bytes 0 (the server's default) is not on the wire"


def test_ttl_seconds_on_spawn_and_set_sandbox_ttl(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, ctl = capture
    ctl.spawn_sandboxes(n=2, ttl_seconds=30)
    assert cap.last("SpawnSandboxes")[9] == 30, "ttl_seconds is field 9"
    ctl.spawn_sandboxes(n=1)
    assert 9 not in cap.last("SpawnSandboxes"), "no ttl (the daemon's default) is not on the wire"
    got = ctl.set_sandbox_ttl("sb-1", 120)
    assert isinstance(got, forkd.Sandbox)
    assert cap.last("SetSandboxTtl") == {1: b"sb-1", 2: 120}
    ctl.set_sandbox_ttl("sb-1", 0)
    assert cap.last("SetSandboxTtl") == {1: b"sb-1"}, "0 clears the expiry"
    for bad in (-1, 1.5, True, 2**64):
        with pytest.raises(ValueError, match="ttl_seconds"):
            ctl.set_sandbox_ttl("sb-1", bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ttl_seconds"):
            ctl.spawn_sandboxes(ttl_seconds=bad)  # type: ignore[arg-type]

    async def main() -> None:
        async with forkd.AsyncController(f"127.0.0.1:{cap.port}", timeout=10) as actl:
            await actl.spawn_sandboxes(ttl_seconds=7)
            await actl.set_sandbox_ttl("sb-2", 9)

    asyncio.run(main())
    assert cap.last("SpawnSandboxes")[9] == 7
    assert cap.last("SetSandboxTtl") == {1: b"sb-2", 2: 9}


def test_async_controller_sends_the_same(capture: tuple[Capture, forkd.Controller]) -> None:
    cap, _ = capture

    async def main() -> tuple[forkd.ExecResult, forkd.ReadConsoleResponse]:
        async with forkd.AsyncController(f"127.0.0.1:{cap.port}", timeout=10) as actl:
            await actl.spawn_sandboxes(image="alpine")
            await actl.create_snapshot("alp", image="alpine", memory_mib=128)
            res = await actl.exec("sb-2", ["cat"], env={"K": "v"}, cwd="/root", stdin="in")
            console = await actl.read_console("sb-2", 100)
            return res, console

    res, console = asyncio.run(main())
    assert cap.last("SpawnSandboxes")[IMAGE] == b"alpine"
    assert cap.last("CreateSnapshot") == {1: b"alp", 2: 128, SNAPSHOT_IMAGE: b"alpine"}
    req = sandbox_pb2.ExecRequest.FromString(cap.raw("Exec"))
    assert (dict(req.env), req.cwd, req.stdin) == ({"K": "v"}, "/root", b"in")
    assert (res.exit_code, res.signal) == (137, 9)
    assert console.truncated and cap.last("ReadConsole") == {1: b"sb-2", 2: 100}


def test_linux_arguments_are_checked_before_sending() -> None:
    with pytest.raises(TypeError, match="env must map strings to strings"):
        wire.exec_request("sb-1", ["env"], None, env={"N": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="env must be a mapping"):
        wire.exec_request("sb-1", ["env"], None, env="A=1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stdin must be bytes or str"):
        wire.exec_request("sb-1", ["cat"], None, stdin=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cwd must be a string"):
        wire.exec_request("sb-1", ["pwd"], None, cwd=b"/")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="image must be a string"):
        wire.spawn_request(None, 1, live_fork=False, memory_mib=None, labels=None, image=b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="image must be a string"):
        wire.create_snapshot_request(None, None, None, (), False, image=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tail_bytes"):
        wire.read_console_request("sb-1", -1)
    assert wire.exec_request("sb-1", ["cat"], None, stdin=bytearray(b"ab")).stdin == b"ab"


def test_signal_defaults_keep_old_results_valid() -> None:
    # ExecResult built the old way (no signal) and an exit without one.
    assert forkd.ExecResult(b"x", b"", 0, 1).signal == 0
    ex = forkd.ExecEvent.from_message(sandbox_pb2.ExecResponse(exit=sandbox_pb2.ExecExit(exit_code=0)))
    assert ex.signal == 0
