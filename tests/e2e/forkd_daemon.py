"""Start and stop a real `forkd` daemon for the end-to-end tests, and watch
its `forkd-vmm` children through /proc.

Only processes this module started (the daemon) or that descend from them
(its VMMs) are ever looked at by pid or signalled; nothing is matched by
name across the machine, since other sessions may run their own forkd.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from grpcurl_client import ExecResult, GrpcError, Grpcurl, decode_exec
from machine import LOCAL, Machine, ProcInfo

MIB = 1 << 20
PAGE = 4096
# Method paths shared by the tests.
SPAWN = "forkd.v1.SandboxService/SpawnSandboxes"
BRANCH = "forkd.v1.SandboxService/BranchSandbox"
CREATE = "forkd.v1.SnapshotService/CreateSnapshot"
GET_SNAP = "forkd.v1.SnapshotService/GetSnapshot"
DELETE_SNAP = "forkd.v1.SnapshotService/DeleteSnapshot"
WATCH_SNAP = "forkd.v1.SnapshotService/WatchSnapshot"
PR_SET_CHILD_SUBREAPER = 36


# ---- /proc helpers (this machine; `Daemon.machine` for the daemon's own) ----


def proc_info(pid: int) -> ProcInfo | None:
    """Parse /proc/<pid>/stat; None when the process does not exist."""
    return LOCAL.proc_info(pid)


def all_procs() -> list[ProcInfo]:
    return LOCAL.procs()


def descendants(pid: int) -> list[ProcInfo]:
    """Every live descendant of `pid` (children, grandchildren, ...)."""
    return LOCAL.descendants(pid)


def is_vmm(info: ProcInfo) -> bool:
    return LOCAL.is_vmm(info)


def still_running(info: ProcInfo) -> bool:
    """Whether that very process (same pid and start time) is still there
    and not a zombie."""
    return LOCAL.still_running(info)


def still_exists(info: ProcInfo) -> bool:
    """Like `still_running`, but a zombie (exited, not yet reaped) counts."""
    return LOCAL.still_exists(info)


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants, so a VMM
    left behind by a daemon we started is re-parented to us (and can be
    found by its parent pid) instead of to init."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def orphaned_vmms() -> list[ProcInfo]:
    """forkd-vmm processes re-parented to this (subreaper) process: VMMs
    whose daemon, one we started, is gone."""
    return LOCAL.orphaned_vmms()


def reap_orphans() -> None:
    """Collect the exit status of orphaned VMMs that ended, so they do not
    stay zombies of this process."""
    LOCAL.reap_orphans()


def kill_leftovers(procs: Iterable[ProcInfo]) -> None:
    """SIGKILL VMMs that outlived their daemon (all descend from a daemon
    this suite started; checked by pid and start time)."""
    LOCAL.kill_leftovers(list(procs))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ---- the daemon ------------------------------------------------------------


class DaemonError(AssertionError):
    pass


class Daemon:
    """One `forkd serve` process started by the suite, on this machine or
    (`machine`) inside the SVM test host. `workdir`, `data_dir` and
    `log_path` are paths on that machine; `client_port` is the loopback
    port here that reaches `port` there (the same port locally)."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        listen_unix: Path | None = None,
        token: str | None = None,
        token_via: str = "file",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        data_dir: Path | None = None,
        machine: Machine = LOCAL,
        client_port: int | None = None,
    ):
        self.machine = machine
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.client_port = client_port if client_port is not None else self.port
        self.listen = f"{host}:{self.port}"
        self.data_dir = data_dir or (workdir / "data")
        self.listen_unix = listen_unix
        self.token = token
        self.token_via = token_via
        self.extra_args = list(extra_args)
        self.log_path = workdir / "forkd.log"
        # subprocess.Popen here, machine.RemoteProcess in the SVM test host.
        self.proc: Any = None
        self.returncode: int | None = None
        # Teardown fails the test unless SIGTERM ends the daemon with 0.
        self.expect_clean_exit = True
        # Every VMM process seen for this daemon, by pid (with start time).
        self.vmms: dict[int, ProcInfo] = {}
        # Another machine gets only what the suite sets, not this one's
        # environment.
        base_env = {k: v for k, v in os.environ.items() if k != "FORKD_TOKEN"} if machine is LOCAL else {}
        base_env.setdefault("RUST_BACKTRACE", "1")
        base_env.setdefault("NO_COLOR", "1")  # plain log lines in reports
        if env:
            base_env.update(env)
        self.env = base_env
        # Clients: always through loopback, even for a 0.0.0.0 listener.
        self.client = Grpcurl(f"127.0.0.1:{self.client_port}", token=token)
        if machine.slowness > 1:
            self.client = self.client.with_options(timeout=self.client.timeout * machine.slowness)
        self.anon = self.client.with_options(token=None)

    # ---- lifecycle --------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [str(self.binary), "serve", "--listen", self.listen, "--data-dir", str(self.data_dir)]
        if self.listen_unix is not None:
            argv += ["--listen-unix", str(self.listen_unix)]
        if self.token is not None:
            if self.token_via == "file":
                tf = self.workdir / "token"
                tf.write_text(self.token + "\n")
                tf.chmod(0o600)
                argv += ["--token-file", str(tf)]
            elif self.token_via == "env":
                self.env["FORKD_TOKEN"] = self.token
            else:
                raise ValueError(self.token_via)
        return argv + self.extra_args

    def start(self) -> "Daemon":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = self.machine.spawn(self.argv(), self.log_path, self.env, self.workdir)
        return self

    def wait_ready(self, timeout: float = 30.0) -> "Daemon":
        """Wait until grpc.health.v1 answers SERVING."""
        timeout *= self.machine.slowness
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            rc = self.proc.poll() if self.proc else None
            if rc is not None:
                self.returncode = rc
                raise DaemonError(f"forkd exited with {rc} before it served:\n{self.log_tail()}")
            try:
                status = self.anon.health(timeout=15)
                if status == "SERVING":
                    return self
                last = f"health status {status}"
            except GrpcError as e:
                last = f"{e.code}: {e.message}"
            time.sleep(0.1)
        raise DaemonError(f"forkd did not report SERVING in {timeout}s ({last}):\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def vmm_children(self) -> list[ProcInfo]:
        """Live forkd-vmm descendants of the daemon; remembers them."""
        if not self.running():
            return []
        m = self.machine
        found = [p for p in m.descendants(self.pid) if m.is_vmm(p) and p.state not in ("Z", "X")]
        for p in found:
            self.vmms.setdefault(p.pid, p)
        return found

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout: float = 60.0) -> tuple[int | None, list[ProcInfo]]:
        """SIGTERM the daemon, wait for it, and return (exit code or None if
        it had to be killed, VMMs of this daemon still running afterwards).
        Leftover VMMs are killed after being reported."""
        if self.proc is None:
            return None, []
        self.vmm_children()  # remember the VMMs before they are re-parented
        rc = self.proc.poll()
        if rc is None:
            self.signal(signal.SIGTERM)
            rc = self.wait(timeout)
            if rc is None:
                self.proc.kill()
                self.proc.wait()
        self.returncode = rc
        leftovers = self.leftover_vmms()
        self.machine.kill_leftovers(leftovers)
        return rc, leftovers

    def leftover_vmms(self, grace: float = 2.0) -> list[ProcInfo]:
        """VMMs of this daemon still running now that it has exited. A VMM
        gets `grace` seconds to finish dying after its daemon's exit."""
        assert not self.running()

        m = self.machine

        def current() -> list[ProcInfo]:
            seen = {p.pid: p for p in self.vmms.values() if m.still_running(p)}
            for p in m.orphaned_vmms():
                if p.state not in ("Z", "X"):
                    seen.setdefault(p.pid, p)
            return list(seen.values())

        wait_until(lambda: not current(), grace * m.slowness)
        m.reap_orphans()
        return current()

    # ---- logs ---------------------------------------------------------------

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
            parts.append(f"--- {self.log_path} (last {lines} lines) ---")
            parts += text[-lines:]
        except FileNotFoundError:
            parts.append(f"--- {self.log_path}: missing ---")
        snaps = self.data_dir / "snapshots"
        if snaps.is_dir():
            listing = []
            for d in sorted(snaps.iterdir())[:20]:
                if d.is_dir():
                    files = ", ".join(
                        f"{f.name}={f.stat().st_size}" for f in sorted(d.iterdir()) if f.is_file()
                    )
                    listing.append(f"  {d.name}/: {files}")
                else:
                    listing.append(f"  {d.name}")
            parts.append(f"--- {snaps} ---")
            parts += listing or ["  (empty)"]
        sb = self.data_dir / "sandboxes"
        if sb.is_dir():
            for log in sorted(sb.glob("*/vmm.log"))[:8]:
                text = log.read_text(errors="replace").splitlines()
                parts.append(f"--- {log} (last 15 lines) ---")
                parts += text[-15:]
        return "\n".join(parts)

    # ---- API shortcuts (through the authenticated client) ------------------

    def record_sandboxes(self, sandboxes: Iterable[Mapping[str, Any]]) -> None:
        """Remember the VMM pids the API reports, with their start times."""
        for sb in sandboxes:
            pid = int(sb.get("vmmPid", 0))
            if pid and pid not in self.vmms:
                info = self.machine.proc_info(pid)
                if info is not None and self.machine.is_vmm(info):
                    self.vmms[pid] = info

    def spawn(self, n: int = 1, labels: Mapping[str, str] | None = None, **fields: Any) -> list[dict]:
        req: dict[str, Any] = {"n": n, **fields}
        if labels:
            req["labels"] = dict(labels)
        resp = self.client.call("forkd.v1.SandboxService/SpawnSandboxes", req, timeout=300)
        sandboxes = resp.get("sandboxes", [])
        self.record_sandboxes(sandboxes)
        failures = resp.get("failures", [])
        assert not failures, f"SpawnSandboxes reported failures: {failures}\n{self.log_tail()}"
        assert len(sandboxes) == n, f"asked for {n} sandboxes, got {len(sandboxes)}: {resp}"
        return sandboxes

    def get(self, sandbox_id: str) -> dict:
        resp = self.client.call("forkd.v1.SandboxService/GetSandbox", {"id": sandbox_id})
        assert "sandbox" in resp, resp
        self.record_sandboxes([resp["sandbox"]])
        return resp["sandbox"]

    def list(self, selector: Mapping[str, str] | None = None) -> list[dict]:
        req = {"labelSelector": dict(selector)} if selector else {}
        resp = self.client.call("forkd.v1.SandboxService/ListSandboxes", req)
        return resp.get("sandboxes", [])

    def delete(self, sandbox_id: str) -> dict:
        resp = self.client.call("forkd.v1.SandboxService/DeleteSandbox", {"id": sandbox_id})
        return resp.get("sandbox", {})

    def exec(self, sandbox_id: str, argv: Sequence[str], timeout_ms: int = 0) -> ExecResult:
        return self.client.exec(sandbox_id, argv, timeout_ms)

    def exec_ok(self, sandbox_id: str, argv: Sequence[str]) -> bytes:
        """Runs a command that must exit 0; returns its stdout."""
        r = self.exec(sandbox_id, argv)
        assert r.exit_code == 0, f"{argv} in {sandbox_id} exited {r.exit_code}: {r.stdout!r} {r.stderr!r}"
        return r.stdout

    def exec_many(
        self, sandbox_ids: Sequence[str], argv: Sequence[str], parallel: int = 4
    ) -> dict[str, ExecResult]:
        """Runs the same command in many sandboxes, `parallel` grpcurl calls
        at a time; every call must end with an exit message."""
        results: dict[str, ExecResult] = {}
        todo = list(sandbox_ids)
        while todo:
            batch, todo = todo[:parallel], todo[parallel:]
            calls = [
                (sid, self.client.start("forkd.v1.SandboxService/Exec", {"sandboxId": sid, "argv": list(argv)}))
                for sid in batch
            ]
            try:
                for sid, call in calls:
                    res = call.wait(timeout=120)
                    if not res.ok:
                        raise GrpcError(res)
                    results[sid] = decode_exec(res.messages)
            finally:
                for _, call in calls:
                    call.kill()
        return results

    # ---- snapshots ----------------------------------------------------------

    def snapshot_dir(self, tag: str) -> Path:
        return self.data_dir / "snapshots" / tag

    def create_snapshot(
        self,
        tag: str = "",
        *,
        memory_mib: int = 0,
        vcpus: int = 0,
        warmup: Sequence[Sequence[str]] = (),
        keep_running: bool = False,
    ) -> dict:
        """CreateSnapshot; returns the whole response (`snapshot`, and
        `sandboxId` with keep_running)."""
        req: dict[str, Any] = {"warmup": [{"argv": list(a)} for a in warmup]}
        if tag:
            req["tag"] = tag
        if memory_mib:
            req["memoryMib"] = memory_mib
        if vcpus:
            req["vcpus"] = vcpus
        if keep_running:
            req["keepRunning"] = True
        resp = self.client.call("forkd.v1.SnapshotService/CreateSnapshot", req, timeout=600)
        assert "snapshot" in resp, resp
        if resp.get("sandboxId"):
            self.get(resp["sandboxId"])  # remember its VMM
        return resp

    def branch(
        self, sandbox_id: str, tag: str = "", mode: str | None = "BRANCH_MODE_FULL", **fields: Any
    ) -> dict:
        """BranchSandbox; `mode` is a BranchMode name (None leaves it unset).
        Returns the whole response."""
        req: dict[str, Any] = {"sandboxId": sandbox_id, **fields}
        if tag:
            req["tag"] = tag
        if mode is not None:
            req["mode"] = mode
        resp = self.client.call("forkd.v1.SandboxService/BranchSandbox", req, timeout=600)
        assert "snapshot" in resp, resp
        return resp

    def get_snapshot(self, tag: str) -> dict:
        resp = self.client.call("forkd.v1.SnapshotService/GetSnapshot", {"tag": tag})
        assert "snapshot" in resp, resp
        return resp["snapshot"]

    def list_snapshots(self, status: str | None = None) -> list[dict]:
        req = {"status": status} if status else {}
        return self.client.call("forkd.v1.SnapshotService/ListSnapshots", req).get("snapshots", [])

    def delete_snapshot(self, tag: str, *, cascade: bool = False, force: bool = False) -> list[str]:
        req: dict[str, Any] = {"tag": tag}
        if cascade:
            req["cascade"] = True
        if force:
            req["force"] = True
        resp = self.client.call("forkd.v1.SnapshotService/DeleteSnapshot", req, timeout=120)
        return resp.get("deletedTags", [])

    def kill9(self) -> int | None:
        """SIGKILLs the daemon (its VMMs are left to notice by themselves)
        and waits for it; teardown then no longer expects exit code 0."""
        self.vmm_children()
        self.expect_clean_exit = False
        self.signal(signal.SIGKILL)
        return self.wait(30)

    # ---- live branches (additions for test_live_branch.py) -------------------

    def start_watch(self, tag: str):
        """Starts WatchSnapshot(tag) in the background; the returned
        `BackgroundCall.wait()` gives every message once the stream ended."""
        return self.client.start("forkd.v1.SnapshotService/WatchSnapshot", {"tag": tag})

    def snapshot_status(self, tag: str) -> str | None:
        """The snapshot's status name, or None when GetSnapshot says
        NOT_FOUND."""
        res = self.client.run(["forkd.v1.SnapshotService/GetSnapshot"], {"tag": tag})
        if res.code == "NOT_FOUND":
            return None
        if not res.ok:
            raise GrpcError(res)
        return res.messages[0]["snapshot"]["status"]

    def wait_snapshot_status(
        self,
        tag: str,
        statuses: Iterable[str],
        timeout: float,
        interval: float = 0.05,
        missing_ok: bool = False,
    ) -> dict:
        """Polls GetSnapshot until the snapshot's status is one of
        `statuses`; returns the snapshot. With `missing_ok`, NOT_FOUND
        (not created yet) just means poll again. Fails after `timeout`
        seconds, showing every status seen."""
        want = set(statuses)
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            res = self.client.run(["forkd.v1.SnapshotService/GetSnapshot"], {"tag": tag})
            if res.ok:
                snap = res.messages[0]["snapshot"]
                status = snap["status"]
            elif res.code == "NOT_FOUND" and missing_ok:
                snap, status = None, "NOT_FOUND"
            else:
                raise GrpcError(res)
            if not seen or seen[-1] != status:
                seen.append(status)
            if snap is not None and status in want:
                return snap
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"snapshot {tag} did not reach {sorted(want)} in {timeout}s "
                    f"(statuses seen: {seen})\n{self.log_tail()}"
                )
            time.sleep(interval)

    def kill_vmm(self, pid: int) -> None:
        """SIGKILLs one of this daemon's forkd-vmm children (checked to be
        a live VMM descending from the daemon, by pid and start time)."""
        mine = {p.pid: p for p in self.vmm_children()}
        assert pid in mine, f"pid {pid} is not a running forkd-vmm of daemon {self.pid}: {mine}"
        info = self.machine.proc_info(pid)
        assert info is not None and info.starttime == mine[pid].starttime, (info, mine[pid])
        self.machine.kill(pid, signal.SIGKILL)
