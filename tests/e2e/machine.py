"""Where a test's daemon runs: this machine, or the SVM test host.

The end-to-end tests look at the daemon's processes (/proc) and files (its
data dir) as well as its API. `LocalMachine` does that here; `SvmMachine`
does it inside the SVM test host (tests/svm) through its test agent, with
`RemotePath` standing in for `pathlib.Path`. A `Daemon` holds the machine
it runs on, so a test written against `d.machine` and `d.data_dir` runs on
either.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

VMM_NAME = "forkd-vmm"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    pid: int
    comm: str
    state: str
    ppid: int
    starttime: int
    # Basename of /proc/PID/exe where the machine reported it ("" locally,
    # where it is read on demand).
    exe: str = ""


def parse_stat(pid: int, raw: str, exe: str = "") -> ProcInfo:
    # comm is in parentheses and may hold spaces or parentheses itself.
    lpar, rpar = raw.index("("), raw.rindex(")")
    rest = raw[rpar + 2 :].split()
    # rest[0] is field 3 (state); starttime is field 22.
    return ProcInfo(pid, raw[lpar + 1 : rpar], rest[0], int(rest[1]), int(rest[19]), exe)


class Machine:
    """Processes and files of the machine a daemon runs on."""

    name = "machine"
    # How much slower than this machine it runs; timeouts are scaled by it.
    slowness = 1.0

    # ---- processes (subclasses give procs, proc_info, kill, reap) ---------

    def procs(self) -> list[ProcInfo]:
        raise NotImplementedError

    def proc_info(self, pid: int) -> ProcInfo | None:
        raise NotImplementedError

    def kill(self, pid: int, sig: int) -> None:
        raise NotImplementedError

    def reap(self, pid: int) -> None:
        raise NotImplementedError

    def subreaper_pid(self) -> int:
        """The process orphaned VMMs are re-parented to."""
        raise NotImplementedError

    def is_vmm(self, info: ProcInfo) -> bool:
        return info.comm.startswith(VMM_NAME) or info.exe.startswith(VMM_NAME)

    def descendants(self, pid: int) -> list[ProcInfo]:
        """Every live descendant of `pid` (children, grandchildren, ...)."""
        by_parent: dict[int, list[ProcInfo]] = {}
        for p in self.procs():
            by_parent.setdefault(p.ppid, []).append(p)
        out: list[ProcInfo] = []
        todo = [pid]
        while todo:
            for child in by_parent.get(todo.pop(), []):
                out.append(child)
                todo.append(child.pid)
        return out

    def still_running(self, info: ProcInfo) -> bool:
        """Whether that very process (same pid and start time) is still there
        and not a zombie."""
        now = self.proc_info(info.pid)
        return now is not None and now.starttime == info.starttime and now.state not in ("Z", "X")

    def still_exists(self, info: ProcInfo) -> bool:
        """Like `still_running`, but a zombie (exited, not yet reaped) counts."""
        now = self.proc_info(info.pid)
        return now is not None and now.starttime == info.starttime

    def orphaned_vmms(self) -> list[ProcInfo]:
        """forkd-vmm processes re-parented to the subreaper: VMMs whose
        daemon, one the suite started, is gone."""
        me = self.subreaper_pid()
        return [p for p in self.procs() if p.ppid == me and self.is_vmm(p)]

    def reap_orphans(self) -> None:
        for p in self.orphaned_vmms():
            self.reap(p.pid)

    def kill_leftovers(self, procs: Sequence[ProcInfo]) -> None:
        """SIGKILL VMMs that outlived their daemon (checked by pid and start
        time)."""
        for p in procs:
            if self.still_running(p):
                try:
                    self.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5 * self.slowness
        while time.monotonic() < deadline and any(self.still_running(p) for p in procs):
            time.sleep(0.05)
        self.reap_orphans()

    # ---- files and process start --------------------------------------------

    def path(self, p: str | os.PathLike) -> Any:
        raise NotImplementedError

    def run(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Runs a command to completion; stdout and stderr as bytes."""
        raise NotImplementedError

    def spawn(self, argv: Sequence[str], log: Any, env: dict[str, str], cwd: Any) -> Any:
        """Starts a background process with stdout+stderr appended to `log`;
        returns a handle with pid, poll(), wait(timeout), send_signal(sig),
        kill()."""
        raise NotImplementedError


