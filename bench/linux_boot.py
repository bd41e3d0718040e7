"""Linux guests against the reference guest, on the SVM test host: cold boot
to agent-ready and the Exec round trip, side by side in one run.

    .venv/bin/python bench/linux_boot.py [--boots N] [--execs M] [--python-execs K]
                                         [--no-milestones] [--forkd PATH] [--images-dir DIR]

Linux guests need VMX or SVM, which this project's KVM-PVM machines lack, so
everything runs inside the SVM test host (tests/svm/svm_host.py: QEMU TCG
emulating an AMD machine, 1 vCPU, 16 GiB). ALL FIGURES ARE EMULATED: TCG is
10-50x slower than native, so absolute times are not speed claims; only the
ratios within one run say something.

What it does:
1. Boots the SVM test host, copies the `debian-python` image (built on this
   machine by `forkd image build debian-python`) into the machine's tmpfs
   (the VMM reads the ~100 MiB initrd at every boot; 9p is slow there) and
   starts `forkd serve` inside on a forwarded port with a bearer token.
2. Cold boots, N of each, interleaved (Linux, reference, Linux, ...), each
   `SpawnSandboxes(n=1, vcpus=1)` with `image="debian-python"` or empty:
   client wall time until the RPC returned a RUNNING sandbox, the daemon's
   `elapsed_ms`, `Sandbox.boot_ms` (VMM start -> guest ready) and, for
   Linux, `guest_boot.kernel_ms` (kernel start -> agent start, guest clock)
   and `guest_boot.init_ms` (the agent's own setup); VMM/loader share =
   boot_ms - kernel_ms - init_ms. Each sandbox is deleted after, except the
   last one of each kind, which serves step 3 and is deleted then.
3. Exec round trip, measured at the client from sending the request until
   the `exit` message was read, sequential on one HTTP/2 connection, after
   2 untimed warm-up calls: M x `true` in the Linux sandbox, M x `echo hi`
   (a builtin of the reference guest) in the reference one, and K x
   `python3 -c pass` in the Linux one (interpreter start cost).
4. Unless --no-milestones: one more, untimed-for-the-tables Linux boot of
   the same image with `loglevel=7` appended (the copy is renamed
   `debian-python-printk` in the machine's tmpfs; the VMM's base command
   line says `quiet`), whose console gives the kernel's own timestamps of
   "Unpacking initramfs", "Freeing initrd memory" and "Run /init": where
   kernel_ms goes. The verbose serial console slows that boot itself.
5. Prints one table per section (min/median/max; p90 for Execs, nearest
   rank), the ratios Linux/reference, and the exact command line.

The daemon (SIGTERM, then SIGKILL) and the SVM test host (power off, then
kill) are stopped whatever happens: errors, Ctrl-C, SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import re
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "svm"))
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))

import grpc  # noqa: E402
from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc  # noqa: E402
from svm_host import SvmHost  # noqa: E402

IMAGE = "debian-python"
PRINTK_IMAGE = "debian-python-printk"  # made inside the machine for the diagnostic boot
INNER = "/tmp/forkd-bench-linux"  # inside the SVM test host (tmpfs)
RUNNING = sandbox_pb2.SANDBOX_STATE_RUNNING
PRINTK = re.compile(r"^\[\s*(\d+\.\d+)\]")
# Console lines marking where a Linux guest's kernel time goes.
# (the first line holding any of the key's strings counts).
MILESTONES = {
    "unpack_start": ("unpack rootfs image as initramfs", "Unpacking initramfs"),
    "unpack_end": ("Freeing initrd memory",),
    "run_init": ("Run /init as init process",),
}


PROG = "linux_boot"  # prefix of the log lines; a script importing this module may set its own


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _sigterm(*_: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


# ---- statistics ----------------------------------------------------------


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def fmt(x: float | None, unit: str = "ms") -> str:
    if x is None:
        return "—"
    if unit == "s":
        return f"{x / 1000:.1f}"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    out = [title, "  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))]
    for r in rows:
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    return "\n".join(out)


def mmm(xs: list[float], unit: str = "ms") -> list[str]:
    if not xs:
        return ["—", "—", "—"]
    return [fmt(min(xs), unit), fmt(statistics.median(xs), unit), fmt(max(xs), unit)]


# ---- the daemon inside the SVM test host -----------------------------------


class InnerDaemon:
    """`forkd serve` inside the SVM test host, on a forwarded port."""

    def __init__(self, host: SvmHost, forkd: Path, images_dir: str, extra_args: list[str] | None = None):
        self.host = host
        self.forkd = forkd
        self.images_dir = images_dir
        self.extra_args = list(extra_args or [])
        self.pid: int | None = None
        self.guest_port, self.client_port = host.take_daemon_port()

    def start(self) -> None:
        a = self.host.agent
        assert a is not None
        token_file = f"{INNER}/token"
        a.call("write", path=token_file, data=base64.b64encode(self.host.token.encode() + b"\n").decode(), mode=0o600)
        argv = [
            str(self.forkd), "serve",
            "--listen", f"0.0.0.0:{self.guest_port}",
            "--data-dir", f"{INNER}/data",
            "--token-file", token_file,
            "--images-dir", self.images_dir,
            "--linux-boot-timeout", "1200",
            *self.extra_args,
        ]  # fmt: skip
        self.pid = a.call("spawn", argv=argv, log=f"{INNER}/forkd.log", env={"RUST_BACKTRACE": "1", "NO_COLOR": "1"}, cwd=INNER)
        log(f"forkd serve pid {self.pid} inside, 127.0.0.1:{self.client_port} here")

    def exited(self) -> int | None:
        assert self.host.agent is not None and self.pid is not None
        return self.host.agent.call("wait", pid=self.pid)

    def log_tail(self, n: int = 40) -> str:
        try:
            assert self.host.agent is not None
            return self.host.agent.run(["tail", "-n", str(n), f"{INNER}/forkd.log"]).stdout.decode(errors="replace")
        except Exception as e:  # noqa: BLE001 - best effort diagnostics
            return f"(no log: {e})"

    def stop(self, timeout: float = 300.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        a = self.host.agent
        if self.pid is None or a is None:
            return None
        try:
            rc = a.call("wait", pid=self.pid)
            if rc is None:
                a.call("kill", pid=self.pid, sig=int(signal.SIGTERM))
                deadline = time.monotonic() + timeout
                while rc is None and time.monotonic() < deadline:
                    rc = a.call("wait", pid=self.pid, timeout=min(30.0, max(0.1, deadline - time.monotonic())))
                if rc is None:
                    log("the daemon ignored SIGTERM: SIGKILL")
                    a.call("kill", pid=self.pid, sig=int(signal.SIGKILL))
                    rc = a.call("wait", pid=self.pid, timeout=30)
            log(f"daemon exited {rc}")
            return rc
        except (OSError, ValueError) as e:
            log(f"stopping the daemon: {e} (the SVM test host goes down next anyway)")
            return None
        finally:
            self.pid = None


# ---- the measurements -----------------------------------------------------


class Bench:
    def __init__(self, channel: grpc.Channel, token: str):
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        self.md = [("authorization", f"Bearer {token}")]
        self.live: list[str] = []  # sandboxes to delete on the way out

    def wait_serving(self, daemon: InnerDaemon, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            rc = daemon.exited()
            if rc is not None:
                raise RuntimeError(f"forkd exited {rc} before serving:\n{daemon.log_tail()}")
            try:
                self.stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(), metadata=self.md, timeout=20)
                return
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
                time.sleep(0.5)
        raise TimeoutError(f"forkd did not serve within {timeout:.0f}s ({last}):\n{daemon.log_tail()}")

    def spawn(self, image: str) -> tuple[float, Any, float]:
        """One cold boot; returns (client wall ms, Sandbox, daemon elapsed_ms)."""
        req = sandbox_pb2.SpawnSandboxesRequest(n=1, vcpus=1, image=image)
        t0 = time.monotonic()
        resp = self.stub.SpawnSandboxes(req, metadata=self.md, timeout=1500)
        wall = (time.monotonic() - t0) * 1000
        for sb in resp.sandboxes:
            self.live.append(sb.id)
        if resp.failures or len(resp.sandboxes) != 1 or resp.sandboxes[0].state != RUNNING:
            raise RuntimeError(f"spawn of {image or 'the reference guest'} failed: {resp}")
        return wall, resp.sandboxes[0], resp.elapsed_ms

    def milestones(self, sid: str) -> dict[str, float | None]:
        """Kernel timestamps (s since the kernel started, guest clock) of a
        Linux guest's boot milestones, from its console."""
        resp = self.stub.ReadConsole(sandbox_pb2.ReadConsoleRequest(sandbox_id=sid, tail_bytes=1 << 20), metadata=self.md, timeout=120)
        found: dict[str, float | None] = {k: None for k in MILESTONES}
        for line in resp.data.decode(errors="replace").splitlines():
            m = PRINTK.match(line)
            if not m:
                continue
            for key, needles in MILESTONES.items():
                if found[key] is None and any(n in line for n in needles):
                    found[key] = float(m.group(1))
        return found

    def delete(self, sid: str) -> None:
        self.stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(id=sid), metadata=self.md, timeout=600)
        if sid in self.live:
            self.live.remove(sid)

    def delete_all(self) -> None:
        for sid in list(self.live):
            try:
                self.delete(sid)
            except grpc.RpcError as e:
                log(f"deleting {sid}: {e.code().name}: {e.details()}")
                self.live.remove(sid)

    def exec_once(self, sid: str, argv: list[str], expect: bytes | None) -> float:
        """Client round trip in ms: request sent until the exit message read."""
        t0 = time.monotonic()
        out = b""
        code = None
        for m in self.stub.Exec(sandbox_pb2.ExecRequest(sandbox_id=sid, argv=argv), metadata=self.md, timeout=600):
            kind = m.WhichOneof("event")
            if kind == "stdout":
                out += m.stdout
            elif kind == "exit":
                code = m.exit.exit_code
        ms = (time.monotonic() - t0) * 1000
        if code != 0 or (expect is not None and out != expect):
            raise RuntimeError(f"Exec {argv} in {sid}: exit {code}, stdout {out!r}")
        return ms

    def execs(self, sid: str, argv: list[str], n: int, expect: bytes | None, warmup: int = 2) -> list[float]:
        for _ in range(warmup):
            self.exec_once(sid, argv, expect)
        return [self.exec_once(sid, argv, expect) for _ in range(n)]


