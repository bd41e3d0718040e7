"""Linux sandboxes end to end on the SVM test host: Debian's kernel and the
`debian-python` image (built on this machine with `forkd image build`)
booted by forkd-vmm inside the emulated AMD machine, driven from here with
grpcurl and the generated Python client.

Linux guests need VMX or SVM, so these tests run only with `--svm`; on
this KVM-PVM machine `test_linux_host_checks.py` checks the refusal.

One daemon and two sandboxes serve the whole module (a cold boot takes
about a minute in the emulator); the tests that end a sandbox (the panic,
the delete) come last.
"""

from __future__ import annotations

import base64
import contextlib
import concurrent.futures
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from conftest import DEFAULT_ARGS, REPO_ROOT
from forkd_daemon import Daemon, wait_until
from grpcurl_client import GrpcError, decode_exec
from machine import LOCAL, Machine

pytestmark = pytest.mark.svm

IMAGE = "debian-python"
IMAGES_CACHE = Path(os.environ.get("FORKD_IMAGES_DIR", Path.home() / ".cache" / "forkd" / "images"))
EXEC = "forkd.v1.SandboxService/Exec"


def build_image(forkd_bin: Path) -> Path:
    """Builds (or finds up to date) the image on this machine; returns its
    images dir. Building needs root and apt (mmdebstrap)."""
    agent = forkd_bin.parent / "forkd-agent"
    if not agent.is_file():
        pytest.fail(f"{agent} is missing: cargo build --release -p forkd-agent", pytrace=False)
    r = subprocess.run(
        [str(forkd_bin), "image", "build", IMAGE, "--images-dir", str(IMAGES_CACHE), "--agent", str(agent)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode != 0:
        pytest.fail(f"forkd image build failed ({r.returncode}):\n{r.stdout}\n{r.stderr}", pytrace=False)
    return IMAGES_CACHE


INNER_IMAGES = "/tmp/forkd-e2e-images"


def image_in_machine(machine: Machine, forkd_bin: Path) -> str:
    """Builds the image here (if not up to date) and copies it into the
    machine's tmpfs (the VMM reads the initrd at every boot, and 9p reads
    of 100 MiB are slow in the emulator); returns the images dir there."""
    images = build_image(forkd_bin)
    copy = f"mkdir -p {INNER_IMAGES} && rm -rf {INNER_IMAGES}/{IMAGE} && cp -a {images}/{IMAGE} {INNER_IMAGES}/"
    r = machine.run(["sh", "-c", copy], timeout=600)
    assert r.returncode == 0, r.stderr
    return INNER_IMAGES


class Linux:
    """The module's daemon (inside the SVM test host) and its sandboxes."""

    def __init__(self, daemon: Daemon, ids: list[str], token: str):
        self.daemon = daemon
        self.ids = ids
        self.token = token
        self.client = daemon.client

    def exec(self, sid: str, argv: list[str], **fields: Any):
        req: dict[str, Any] = {"sandboxId": sid, "argv": argv, **fields}
        return decode_exec(self.client.stream(EXEC, req))

    def run(self, sid: str, script: str, **fields: Any):
        return self.exec(sid, ["sh", "-c", script], **fields)


@contextlib.contextmanager
def linux_daemon(machine: Machine, forkd_bin: Path, label: str) -> Iterator[Daemon]:
    """A daemon inside the SVM test host that serves the image (copied into
    the machine first), with a call timeout for cold boots; stopped at the
    end, which must leave no VMM behind. Skips on this KVM-PVM machine."""
    if machine is LOCAL:
        pytest.skip("Linux guests need VMX or SVM: these run on the SVM test host (pytest --svm)")
    inner_images = image_in_machine(machine, forkd_bin)
    gp, hp = machine.host.take_daemon_port()
    d = Daemon(
        forkd_bin,
        machine.work_dir(label),
        host="0.0.0.0",
        port=gp,
        client_port=hp,
        token=machine.host.token,
        extra_args=list(DEFAULT_ARGS) + ["--images-dir", inner_images, "--linux-boot-timeout", "1200"],
        machine=machine,
    )
    d.start()
    try:
        d.wait_ready()
        d.client = d.client.with_options(timeout=1500)
        yield d
    finally:
        rc, leftovers = d.stop(timeout=300)
        machine.host.release_daemon_port(gp)
        assert not leftovers, f"VMMs left after the daemon stopped: {leftovers}"


@pytest.fixture(scope="module")
def linux(machine: Machine, forkd_bin: Path) -> Iterator[Linux]:
    with linux_daemon(machine, forkd_bin, "linux-guest") as d:
        t0 = time.monotonic()
        resp = d.client.call("forkd.v1.SandboxService/SpawnSandboxes", {"image": IMAGE, "n": 2, "vcpus": 1})
        assert not resp.get("failures"), resp
        sbs = resp["sandboxes"]
        assert [s["state"] for s in sbs] == ["SANDBOX_STATE_RUNNING"] * 2, sbs
        assert all(s["image"] == IMAGE for s in sbs), sbs
        print(f"2 debian-python sandboxes RUNNING after {time.monotonic() - t0:.0f}s (emulated)")
        d.client = d.client.with_options(timeout=600)
        yield Linux(d, [s["id"] for s in sbs], machine.host.token)


def test_spawn_reports_the_guest_boot(linux: Linux) -> None:
    for sid in linux.ids:
        sb = linux.client.call("forkd.v1.SandboxService/GetSandbox", {"id": sid})["sandbox"]
        assert sb["image"] == IMAGE
        boot = sb.get("guestBoot", {})
        assert float(boot.get("kernelMs", 0)) > 0, sb


def test_python_runs_in_both_sandboxes(linux: Linux) -> None:
    for sid in linux.ids:
        r = linux.exec(sid, ["python3", "-c", "print(6*7)"])
        assert (r.stdout, r.stderr, r.exit_code) == (b"42\n", b"", 0)


def test_stdout_and_stderr_stay_apart(linux: Linux) -> None:
    r = linux.exec(linux.ids[0], ["python3", "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")


def test_exit_code_and_signal(linux: Linux) -> None:
    sid = linux.ids[0]
    r = linux.exec(sid, ["python3", "-c", "import sys; sys.exit(3)"])
    assert r.exit_code == 3
    assert "signal" not in r.messages[-1]["exit"]
    r = linux.run(sid, "kill -9 $$")
    exit_msg = r.messages[-1]["exit"]
    assert exit_msg.get("signal") == 9, exit_msg
    assert r.exit_code == 128 + 9


def test_stdin_env_cwd_and_unicode(linux: Linux) -> None:
    sid = linux.ids[1]
    r = linux.exec(sid, ["cat"], stdin=base64.b64encode(b"hello").decode())
    assert r.stdout == b"hello"
    r = linux.run(sid, 'echo "$GREETING"; pwd', env={"GREETING": "hi there"}, cwd="/tmp")
    assert r.stdout == b"hi there\n/tmp\n"
    word = "héllo wörld ✓ 日本"
    r = linux.exec(sid, ["python3", "-c", "import sys; print(sys.argv[1])", word])
    assert r.stdout.decode() == word + "\n"


def test_hostname_is_the_sandbox_id(linux: Linux) -> None:
    for sid in linux.ids:
        assert linux.exec(sid, ["hostname"]).stdout.decode().strip() == sid


def test_root_filesystem_has_room_for_half_the_ram(linux: Linux) -> None:
    """The root (a tmpfs holding the unpacked image) is sized by the agent
    to the image plus half the RAM, as a default tmpfs: the kernel's own
    early-boot size left a large image almost no room."""
    sid = linux.ids[0]
    r = linux.run(sid, "df -k / | awk 'NR==2 {print $4}'; awk '/MemTotal/ {print $2}' /proc/meminfo")
    avail_k, ram_k = (int(x) for x in r.stdout.split())
    assert avail_k >= ram_k * 4 // 10, (avail_k, ram_k)
    mib = ram_k // 4 // 1024
    r = linux.run(sid, f"dd if=/dev/zero of=/root/big bs=1M count={mib} 2>&1 && stat -c %s /root/big && rm /root/big")
    assert r.exit_code == 0 and r.stdout.split()[-1] == str(mib << 20).encode(), r


def test_output_streams_while_the_command_runs(linux: Linux) -> None:
    """The command prints a line every 200 ms and then waits for a file
    that only a second Exec creates after the first line arrived: if output
    were held back until exit, the first line would never come."""
    sid = linux.ids[0]
    script = (
        "import os, sys, time\n"
        "for i in range(3):\n"
        "    print(f'tick {i}', flush=True); time.sleep(0.2)\n"
        "while not os.path.exists('/tmp/go'): time.sleep(0.05)\n"
        "print('done', flush=True)\n"
    )
    linux.exec(sid, ["rm", "-f", "/tmp/go"])
    with grpc.insecure_channel(f"127.0.0.1:{linux.daemon.client_port}") as channel:
        from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc

        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        md = [("authorization", f"Bearer {linux.token}")]
        stream = stub.Exec(sandbox_pb2.ExecRequest(sandbox_id=sid, argv=["python3", "-c", script]), metadata=md, timeout=600)
        first = next(stream)
        assert first.WhichOneof("event") == "stdout" and first.stdout.startswith(b"tick 0"), first
        go = stub.Exec(sandbox_pb2.ExecRequest(sandbox_id=sid, argv=["touch", "/tmp/go"]), metadata=md, timeout=600)
        assert [m.exit.exit_code for m in go if m.WhichOneof("event") == "exit"] == [0]
        rest = list(stream)
    out = first.stdout + b"".join(m.stdout for m in rest if m.WhichOneof("event") == "stdout")
    assert out == b"tick 0\ntick 1\ntick 2\ndone\n"
    assert rest[-1].WhichOneof("event") == "exit" and rest[-1].exit.exit_code == 0


def test_timeout_kills_the_whole_process_group(linux: Linux) -> None:
    sid = linux.ids[1]
    res = linux.client.run([EXEC], {"sandboxId": sid, "argv": ["sh", "-c", "sleep 1000 & sleep 1000"], "timeoutMs": 2000})
    assert res.code == "DEADLINE_EXCEEDED", res.describe()

    def sleepers() -> list[str]:
        ps = linux.exec(sid, ["ps", "-eo", "pid,pgid,args"]).stdout.decode()
        return [line for line in ps.splitlines() if "sleep 1000" in line]

    assert wait_until(lambda: not sleepers(), timeout=120), sleepers()
    assert linux.exec(sid, ["echo", "still usable"]).stdout == b"still usable\n"


def test_eight_execs_at_once(linux: Linux) -> None:
    sid = linux.ids[0]
    calls = [
        (i, linux.client.start(EXEC, {"sandboxId": sid, "argv": ["sh", "-c", f"sleep 1; echo exec-{i}"]}))
        for i in range(8)
    ]
    try:
        for i, call in calls:
            res = call.wait(timeout=600)
            if not res.ok:
                raise GrpcError(res)
            r = decode_exec(res.messages)
            assert (r.stdout, r.exit_code) == (f"exec-{i}\n".encode(), 0)
    finally:
        for _, call in calls:
            call.kill()


def test_a_cancelled_call_kills_its_command(linux: Linux) -> None:
    """The client goes away mid-command: the daemon cancels the Exec and
    the agent kills its process group."""
    sid = linux.ids[0]

    def running() -> bool:
        ps = linux.exec(sid, ["ps", "-eo", "args"]).stdout.decode()
        return any(line.strip() == "sleep 1001" for line in ps.splitlines())

    call = linux.client.start(EXEC, {"sandboxId": sid, "argv": ["sh", "-c", "exec sleep 1001"]})
    try:
        assert wait_until(running, timeout=120), "the command never started"
    finally:
        call.kill()
    assert wait_until(lambda: not running(), timeout=120), "the command outlived its cancelled call"


def test_command_not_found_is_a_clear_error(linux: Linux) -> None:
    res = linux.client.run([EXEC], {"sandboxId": linux.ids[0], "argv": ["no-such-program"]})
    assert res.code == "FAILED_PRECONDITION", res.describe()
    assert "no-such-program" in res.message and "No such file" in res.message, res.message


def test_console_is_readable(linux: Linux) -> None:
    sid = linux.ids[0]
    linux.run(sid, "echo '<2>forkd-e2e console marker' > /dev/kmsg")
    marker = b"forkd-e2e console marker"

    def console() -> bytes:
        resp = linux.client.call("forkd.v1.SandboxService/ReadConsole", {"sandboxId": sid})
        return base64.b64decode(resp.get("data", ""))

    assert wait_until(lambda: marker in console(), timeout=60), console()[-2000:]


def test_unknown_image_is_not_found(linux: Linux) -> None:
    res = linux.client.expect_error(
        "NOT_FOUND", "forkd.v1.SandboxService/SpawnSandboxes", {"image": "no-such-image", "n": 1}
    )
    assert "no-such-image" in res.message and "forkd image build" in res.message, res.message


def test_memory_below_the_image_minimum_is_invalid_argument(linux: Linux) -> None:
    """Below ~3x its initramfs the kernel cannot unpack the image (it panics
    with "Initramfs unpacking failed"): refused before anything boots."""
    for method, req in [
        ("forkd.v1.SandboxService/SpawnSandboxes", {"image": IMAGE, "n": 1, "memoryMib": 256}),
        ("forkd.v1.SnapshotService/CreateSnapshot", {"tag": "too-small", "image": IMAGE, "memoryMib": 256}),
    ]:
        res = linux.client.expect_error("INVALID_ARGUMENT", method, req)
        assert "memory_mib=256 is too small" in res.message and "memory_mib >= " in res.message, res.message


def test_kernel_panic_fails_the_sandbox_with_the_console_tail(linux: Linux) -> None:
    sid = linux.ids[1]
    # The Exec dies with the guest; its outcome is not what this checks.
    linux.client.run([EXEC], {"sandboxId": sid, "argv": ["sh", "-c", "echo c > /proc/sysrq-trigger"]})

    def state() -> dict:
        return linux.client.call("forkd.v1.SandboxService/GetSandbox", {"id": sid})["sandbox"]

    assert wait_until(lambda: state()["state"] == "SANDBOX_STATE_FAILED", timeout=300), state()
    reason = state()["exitReason"]
    assert "Kernel panic" in reason and "sysrq" in reason.lower(), reason
    # The daemon keeps serving: the other sandbox still runs commands.
    assert linux.exec(linux.ids[0], ["echo", "alive"]).stdout == b"alive\n"


def test_delete_leaves_no_vmm_and_no_files(linux: Linux) -> None:
    d = linux.daemon
    for sid in linux.ids:
        d.client.call("forkd.v1.SandboxService/DeleteSandbox", {"id": sid})
    assert wait_until(lambda: not d.vmm_children(), timeout=120), d.vmm_children()
    left = [p.name for p in (d.data_dir / "sandboxes").iterdir()] if (d.data_dir / "sandboxes").exists() else []
    assert left == [], left
    assert d.client.call("forkd.v1.SandboxService/ListSandboxes", {}).get("sandboxes", []) == []