class LocalMachine(Machine):
    name = "local"

    def procs(self) -> list[ProcInfo]:
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                info = self.proc_info(int(name))
                if info is not None:
                    out.append(info)
        return out

    def proc_info(self, pid: int) -> ProcInfo | None:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        return parse_stat(pid, raw)

    def is_vmm(self, info: ProcInfo) -> bool:
        if super().is_vmm(info):
            return True
        try:
            exe = os.readlink(f"/proc/{info.pid}/exe")
        except OSError:
            return False
        return os.path.basename(exe).startswith(VMM_NAME)

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def reap(self, pid: int) -> None:
        """Collects an orphaned VMM's exit status; only forkd-vmm pids are
        waited for, never the subprocesses Python itself manages."""
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def subreaper_pid(self) -> int:
        return os.getpid()

    def path(self, p: str | os.PathLike) -> Path:
        return Path(p)

    def run(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def spawn(self, argv: Sequence[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd
            )


LOCAL = LocalMachine()


# ---- the SVM test host ---------------------------------------------------------


def _svm_host_module() -> Any:
    svm_dir = str(REPO_ROOT / "tests" / "svm")
    if svm_dir not in sys.path:
        sys.path.insert(0, svm_dir)
    import svm_host

    return svm_host


@dataclasses.dataclass
class RemoteStat:
    st_size: int
    st_blocks: int
    st_mode: int


class RemotePath:
    """The part of `pathlib.Path` the tests use, for a path inside the SVM
    test host."""

    def __init__(self, machine: "SvmMachine", path: str):
        self.machine = machine
        self._path = posixpath.normpath(path)

    def __str__(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"RemotePath({self._path!r})"

    def __fspath__(self) -> str:
        return self._path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other._path == self._path

    def __hash__(self) -> int:
        return hash(self._path)

    def __lt__(self, other: "RemotePath") -> bool:
        return self._path < other._path

    def __truediv__(self, other: str | os.PathLike) -> "RemotePath":
        return RemotePath(self.machine, posixpath.join(self._path, os.fspath(other)))

    @property
    def name(self) -> str:
        return posixpath.basename(self._path)

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.machine, posixpath.dirname(self._path))

    def _stat(self) -> dict | None:
        return self.machine.agent.call("stat", path=self._path)

    def exists(self) -> bool:
        return self._stat() is not None

    def is_dir(self) -> bool:
        st = self._stat()
        return bool(st and st["is_dir"])

    def is_file(self) -> bool:
        st = self._stat()
        return bool(st and st["is_file"])

    def stat(self) -> RemoteStat:
        st = self._stat()
        if st is None:
            raise FileNotFoundError(2, f"No such file or directory: '{self._path}'")
        return RemoteStat(st["size"], st["blocks"], st["mode"])

    def iterdir(self) -> Iterator["RemotePath"]:
        for name in self.machine.agent.call("listdir", path=self._path):
            yield self / name

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Patterns of literal or wildcard components, no `**`."""
        found = [self]
        for part in pattern.split("/"):
            nxt = []
            for base in found:
                if not base.is_dir():
                    continue
                for child in base.iterdir():
                    if fnmatch.fnmatchcase(child.name, part):
                        nxt.append(child)
            found = nxt
        return iter(sorted(found, key=str))

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        out = []
        todo = [self]
        while todo:
            d = todo.pop()
            for child in d.iterdir():
                if fnmatch.fnmatchcase(child.name, pattern):
                    out.append(child)
                if child.is_dir():
                    todo.append(child)
        return iter(sorted(out, key=str))

    def read_bytes(self) -> bytes:
        return base64.b64decode(self.machine.agent.call("read", path=self._path))

    def read_text(self, errors: str = "strict") -> str:
        return self.read_bytes().decode(errors=errors)

    def write_bytes(self, data: bytes) -> None:
        self.machine.agent.call("write", path=self._path, data=base64.b64encode(data).decode())

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def chmod(self, mode: int) -> None:
        self.machine.agent.run(["chmod", f"{mode:o}", self._path])

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.machine.agent.call("mkdir", path=self._path)

    def open(self, mode: str = "rb") -> "RemoteFile":
        if mode not in ("rb", "r+b"):
            raise ValueError(f"RemotePath.open supports rb and r+b, not {mode}")
        if not self.is_file():
            raise FileNotFoundError(2, f"No such file: '{self._path}'")
        return RemoteFile(self, writable=mode == "r+b")


class RemoteFile:
    """A seekable binary file inside the SVM test host; each read or write
    is one agent call."""

    def __init__(self, path: RemotePath, writable: bool):
        self.path, self.writable, self.pos = path, writable, 0

    def __enter__(self) -> "RemoteFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = self.path.stat().st_size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        data = base64.b64decode(
            self.path.machine.agent.call("read", path=str(self.path), offset=self.pos, length=n)
        )
        self.pos += len(data)
        return data

    def write(self, data: bytes) -> int:
        if not self.writable:
            raise OSError("file not open for writing")
        self.path.machine.agent.call(
            "write", path=str(self.path), offset=self.pos, data=base64.b64encode(data).decode()
        )
        self.pos += len(data)
        return len(data)


class RemoteProcess:
    """A process the agent started inside the SVM test host."""

    def __init__(self, machine: "SvmMachine", pid: int):
        self.machine, self.pid = machine, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.machine.agent.call("wait", pid=self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            left = deadline - time.monotonic()
            rc = self.machine.agent.call("wait", pid=self.pid, timeout=max(0.01, min(left, 30.0)))
            if rc is not None:
                self.returncode = rc
                return rc
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid} in the SVM test host", timeout or 0)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            self.machine.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class SvmMachine(Machine):
    """The SVM test host (tests/svm): daemons run inside, clients here talk
    to them through forwarded loopback ports."""

    name = "svm"

    def __init__(self, slowness: float = 10.0):
        self.slowness = slowness
        self.host = _svm_host_module().SvmHost()
        self._work_seq = 0

    def start(self) -> "SvmMachine":
        self.host.start()
        return self

    def stop(self) -> None:
        self.host.stop()

    @property
    def agent(self) -> Any:
        assert self.host.agent is not None, "the SVM test host is not running"
        return self.host.agent

    def procs(self) -> list[ProcInfo]:
        return [ProcInfo(*row) for row in self.agent.call("procs")]

    def proc_info(self, pid: int) -> ProcInfo | None:
        for p in self.procs():
            if p.pid == pid:
                return p
        return None

    def kill(self, pid: int, sig: int) -> None:
        self.agent.call("kill", pid=pid, sig=int(sig))

    def reap(self, pid: int) -> None:
        self.agent.call("reap", pid=pid)

    def subreaper_pid(self) -> int:
        return self.host.agent_pid

    def path(self, p: str | os.PathLike) -> RemotePath:
        return RemotePath(self, os.fspath(p))

    def work_dir(self, label: str) -> RemotePath:
        """A fresh directory inside the machine (its /tmp is a tmpfs)."""
        self._work_seq += 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]
        d = self.path(f"/tmp/forkd-e2e/{self._work_seq:03d}-{safe}")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def spawn(self, argv: Sequence[str], log: RemotePath, env: dict[str, str], cwd: RemotePath) -> RemoteProcess:
        pid = self.agent.call("spawn", argv=list(argv), log=str(log), env=env, cwd=str(cwd))
        return RemoteProcess(self, pid)

    def run(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.agent.run(list(argv), timeout=timeout)