def need_image(images_dir: str) -> Path:
    """The resolved images directory; exits if it lacks IMAGE."""
    images = Path(images_dir).resolve()
    if not (images / IMAGE / "manifest.json").is_file():
        sys.exit(
            f"{images / IMAGE} is missing: target/release/forkd image build {IMAGE} "
            f"--images-dir {images} --agent target/release/forkd-agent"
        )
    return images


def copy_image(host: SvmHost, images: Path) -> float:
    """Copies IMAGE into INNER/images in the machine's tmpfs (emptying INNER
    first); returns the seconds it took."""
    assert host.agent is not None
    t0 = time.monotonic()
    r = host.agent.run(
        ["sh", "-c", f"rm -rf {INNER} && mkdir -p {INNER}/images && cp -a {images}/{IMAGE} {INNER}/images/"],
        timeout=900,
    )
    if r.returncode != 0:
        raise RuntimeError(f"copying the image in failed: {r.stderr.decode(errors='replace')}")
    copy_s = time.monotonic() - t0
    log(f"image copied into the machine's tmpfs in {copy_s:.0f}s")
    return copy_s


def run(args: argparse.Namespace, command: str) -> None:
    forkd = Path(args.forkd).resolve()
    images = need_image(args.images_dir)
    t_start = time.monotonic()
    with SvmHost() as host:
        assert host.agent is not None
        log(f"SVM test host up ({host.uname}), run dir {host.run_dir}")
        copy_s = copy_image(host, images)
        if args.milestones:
            # The same image with a verbose console, for one diagnostic boot
            # (the VMM's base command line has `quiet`; a later loglevel=
            # wins).
            fix = (
                "import json, sys; p = sys.argv[1]; m = json.load(open(p)); "
                f"m['name'] = '{PRINTK_IMAGE}'; m['kernel_args'] = (m.get('kernel_args', '') + ' loglevel=7').strip(); "
                "json.dump(m, open(p, 'w'), indent=2)"
            )
            r = host.agent.run(
                ["sh", "-c", f"cp -a {INNER}/images/{IMAGE} {INNER}/images/{PRINTK_IMAGE} && "
                 f"{shlex.quote(sys.executable)} -c {shlex.quote(fix)} {INNER}/images/{PRINTK_IMAGE}/manifest.json"],
                timeout=600,
            )
            if r.returncode != 0:
                raise RuntimeError(f"making {PRINTK_IMAGE} failed: {r.stderr.decode(errors='replace')}")
        with_daemon(host, forkd, Bench, lambda bench: measure(bench, args, host, copy_s, command))
    log(f"done in {time.monotonic() - t_start:.0f}s (SVM test host stopped)")


