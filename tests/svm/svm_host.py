#!/usr/bin/env python3
"""The SVM test host: an emulated AMD machine with SVM and nested paging,
in which forkd runs unchanged.

This project's machines offer KVM-PVM, a software hypervisor; users run
forkd on Intel VT-x or AMD-V. QEMU's TCG (no KVM needed) emulates `-cpu
max`, an AMD CPU with SVM and nested paging; Debian's kernel inside loads
`kvm_amd`, and forkd drives /dev/kvm there exactly as on a user's AMD
host. It is 10-50x slower than native: it proves correctness, not speed.

What this module does:
- `build_image()`: Debian's `linux-image-amd64` kernel (resolved from the
  metapackage, `apt-get download` + `dpkg -x`) and an initramfs of
  busybox-static, the kernel modules the machine needs (resolved with
  `modprobe --show-depends`) and the init files in `guest/`; cached under
  `~/.cache/forkd/svm-host/` by kernel release and input digest.
- `SvmHost`: boots it (`-smp 1`: multi-threaded TCG with 2 CPUs hit an RCU
  stall), shares this machine's root read-only over 9p (so the checkout's
  build outputs and Python are at the same paths inside; /tmp, /run and
  /dev/shm are tmpfs inside, where forkd's data dirs go), forwards host
  loopback ports to the machine (the test agent's, and daemon ports), and
  waits until the test agent (`svm_agent.py`) answers. QEMU is killed with
  its launcher whatever happens (PR_SET_PDEATHSIG, plus a stop on exit, on
  SIGTERM/SIGINT and on a timeout).
- `AgentClient`: the host side of the agent's protocol.

Command line (see tests/README.md):
  svm_host.py build              build (or find cached) kernel + initramfs
  svm_host.py serve [--port P]   boot, start `forkd serve` inside, print how
                                 to reach it, stop cleanly on Ctrl-C
  svm_host.py leftovers          list (and kill) QEMU processes of this
                                 checkout's test hosts still running; exit 1
                                 if there were any
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
GUEST_FILES = HERE / "guest"
AGENT = HERE / "svm_agent.py"

# Modules the emulated machine loads (with their dependencies), in order:
# virtio-pci for the NIC and 9p devices, the 9p file system, the NIC, and
# KVM for AMD.
MODULES = ["virtio_pci", "virtio_net", "9pnet_virtio", "9p", "kvm_amd"]
AGENT_GUEST_PORT = 7000
# Guest ports forwarded for daemons (each daemon started inside takes one).
DAEMON_GUEST_PORTS = [50051, 50052, 50053, 50054]
GUEST_IP = "10.0.2.15"
KEEP_RUNS = 30
PR_SET_PDEATHSIG = 1


# depmod and modprobe live in /usr/sbin (or /sbin), which a non-login
# shell's PATH may lack.
for _sbin in ("/usr/sbin", "/sbin"):
    if _sbin not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = os.environ.get("PATH", "") + ":" + _sbin


def log(msg: str) -> None:
    print(f"svm-host: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("FORKD_SVM_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forkd" / "svm-host"


# ---- the image: kernel + initramfs -------------------------------------------


class BuildError(RuntimeError):
    pass


def run(argv: list[str], **kw: Any) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def need_tools() -> None:
    missing = [t for t in ("qemu-system-x86_64", "apt-get", "dpkg", "modprobe", "depmod", "cpio") if not shutil.which(t)]
    if not is_static(BUSYBOX):
        missing.append(f"a static {BUSYBOX}")
    if missing:
        raise BuildError(
            f"missing {', '.join(missing)}: install Debian's qemu-system-x86, kmod, cpio and busybox-static "
            "(tests/install-test-deps does it as root)"
        )


BUSYBOX = Path("/bin/busybox")


def is_static(binary: Path) -> bool:
    """Whether an ELF binary has no program interpreter (the initramfs has
    no shared libraries)."""
    try:
        head = binary.read_bytes()[:8192]
    except OSError:
        return False
    return head.startswith(b"\x7fELF") and b"ld-linux" not in head


def apt_update() -> None:
    """Refreshes apt's package lists (as root); a no-op for other users,
    whose lists are whatever root left."""
    if os.geteuid() == 0:
        log("refreshing apt's package lists (apt-get update)")
        run(["apt-get", "update", "-q"])


def kernel_package() -> str:
    """The concrete package behind `linux-image-amd64` (its name carries an
    ABI number that changes with Debian updates)."""
    for attempt in range(2):
        try:
            out = run(["apt-cache", "depends", "linux-image-amd64"])
        except BuildError:
            out = ""
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Depends: linux-image-") and line != "Depends: linux-image-amd64":
                return line.split(":", 1)[1].strip()
        if attempt == 0:
            apt_update()
    raise BuildError(f"apt-cache depends linux-image-amd64 names no kernel package (apt-get update as root?):\n{out}")


def download(pkg: str, dest: Path) -> None:
    """`apt-get download PKG` into `dest`; refreshes the lists once if the
    package is no longer where they say."""
    try:
        run(["apt-get", "download", pkg], cwd=dest)
    except BuildError:
        apt_update()
        run(["apt-get", "download", pkg], cwd=dest)


def inputs_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(GUEST_FILES.iterdir()) + [Path(__file__)]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(json.dumps(MODULES).encode())
    return h.hexdigest()[:16]


class Image:
    def __init__(self, kernel: Path, initrd: Path, release: str):
        self.kernel, self.initrd, self.release = kernel, initrd, release


def build_image() -> Image:
    """Kernel and initramfs of the SVM test host, built once per kernel
    package and input digest; a half-built one is never used (built in a
    scratch dir, renamed into place)."""
    need_tools()
    pkg = kernel_package()
    release = pkg.removeprefix("linux-image-")
    dest = cache_root() / f"{release}-{inputs_digest()}"
    if (dest / "initrd.img").is_file() and (dest / "vmlinuz").is_file():
        os.utime(dest)  # used: see the pruning below
        return Image(dest / "vmlinuz", dest / "initrd.img", release)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        log(f"building the SVM test host image for {pkg} in {work}")
        debs = cache_root() / "debs"
        debs.mkdir(exist_ok=True)
        if not list(debs.glob(f"{pkg}_*.deb")):
            download(pkg, debs)
        [deb] = list(debs.glob(f"{pkg}_*.deb"))
        kroot = work / "kernel"
        run(["dpkg", "-x", str(deb), str(kroot)])
        run(["depmod", "-b", str(kroot), release])

        rootfs = work / "initramfs"
        for d in ("bin", "etc", "proc", "sys", "dev", "host", "modules"):
            (rootfs / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in ("sh", "mount", "insmod", "ip", "chroot", "cat", "echo", "mkdir", "tr", "poweroff"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "init").symlink_to("bin/busybox")
        order: list[str] = []
        for m in MODULES:
            deps = run(["modprobe", "-d", str(kroot), "-S", release, "--show-depends", m])
            for line in deps.splitlines():
                parts = line.split()
                if parts[:1] != ["insmod"]:
                    continue  # "builtin ..."
                src = Path(parts[1])
                if src.name not in order:
                    shutil.copy2(src, rootfs / "modules" / src.name)
                    order.append(src.name)
        (rootfs / "modules" / "order").write_text("\n".join(order) + "\n")
        shutil.copy2(GUEST_FILES / "inittab", rootfs / "etc" / "inittab")
        for script in ("rc.svm", "agent.svm"):
            shutil.copy2(GUEST_FILES / script, rootfs / "etc" / script)
            (rootfs / "etc" / script).chmod(0o755)

        out = work / "out"
        out.mkdir()
        names = subprocess.run(
            ["find", ".", "-mindepth", "1"], cwd=rootfs, capture_output=True, check=True
        ).stdout
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], input=names, cwd=rootfs, capture_output=True, check=True
        ).stdout
        (out / "initrd.img").write_bytes(archive)
        shutil.copy2(kroot / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    # Images of other kernels or inputs, unused for a day (another checkout
    # may be booting one right now).
    for old in dest.parent.glob(f"*-{'?' * 16}"):
        if old != dest and old.is_dir() and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    log(f"image ready in {time.monotonic() - t0:.1f}s: {dest}")
    return Image(dest / "vmlinuz", dest / "initrd.img", release)


# ---- the agent's protocol -----------------------------------------------------


class AgentError(OSError):
    pass


ERRORS: dict[str, type[BaseException]] = {
    "FileNotFoundError": FileNotFoundError,
    "FileExistsError": FileExistsError,
    "ProcessLookupError": ProcessLookupError,
    "PermissionError": PermissionError,
    "IsADirectoryError": IsADirectoryError,
    "NotADirectoryError": NotADirectoryError,
    "TimeoutError": TimeoutError,
    "KeyError": KeyError,
}


class AgentClient:
    """One connection to the test agent; calls are serialised."""

    def __init__(self, port: int, token: str, timeout: float = 120.0):
        self.port, self.token, self.timeout = port, token, timeout
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.rfile: Any = None

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        rfile = sock.makefile("rb")
        sock.sendall(json.dumps({"token": self.token}).encode() + b"\n")
        line = rfile.readline()
        if not line:
            sock.close()
            raise ConnectionError("the agent closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            sock.close()
            raise PermissionError(reply["error"]["message"])
        self.sock, self.rfile = sock, rfile

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def call(self, op: str, **args: Any) -> Any:
        with self.lock:
            if self.sock is None:
                self.connect()
            assert self.sock is not None
            try:
                self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                line = self.rfile.readline()
            except OSError:
                self.close()
                raise
            if not line:
                self.close()
                raise ConnectionError(f"the SVM test host's agent went away during {op}")
        reply = json.loads(line)
        if "error" in reply:
            err = reply["error"]
            cls = ERRORS.get(err["type"])
            if cls is KeyError:
                raise KeyError(err["message"])
            if cls is not None:
                raise cls(err["errno"], err["message"]) if err["errno"] is not None else cls(err["message"])
            raise AgentError(f"{op}: {err['type']}: {err['message']}")
        return reply["ok"]

    def run(self, argv: list[str], timeout: float = 60.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        args: dict[str, Any] = {"argv": argv, "timeout": timeout}
        if input is not None:
            args["input"] = base64.b64encode(input).decode()
        r = self.call("run", **args)
        return subprocess.CompletedProcess(
            argv, r["rc"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"])
        )


# ---- the machine ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # QEMU gets SIGKILL when its launcher (this process's thread) dies, even
    # by SIGKILL: no emulated machine outlives its test run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class SvmHost:
    """A booted SVM test host. Use as a context manager, or start()/stop()."""

    def __init__(self, memory_mib: int = 16384, boot_timeout: float = 300.0):
        self.memory_mib = memory_mib
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen | None = None
        self.run_dir: Path | None = None
        self.token = secrets.token_hex(16)
        self.agent_port = free_port()
        # guest port -> host loopback port
        self.ports = {gp: free_port() for gp in DAEMON_GUEST_PORTS}
        self.agent: AgentClient | None = None
        self.agent_pid = 0
        self._free_guest_ports = list(DAEMON_GUEST_PORTS)

    # ---- lifecycle --------------------------------------------------------

    def kept_paths(self) -> list[str]:
        """Paths of this machine the emulated one needs under its own tmpfs
        /tmp: the checkout (binaries, the agent), the Python running the
        agent (its venv), the cache (the token) and FORKD_BIN's directory."""
        paths = []
        wanted = [REPO_ROOT, Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent.parent, cache_root()]
        if os.environ.get("FORKD_BIN"):
            wanted.append(Path(os.environ["FORKD_BIN"]).resolve().parent)
        for p in wanted:
            s = str(p)
            if s.startswith("/tmp/") and s not in paths:
                if any(c in s for c in " ,\t\n"):
                    raise BuildError(f"{s}: a path under /tmp with a space or comma cannot be shared")
                paths.append(s)
        return paths

    def argv(self, image: Image) -> list[str]:
        assert self.run_dir is not None
        fwd = [f"hostfwd=tcp:127.0.0.1:{self.agent_port}-{GUEST_IP}:{AGENT_GUEST_PORT}"]
        fwd += [f"hostfwd=tcp:127.0.0.1:{hp}-{GUEST_IP}:{gp}" for gp, hp in self.ports.items()]
        cmdline = " ".join(
            [
                "console=ttyS0",
                "panic=-1",
                "mitigations=off",
                f"svm.python={sys.executable}",
                f"svm.agent={AGENT}",
                f"svm.token={self.run_dir / 'token'}",
                f"svm.port={AGENT_GUEST_PORT}",
            ]
            + ([f"svm.keep={','.join(self.kept_paths())}"] if self.kept_paths() else [])
        )
        return [
            "qemu-system-x86_64",
            "-accel", "tcg,tb-size=1024",
            "-machine", "q35",
            "-cpu", "max",
            "-smp", "1",
            "-m", str(self.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel),
            "-initrd", str(image.initrd),
            "-append", cmdline,
            "-serial", f"file:{self.run_dir / 'console.log'}",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-netdev", "user,id=n0,restrict=on," + ",".join(fwd),
            "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip

    def start(self) -> "SvmHost":
        image = build_image()
        runs = cache_root() / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        # Keep the run dirs (console logs) of the last KEEP_RUNS boots.
        for old in sorted(runs.iterdir())[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)
        self.run_dir = Path(tempfile.mkdtemp(dir=runs, prefix=time.strftime("%Y%m%d-%H%M%S-")))
        self.run_dir.chmod(0o700)
        tf = self.run_dir / "token"
        tf.write_text(self.token + "\n")
        tf.chmod(0o600)
        argv = self.argv(image)
        (self.run_dir / "qemu.argv").write_text(" ".join(argv) + "\n")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=open(self.run_dir / "qemu.log", "wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        (self.run_dir / "qemu.pid").write_text(f"{self.proc.pid}\n")
        (self.run_dir / "agent.port").write_text(f"{self.agent_port}\n")
        log(f"booting {image.release} under QEMU TCG (pid {self.proc.pid}, run dir {self.run_dir})")
        try:
            self._wait_agent(t0)
        except BaseException:
            self.stop()
            raise
        log(f"agent up after {time.monotonic() - t0:.1f}s ({self.uname})")
        return self

    def _wait_agent(self, t0: float) -> None:
        deadline = t0 + self.boot_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"QEMU exited {self.proc.returncode} during boot:\n{self.log_tail()}"
                )
            client = AgentClient(self.agent_port, self.token)
            try:
                info = client.call("ping")
                self.agent, self.agent_pid, self.uname = client, info["pid"], info["uname"]
                return
            except (OSError, ValueError) as e:
                client.close()
                last = e
                time.sleep(0.5)
        raise TimeoutError(
            f"the SVM test host's agent did not answer within {self.boot_timeout:.0f}s ({last}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> int | None:
        """Powers the machine off through the agent, or kills QEMU; returns
        QEMU's exit code (None if it had to be killed). Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self.agent is not None:
            try:
                self.agent.call("poweroff")
            except (OSError, ValueError):
                pass
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        rc: int | None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        return rc

    def __enter__(self) -> "SvmHost":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- ports and logs --------------------------------------------------

    def take_daemon_port(self) -> tuple[int, int]:
        """A forwarded (guest port, host port) pair for one daemon."""
        if not self._free_guest_ports:
            raise RuntimeError(f"all {len(DAEMON_GUEST_PORTS)} forwarded daemon ports are in use")
        gp = self._free_guest_ports.pop(0)
        return gp, self.ports[gp]

    def release_daemon_port(self, guest_port: int) -> None:
        if guest_port not in self._free_guest_ports:
            self._free_guest_ports.append(guest_port)

    def log_tail(self, lines: int = 40) -> str:
        if self.run_dir is None:
            return ""
        out = []
        for name in ("console.log", "qemu.log"):
            p = self.run_dir / name
            if p.is_file():
                text = p.read_text(errors="replace").splitlines()
                out.append(f"--- {p} (last {lines} lines) ---")
                out += text[-lines:]
        return "\n".join(out)


def leftover_qemus() -> list[int]:
    """Pids of QEMU processes running a test host of this checkout (its
    agent path on their kernel command line)."""
    marker = f"svm.agent={AGENT}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if argv.startswith(b"qemu-system") and marker in argv:
            out.append(int(name))
    return out


# ---- command line ----------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    forkd = Path(args.forkd).resolve()
    host = SvmHost(memory_mib=args.memory_mib)
    if args.port:
        host.ports[DAEMON_GUEST_PORTS[0]] = args.port
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with host:
        assert host.agent is not None
        gp, hp = host.take_daemon_port()
        data = "/tmp/forkd"
        host.agent.call("write", path="/tmp/forkd.token", data=base64.b64encode(host.token.encode()).decode(), mode=0o600)
        doctor = host.agent.run([str(forkd), "doctor", "--no-daemon", "--data-dir", data], timeout=600)
        print(doctor.stdout.decode(errors="replace"), end="", flush=True)
        pid = host.agent.call(
            "spawn",
            argv=[str(forkd), "serve", "--listen", f"0.0.0.0:{gp}", "--data-dir", data, "--token-file", "/tmp/forkd.token"],
            log="/tmp/forkd.log",
        )
        print(
            f"forkd serve is running inside the SVM test host (pid {pid} there), on 127.0.0.1:{hp} here.\n"
            f"  token: {host.token}\n"
            f"  grpcurl -plaintext -H 'authorization: Bearer {host.token}' 127.0.0.1:{hp} list\n"
            f"Run dir: {host.run_dir} (console.log, qemu.pid, agent.port). Ctrl-C stops the machine.",
            flush=True,
        )
        while not stop.wait(1.0):
            assert host.proc is not None
            if host.proc.poll() is not None:
                log(f"QEMU exited {host.proc.returncode}")
                return 1
            if host.agent.call("wait", pid=pid) is not None:
                log("forkd serve exited inside the machine:")
                print(host.agent.run(["tail", "-n", "30", "/tmp/forkd.log"]).stdout.decode(), file=sys.stderr)
                return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find cached) the kernel and initramfs")
    sub.add_parser("leftovers", help="list and kill this checkout's QEMU test hosts; exit 1 if any")
    sp = sub.add_parser("serve", help="boot, run forkd serve inside, forward its port")
    sp.add_argument("--forkd", default=str(REPO_ROOT / "target" / "release" / "forkd"))
    sp.add_argument("--port", type=int, default=0, help="host loopback port (default: a free one)")
    sp.add_argument("--memory-mib", type=int, default=16384)
    args = ap.parse_args()
    if args.cmd == "leftovers":
        pids = leftover_qemus()
        for pid in pids:
            log(f"QEMU pid {pid} of this checkout is still running: killing it")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            log("no QEMU test host of this checkout is running")
        return 1 if pids else 0
    if args.cmd == "build":
        img = build_image()
        print(f"kernel {img.kernel}\ninitrd {img.initrd}\nrelease {img.release}")
        return 0
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