def with_daemon(
    host: SvmHost, forkd: Path, bench_type: type, measure: Callable[[Any], None], extra_args: list[str] | None = None
) -> None:
    """Starts the daemon inside `host` (with `extra_args` for `forkd serve`),
    runs `measure` with a `bench_type` (a Bench) connected to it, then
    deletes what is left and stops the daemon, whatever happens."""
    daemon = InnerDaemon(host, forkd, f"{INNER}/images", extra_args)
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.client_port}")
    bench = bench_type(channel, host.token)
    try:
        daemon.start()
        bench.wait_serving(daemon)
        measure(bench)
    finally:
        try:
            bench.delete_all()
        except Exception as e:  # noqa: BLE001 - the daemon stop below still runs
            log(f"cleanup: {e}")
        finally:
            channel.close()
            daemon.stop()


def measure(bench: Bench, args: argparse.Namespace, host: SvmHost, copy_s: float, command: str) -> None:
    lin: list[tuple[float, Any, float]] = []
    ref: list[tuple[float, Any, float]] = []
    for i in range(args.boots):
        for kind, image, into in (("linux", IMAGE, lin), ("reference", "", ref)):
            wall, sb, elapsed = bench.spawn(image)
            into.append((wall, sb, elapsed))
            g = sb.guest_boot
            log(
                f"boot {i + 1}/{args.boots} {kind}: wall {wall:.0f} ms, boot_ms {sb.boot_ms:.0f}"
                + (f", kernel_ms {g.kernel_ms:.0f}, init_ms {g.init_ms:.0f}" if image else "")
            )
            if i < args.boots - 1:
                bench.delete(sb.id)

    lin_sid, ref_sid = lin[-1][1].id, ref[-1][1].id
    log(f"exec: {args.execs} x true in {lin_sid}")
    ex_lin = bench.execs(lin_sid, ["true"], args.execs, b"")
    log(f"exec: {args.execs} x echo hi in {ref_sid}")
    ex_ref = bench.execs(ref_sid, ["echo", "hi"], args.execs, b"hi\n")
    log(f"exec: {args.python_execs} x python3 -c pass in {lin_sid}")
    ex_py = bench.execs(lin_sid, ["python3", "-c", "pass"], args.python_execs, b"", warmup=1)
    bench.delete(lin_sid)
    bench.delete(ref_sid)
    diag: tuple[float, Any, dict[str, float | None]] | None = None
    if args.milestones:
        log(f"diagnostic boot of {PRINTK_IMAGE} (loglevel=7)")
        wall, sb, _ = bench.spawn(PRINTK_IMAGE)
        try:
            diag = (wall, sb, bench.milestones(sb.id))
        finally:
            bench.delete(sb.id)

    def col(rows: list[tuple[float, Any, float]], f: Callable[[tuple[float, Any, float]], float]) -> list[float]:
        return [f(r) for r in rows]

    lw, rw = col(lin, lambda r: r[0]), col(ref, lambda r: r[0])
    lb, rb = col(lin, lambda r: r[1].boot_ms), col(ref, lambda r: r[1].boot_ms)
    lk = col(lin, lambda r: r[1].guest_boot.kernel_ms)
    li = col(lin, lambda r: r[1].guest_boot.init_ms)
    lv = col(lin, lambda r: r[1].boot_ms - r[1].guest_boot.kernel_ms - r[1].guest_boot.init_ms)
    le, re_ = col(lin, lambda r: r[2]), col(ref, lambda r: r[2])

    med = statistics.median
    out = []
    out.append("forkd Linux guests vs reference guest -- EMULATED on the SVM test host (QEMU TCG, -cpu max, 1 vCPU)")
    out.append(f"command: {command}")
    out.append(f"SVM test host: {host.uname}; image copied into its tmpfs in {copy_s:.0f}s")
    out.append("absolute times are NOT speed claims (TCG is 10-50x slower than native); compare ratios only")
    out.append("")
    n = args.boots
    rows = [
        ["linux     SpawnSandboxes wall", *mmm(lw)],
        ["linux     elapsed_ms (daemon)", *mmm(le)],
        ["linux     boot_ms", *mmm(lb)],
        ["linux       kernel_ms: kernel -> agent", *mmm(lk)],
        ["linux       init_ms: agent setup", *mmm(li)],
        ["linux       VMM/loader = boot - kernel - init", *mmm(lv)],
        ["reference SpawnSandboxes wall", *mmm(rw)],
        ["reference elapsed_ms (daemon)", *mmm(re_)],
        ["reference boot_ms", *mmm(rb)],
    ]
    out.append(table(f"1+2. cold boot to agent-ready, n=1, vcpus=1, {n} each, interleaved (ms, EMULATED)", ["", "min", "median", "max"], rows))
    out.append("")
    per = [
        [f"boot {i + 1}", fmt(lw[i]), fmt(lb[i]), fmt(lk[i]), fmt(li[i]), fmt(lv[i]), fmt(rw[i]), fmt(rb[i])]
        for i in range(n)
    ]
    out.append(table("   per boot (ms)", ["", "linux wall", "boot_ms", "kernel", "init", "VMM/loader", "ref wall", "ref boot_ms"], per))
    out.append("")
    out.append(
        f"   ratio linux/reference (medians): wall {med(lw) / med(rw):.0f}x, boot_ms {med(lb) / med(rb):.0f}x; "
        f"linux boot_ms shares (sums over the boots): kernel {100 * sum(lk) / sum(lb):.0f}%, init {100 * sum(li) / sum(lb):.0f}%, "
        f"VMM/loader {100 * sum(lv) / sum(lb):.0f}%"
    )
    out.append("")

    def ms(m: dict[str, float | None], a: str, b: str | None = None) -> float | None:
        if m.get(a) is None or (b is not None and m.get(b) is None):
            return None
        return (m[a] - (m[b] if b else 0.0)) * 1000  # type: ignore[operator]

    if diag is not None:
        wall, sb, m = diag
        g = sb.guest_boot
        out.append(table(
            f"   diagnostic: one more boot of the same image with loglevel=7 (not in the figures above; "
            f"the verbose serial console slows it): printk time since kernel start, ms, guest clock",
            ["", "unpack starts", "unpack takes", "unpack done", "Run /init", "kernel_ms", "boot_ms", "wall"],
            [[PRINTK_IMAGE, fmt(ms(m, "unpack_start")), fmt(ms(m, "unpack_end", "unpack_start")), fmt(ms(m, "unpack_end")),
              fmt(ms(m, "run_init")), fmt(g.kernel_ms), fmt(sb.boot_ms), fmt(wall)]],
        ))
        if ms(m, "unpack_end", "unpack_start") is not None and g.kernel_ms:
            out.append(f"   initramfs unpacking = {100 * ms(m, 'unpack_end', 'unpack_start') / g.kernel_ms:.0f}% of that boot's kernel_ms")
        out.append("")
    rows = [
        [f"linux     Exec true (n={len(ex_lin)})", fmt(min(ex_lin)), fmt(med(ex_lin)), fmt(pct(ex_lin, 90)), fmt(max(ex_lin))],
        [f"reference Exec echo hi (n={len(ex_ref)})", fmt(min(ex_ref)), fmt(med(ex_ref)), fmt(pct(ex_ref, 90)), fmt(max(ex_ref))],
        [f"linux     Exec python3 -c pass (n={len(ex_py)})", fmt(min(ex_py)), fmt(med(ex_py)), fmt(pct(ex_py, 90)), fmt(max(ex_py))],
    ]
    out.append(table("3. Exec round trip at the client, sequential, after warm-up (ms, EMULATED)", ["", "min", "median", "p90", "max"], rows))
    out.append("")
    out.append(
        f"   ratio linux true / reference echo: median {med(ex_lin) / med(ex_ref):.1f}x, p90 {pct(ex_lin, 90) / pct(ex_ref, 90):.1f}x; "
        f"python3 -c pass / true (medians): {med(ex_py) / med(ex_lin):.1f}x"
    )
    print("\n".join(out), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=3, help="cold boots of each guest (default 3)")
    ap.add_argument("--execs", type=int, default=20, help="timed Execs per guest (default 20)")
    ap.add_argument("--python-execs", type=int, default=5, help="timed `python3 -c pass` Execs (default 5)")
    ap.add_argument(
        "--no-milestones", dest="milestones", action="store_false",
        help="skip the extra diagnostic boot with a verbose console (kernel milestones)",
    )
    ap.add_argument("--forkd", default=str(REPO / "target" / "release" / "forkd"))
    ap.add_argument(
        "--images-dir",
        default=os.environ.get("FORKD_IMAGES_DIR", str(Path.home() / ".cache" / "forkd" / "images")),
        help=f"where `forkd image build` put {IMAGE} (on this machine)",
    )
    args = ap.parse_args()
    if args.boots < 1 or args.execs < 1 or args.python_execs < 1:
        ap.error("--boots, --execs and --python-execs must be at least 1")
    return run_to_end(run, args, "daemon and SVM test host stopped")


def run_to_end(run: Callable[[argparse.Namespace, str], None], args: argparse.Namespace, cleaned: str) -> int:
    """Runs `run(args, command line)` with SIGTERM as Ctrl-C; returns the
    exit status (130 when interrupted; `cleaned` says what was cleaned up)."""
    command = shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable] + sys.argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        run(args, command)
    except KeyboardInterrupt:
        log(f"interrupted: {cleaned}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
