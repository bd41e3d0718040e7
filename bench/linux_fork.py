"""Linux guests on the SVM test host: forking children of a Linux snapshot
against cold boots, and the pause of a LIVE branch against a FULL one, in
one run.

    .venv/bin/python bench/linux_fork.py [--fork-ns 1,10,50] [--cold-ns 1,10] [--rounds 3]
                                         [--reps 1] [--live-memory-mib 1024] [--fill-mib 600]
                                         [--forkd PATH] [--images-dir DIR]

Linux guests need VMX or SVM, which this project's KVM-PVM machines lack, so
everything runs inside the SVM test host (tests/svm/svm_host.py: QEMU TCG
emulating an AMD machine, 1 vCPU, 16 GiB). ALL FIGURES ARE EMULATED: TCG is
10-50x slower than native, so absolute times are not speed claims; only the
ratios within one run say something (and only roughly: emulation does not
slow a memory copy, a trap to the VMM and a guest's own work alike).

What it does:
1. Setup as bench/linux_boot.py (whose helpers it imports): boots the SVM
   test host, copies the `debian-python` image into the machine's tmpfs and
   starts `forkd serve` inside on a forwarded port with a bearer token,
   with `--max-guest-memory-mib 65536` (the daemon commits every child's
   full RAM against that limit, by default the machine's 16 GiB, though
   children share their snapshot's memory copy-on-write).
2. Fork against cold boot.
   a. Cold boots the fork source, `SpawnSandboxes(image=debian-python, n=1,
      vcpus=1)` with the image's default memory, warms it with one Exec of
      `python3 -c "import json, decimal"`, and takes a FULL branch tagged
      `bench-fork` (its VMM-reported `pause_ms` is printed); the source is
      then deleted.
   b. One UNTIMED warm-up fork, `SpawnSandboxes(snapshot_tag=bench-fork,
      n=1)`, deleted at once: the daemon's first fork of a tag also loads
      and verifies the snapshot's memory (tens of seconds emulated), which
      the timed forks should not carry. Its wall time is printed apart.
   c. For every n in --fork-ns and --cold-ns, ascending, --reps times: if n
      is in --fork-ns, `SpawnSandboxes(snapshot_tag=bench-fork, n)`; then,
      if n is in --cold-ns, `SpawnSandboxes(image=debian-python, n,
      vcpus=1)` (so fork and cold boot of one n run back to back). For each
      spawn: the client wall time of the RPC (it returns when every
      sandbox's agent answered), the daemon's `elapsed_ms`, every sandbox's
      `boot_ms` (min/median/max), then in the first sandbox the round trip
      of an Exec `true` sent right after the reply ("first Exec") and of a
      second one; then every sandbox is deleted (concurrent DeleteSandbox
      calls; the wall time of all of them is printed).
   d. Ratios cold/fork per n: of the walls, of `elapsed_ms` and of the
      median `boot_ms`. For an n forked but not cold booted (by default 50)
      the cold side is n x the median wall of the n=1 cold boots, a
      SERIAL-EQUIVALENT estimate, not a measurement, and labelled so.
   e. The snapshot `bench-fork` is deleted.
3. LIVE against FULL pause of a larger guest: cold boots one sandbox with
   --live-memory-mib (1024) MiB and 1 vCPU, starts in it a detached Python
   process (double fork + setsid, stdio on /dev/null) holding --fill-mib
   (600) MiB of non-zero bytes, waits until it wrote its ready file and
   records /proc/meminfo's MemAvailable; then --rounds (3) rounds of a
   FULL branch followed by a LIVE branch with wait=true (so the snapshot
   is READY when the reply comes and each copy has ended before the next
   branch), each with its own tag and deleted (DeleteSnapshot) right
   after. Per branch: the VMM-reported `pause_ms`, the client's round trip
   (for LIVE wait=true that includes the background copy: the API reports
   no copy time, so "round trip - pause" is the closest figure),
   `bytes_written`, `faults_served` and the snapshot's `memory_bytes`.
   The filler must still be alive at the end. Prints min/median/max per
   mode and the ratio FULL/LIVE of the median pauses.
4. Prints each section's tables as soon as it is done, with the exact
   command line and the SVM test host's kernel.

The sandboxes and snapshots left, the daemon (SIGTERM, then SIGKILL) and
the SVM test host (power off, then kill) are removed or stopped whatever
happens: errors, Ctrl-C, SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import linux_boot as lb  # noqa: E402  (also puts the Python client and svm_host on sys.path)
import grpc  # noqa: E402
from forkd.v1 import sandbox_pb2, snapshot_pb2, snapshot_pb2_grpc  # noqa: E402
from svm_host import SvmHost  # noqa: E402

lb.PROG = "linux_fork"
log, fmt, table, mmm = lb.log, lb.fmt, lb.table, lb.mmm

IMAGE = lb.IMAGE
RUNNING = sandbox_pb2.SANDBOX_STATE_RUNNING
FULL = snapshot_pb2.BRANCH_MODE_FULL
LIVE = snapshot_pb2.BRANCH_MODE_LIVE
READY = snapshot_pb2.SNAPSHOT_STATUS_READY
MODE_NAMES: dict[Any, str] = {FULL: "FULL", LIVE: "LIVE"}
FORK_TAG = "bench-fork"
RPC_TIMEOUT = 3600.0  # seconds; 50 emulated Linux guests take a while
FILL_READY = "/tmp/forkd-bench-fill.ready"
# Detaches (fork + setsid, stdio on /dev/null, so the Exec ends at once),
# holds argv[1] MiB of non-zero bytes, and writes its pid to the ready file.
FILLER = (
    "import os, sys, time\n"
    "if os.fork():\n"
    "    sys.exit(0)\n"
    "os.setsid()\n"
    "fd = os.open('/dev/null', os.O_RDWR)\n"
    "for i in (0, 1, 2):\n"
    "    os.dup2(fd, i)\n"
    "d = os.urandom(1 << 20) * int(sys.argv[1])\n"
    f"open('{FILL_READY}.tmp', 'w').write(str(os.getpid()))\n"
    f"os.rename('{FILL_READY}.tmp', '{FILL_READY}')\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)

Spawned = tuple[float, list[Any], float]  # (client wall ms, sandboxes, daemon elapsed_ms)


def out(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.1f}x"


def mib(b: float) -> str:
    return f"{b / (1 << 20):.0f}"


class ForkBench(lb.Bench):
    """linux_boot's Bench (wait_serving, delete, exec_once) plus spawns of
    n, branches and snapshots, all removed by delete_all."""

    def __init__(self, channel: grpc.Channel, token: str):
        super().__init__(channel, token)
        self.snap = snapshot_pb2_grpc.SnapshotServiceStub(channel)
        self.snapshots: list[str] = []  # snapshots to delete on the way out

    def spawn_n(self, n: int, *, image: str = "", snapshot_tag: str = "", vcpus: int = 0, memory_mib: int = 0) -> Spawned:
        req = sandbox_pb2.SpawnSandboxesRequest(n=n, image=image, snapshot_tag=snapshot_tag, vcpus=vcpus, memory_mib=memory_mib)
        t0 = time.monotonic()
        resp = self.stub.SpawnSandboxes(req, metadata=self.md, timeout=RPC_TIMEOUT)
        wall = (time.monotonic() - t0) * 1000
        self.live.extend(sb.id for sb in resp.sandboxes)
        bad = [sb for sb in resp.sandboxes if sb.state != RUNNING]
        if resp.failures or len(resp.sandboxes) != n or bad:
            what = f"snapshot {snapshot_tag}" if snapshot_tag else f"image {image}"
            fails = "; ".join(f"#{f.index} {f.code}: {f.message}" for f in resp.failures[:3])
            raise RuntimeError(
                f"spawn of {n} from {what}: {len(resp.sandboxes)} started, {len(resp.failures)} failed "
                f"({fails}), {len(bad)} not RUNNING"
            )
        return wall, list(resp.sandboxes), resp.elapsed_ms

    def delete_many(self, ids: list[str]) -> float:
        """Concurrent DeleteSandbox calls; the wall ms of all of them."""
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(ids)))) as pool:
            list(pool.map(self.delete, ids))
        return (time.monotonic() - t0) * 1000

    def run_cmd(self, sid: str, argv: list[str], timeout: float = 600) -> tuple[int | None, bytes]:
        """Exec; (exit code, stdout) without judging them."""
        data = b""
        code = None
        for m in self.stub.Exec(sandbox_pb2.ExecRequest(sandbox_id=sid, argv=argv), metadata=self.md, timeout=timeout):
            kind = m.WhichOneof("event")
            if kind == "stdout":
                data += m.stdout
            elif kind == "exit":
                code = m.exit.exit_code
        return code, data

    def branch(self, sid: str, tag: str, mode: Any) -> tuple[float, Any]:
        """BranchSandbox (LIVE with wait=true); (client round trip ms, response)."""
        extra = {"wait": True} if mode == LIVE else {}
        req = sandbox_pb2.BranchSandboxRequest(sandbox_id=sid, tag=tag, mode=mode, **extra)
        self.snapshots.append(tag)
        t0 = time.monotonic()
        resp = self.stub.BranchSandbox(req, metadata=self.md, timeout=RPC_TIMEOUT)
        wall = (time.monotonic() - t0) * 1000
        if resp.snapshot.status != READY:
            raise RuntimeError(f"{MODE_NAMES[mode]} branch {tag} of {sid} is not READY: {resp.snapshot}")
        return wall, resp

    def delete_snapshot(self, tag: str, force: bool = False) -> None:
        self.snap.DeleteSnapshot(snapshot_pb2.DeleteSnapshotRequest(tag=tag, cascade=force, force=force), metadata=self.md, timeout=600)
        if tag in self.snapshots:
            self.snapshots.remove(tag)

    def delete_all(self) -> None:
        try:
            super().delete_all()
        finally:
            for tag in list(self.snapshots):
                try:
                    self.delete_snapshot(tag, force=True)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        log(f"deleting snapshot {tag}: {e.code().name}: {e.details()}")
                    self.snapshots.remove(tag)


# ---- 2. fork against cold boot ------------------------------------------------


def one_spawn(b: ForkBench, kind: str, n: int) -> dict[str, Any]:
    if kind == "fork":
        wall, sbs, elapsed = b.spawn_n(n, snapshot_tag=FORK_TAG)
        odd = [sb.id for sb in sbs if sb.image != IMAGE or sb.snapshot_tag != FORK_TAG]
        if odd:
            log(f"note: fork children {odd[:3]} report image/snapshot_tag other than {IMAGE}/{FORK_TAG}")
    else:
        wall, sbs, elapsed = b.spawn_n(n, image=IMAGE, vcpus=1)
    first = sbs[0].id
    first_exec = b.exec_once(first, ["true"], b"")
    second_exec = b.exec_once(first, ["true"], b"")
    boots = [sb.boot_ms for sb in sbs]
    delete_ms = b.delete_many([sb.id for sb in sbs])
    log(
        f"{kind} n={n}: wall {wall:.0f} ms, elapsed_ms {elapsed:.0f}, boot_ms median {statistics.median(boots):.0f} "
        f"(max {max(boots):.0f}), first Exec {first_exec:.0f} ms, second {second_exec:.0f} ms, delete all {delete_ms:.0f} ms"
    )
    return {"kind": kind, "n": n, "wall": wall, "elapsed": elapsed, "boots": boots,
            "first_exec": first_exec, "second_exec": second_exec, "delete": delete_ms}  # fmt: skip


def fork_vs_cold(b: ForkBench, args: argparse.Namespace) -> None:
    med = statistics.median
    log(f"cold boot of the fork source ({IMAGE}, vcpus=1, image's default memory)")
    src_wall, sbs, _ = b.spawn_n(1, image=IMAGE, vcpus=1)
    src = sbs[0]
    log(f"source {src.id} up in {src_wall:.0f} ms ({src.memory_mib} MiB); warming it")
    b.exec_once(src.id, ["python3", "-c", "import json, decimal"], b"")
    br_wall, br = b.branch(src.id, FORK_TAG, FULL)
    snap = br.snapshot
    log(f"FULL branch {FORK_TAG}: pause_ms {br.pause_ms:.0f}, round trip {br_wall:.0f} ms, image {snap.image!r}")
    b.delete(src.id)

    log("untimed warm-up fork (n=1): the daemon's first fork of a tag loads and verifies its memory")
    wu_wall, wu, _ = b.spawn_n(1, snapshot_tag=FORK_TAG)
    b.delete_many([sb.id for sb in wu])
    log(f"warm-up fork: {wu_wall:.0f} ms")

    ns = sorted(set(args.fork_ns) | set(args.cold_ns))
    recs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for n in ns:
            for kind, wanted in (("fork", args.fork_ns), ("cold", args.cold_ns)):
                if n in wanted:
                    log(f"rep {rep + 1}/{args.reps}: {kind} n={n}")
                    recs.append(one_spawn(b, kind, n))
    b.delete_snapshot(FORK_TAG)

    def sel(kind: str, n: int) -> list[dict[str, Any]]:
        return [r for r in recs if r["kind"] == kind and r["n"] == n]

    def medof(rs: list[dict[str, Any]], key: str) -> float | None:
        return med([r[key] for r in rs]) if rs else None

    out(
        f"2. fork from a Linux snapshot vs cold boot, {IMAGE}, vcpus=1 -- EMULATED",
        f"   fork source: cold boot {fmt(src_wall)} ms wall, {src.memory_mib} MiB; warmed with python3 -c 'import json, decimal'",
        f"   FULL branch {FORK_TAG}: pause_ms {fmt(br.pause_ms)} (VMM-reported), round trip {fmt(br_wall)} ms, "
        f"bytes_written {mib(br.bytes_written)} MiB, snapshot memory_mib {snap.memory_mib}, image {snap.image or '(empty)'}",
        f"   untimed warm-up fork n=1 (the first fork of a tag loads and verifies its memory): wall {fmt(wu_wall)} ms "
        "-- NOT in the figures below",
        "",
    )
    rows = []
    for n in ns:
        for kind in ("fork", "cold"):
            rs = sel(kind, n)
            if not rs:
                continue
            boots = [x for r in rs for x in r["boots"]]
            rows.append([
                f"{kind} n={n}", fmt(medof(rs, "wall")), fmt(medof(rs, "elapsed")), *mmm(boots),
                fmt(medof(rs, "first_exec")), fmt(medof(rs, "second_exec")), fmt(medof(rs, "delete")),
                f"{n / (medof(rs, 'wall') or 1) * 1000:.2f}",  # type: ignore[operator]
            ])  # fmt: skip
    reps = f"median of {args.reps} reps; " if args.reps > 1 else ""
    out(
        table(
            f"   SpawnSandboxes, then Exec `true` twice in the first sandbox, then delete all ({reps}ms, EMULATED; "
            "boot_ms pooled over the sandboxes)",
            ["", "wall", "elapsed_ms", "boot min", "boot med", "boot max", "1st Exec", "2nd Exec", "delete all", "sandboxes/s"],
            rows,
        ),
        "",
    )
    cold1 = medof(sel("cold", 1), "wall")
    rrows = []
    for n in args.fork_ns:
        f, c = sel("fork", n), sel("cold", n)
        fw = medof(f, "wall")
        if c:
            rrows.append([
                f"n={n}", "measured", ratio(medof(c, "wall"), fw), ratio(medof(c, "elapsed"), medof(f, "elapsed")),
                ratio(med([x for r in c for x in r["boots"]]), med([x for r in f for x in r["boots"]])),
                ratio(medof(c, "first_exec"), medof(f, "first_exec")),
            ])  # fmt: skip
        else:
            rrows.append([
                f"n={n}", "SERIAL-EQUIVALENT (n x cold n=1 wall), not measured",
                ratio(n * cold1 if cold1 is not None else None, fw), "—", "—", "—",
            ])  # fmt: skip
    if rrows:
        out(
            table(
                "   ratio cold / fork (medians; > 1: the fork is faster)",
                ["", "cold side", "wall", "elapsed_ms", "boot_ms", "1st Exec"],
                rrows,
            ),
            "",
        )


# ---- 3. LIVE against FULL pause --------------------------------------------------


def live_vs_full(b: ForkBench, args: argparse.Namespace) -> None:
    med = statistics.median
    log(f"cold boot of a {args.live_memory_mib} MiB {IMAGE} sandbox, vcpus=1")
    wall, sbs, _ = b.spawn_n(1, image=IMAGE, vcpus=1, memory_mib=args.live_memory_mib)
    sid = sbs[0].id

    def mem_available() -> int | None:
        code, data = b.run_cmd(sid, ["cat", "/proc/meminfo"])
        for line in data.decode(errors="replace").splitlines():
            if code == 0 and line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return None

    avail0 = mem_available()
    log(f"{sid} up in {wall:.0f} ms; MemAvailable {mib(avail0 or 0)} MiB; filling {args.fill_mib} MiB")
    code, _ = b.run_cmd(sid, ["python3", "-c", FILLER, str(args.fill_mib)])
    if code != 0:
        raise RuntimeError(f"starting the filler in {sid} exited {code}")
    deadline = time.monotonic() + 1800
    pid = ""
    while True:
        code, data = b.run_cmd(sid, ["cat", FILL_READY])
        if code == 0 and data.strip().isdigit():
            pid = data.decode().strip()
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the filler in {sid} did not get ready within 1800 s")
        time.sleep(2)
    avail1 = mem_available()
    log(f"filler pid {pid} ready; MemAvailable {mib(avail1 or 0)} MiB")

    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for mode in (FULL, LIVE):
            name = MODE_NAMES[mode]
            tag = f"bench-{name.lower()}-{r + 1}"
            rt, resp = b.branch(sid, tag, mode)
            rec: dict[str, Any] = {"round": r + 1, "mode": name, "pause": resp.pause_ms, "rt": rt, "bytes": resp.bytes_written,
                   "faults": resp.faults_served, "memory_bytes": resp.snapshot.memory_bytes}  # fmt: skip
            rounds.append(rec)
            log(
                f"round {r + 1}/{args.rounds} {name}: pause_ms {resp.pause_ms:.1f}, round trip {rt:.0f} ms, "
                f"bytes_written {mib(resp.bytes_written)} MiB, faults_served {resp.faults_served}"
            )
            b.delete_snapshot(tag)
    code, _ = b.run_cmd(sid, ["sh", "-c", f"test -d /proc/{pid}"])
    if code != 0:
        raise RuntimeError(f"the filler (pid {pid}) in {sid} died during the branches: the figures are not for a filled guest")
    b.delete(sid)

    def col(mode: str, key: str) -> list[float]:
        return [float(x[key]) for x in rounds if x["mode"] == mode]

    rows = []
    for m in ("FULL", "LIVE"):
        after = [a - p for a, p in zip(col(m, "rt"), col(m, "pause"))]
        rows.append([
            m, *mmm(col(m, "pause")), *mmm(col(m, "rt")), fmt(med(after)),
            mib(med(col(m, "bytes"))), mib(med(col(m, "memory_bytes"))), f"{med(col(m, 'faults')):.0f}",
        ])  # fmt: skip
    per = [
        [f"round {x['round']} {x['mode']}", fmt(x["pause"]), fmt(x["rt"]), mib(x["bytes"]), str(x["faults"])]
        for x in rounds
    ]
    fp, lp = med(col("FULL", "pause")), med(col("LIVE", "pause"))
    out(
        f"3. LIVE vs FULL branch pause of a {args.live_memory_mib} MiB {IMAGE} guest, vcpus=1 -- EMULATED",
        f"   {args.fill_mib} MiB held by a background python3 (pid {pid}); MemAvailable {mib(avail0 or 0)} MiB before the "
        f"fill, {mib(avail1 or 0)} MiB after",
        f"   {args.rounds} rounds of FULL then LIVE (wait=true), each snapshot deleted right after; "
        "pause_ms is VMM-reported (vCPUs stopped until they run again)",
        "",
        table(
            "   BranchSandbox (ms, EMULATED; LIVE round trip includes the background copy, as wait=true waits for it)",
            ["", "pause min", "pause med", "pause max", "rt min", "rt med", "rt max", "rt - pause med",
             "written MiB", "memory MiB", "faults"],  # fmt: skip
            rows,
        ),
        "",
        table("   per branch", ["", "pause_ms", "round trip", "written MiB", "faults_served"], per),
        "",
        f"   ratio FULL/LIVE median pause_ms: {ratio(fp, lp)}; LIVE/FULL median round trip: "
        f"{ratio(med(col('LIVE', 'rt')), med(col('FULL', 'rt')))}",
        "",
    )


# ---- driver --------------------------------------------------------------------


def run(args: argparse.Namespace, command: str) -> None:
    forkd = Path(args.forkd).resolve()
    images = lb.need_image(args.images_dir)
    t_start = time.monotonic()
    with SvmHost() as host:
        assert host.agent is not None
        log(f"SVM test host up ({host.uname}), run dir {host.run_dir}")
        copy_s = lb.copy_image(host, images)

        def measure(bench: ForkBench) -> None:
            out(
                "forkd Linux fork vs cold boot, LIVE vs FULL branch -- EMULATED on the SVM test host (QEMU TCG, -cpu max, 1 vCPU)",
                f"command: {command}",
                f"SVM test host: {host.uname}; image copied into its tmpfs in {copy_s:.0f}s",
                "absolute times are NOT speed claims (TCG is 10-50x slower than native); compare ratios within this run only",
                "",
            )
            fork_vs_cold(bench, args)
            live_vs_full(bench, args)

        # Children share their snapshot's memory copy-on-write, but the
        # daemon commits each one's full RAM against --max-guest-memory-mib
        # (by default the machine's 16 GiB): 50 children of 512 MiB need more.
        lb.with_daemon(host, forkd, ForkBench, measure, ["--max-guest-memory-mib", "65536"])
    log(f"done in {time.monotonic() - t_start:.0f}s (SVM test host stopped)")


def ns_list(s: str) -> list[int]:
    try:
        ns = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: want comma-separated integers") from None
    if any(n < 1 or n > 1000 for n in ns):
        raise argparse.ArgumentTypeError(f"{s!r}: every n must be from 1 to 1000")
    return ns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fork-ns", type=ns_list, default=[1, 10, 50], help="children per fork spawn (default 1,10,50)")
    ap.add_argument(
        "--cold-ns", type=ns_list, default=[1, 10],
        help="sandboxes per cold-boot spawn (default 1,10; 50 cold Linux boots under TCG take very long: opt in with 1,10,50)",
    )
    ap.add_argument("--reps", type=int, default=1, help="repetitions of every fork and cold spawn (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="FULL+LIVE branch rounds (default 3)")
    ap.add_argument("--live-memory-mib", type=int, default=1024, help="RAM of the LIVE/FULL guest (default 1024)")
    ap.add_argument("--fill-mib", type=int, default=600, help="MiB held by the background filler in it (default 600)")
    ap.add_argument("--forkd", default=str(REPO / "target" / "release" / "forkd"))
    ap.add_argument(
        "--images-dir",
        default=os.environ.get("FORKD_IMAGES_DIR", str(Path.home() / ".cache" / "forkd" / "images")),
        help=f"where `forkd image build` put {IMAGE} (on this machine)",
    )
    args = ap.parse_args()
    if not args.fork_ns:
        ap.error("--fork-ns must name at least one n")
    if args.reps < 1 or args.rounds < 1 or args.fill_mib < 1:
        ap.error("--reps, --rounds and --fill-mib must be at least 1")
    if args.fill_mib >= args.live_memory_mib:
        ap.error("--fill-mib must be well below --live-memory-mib")
    return lb.run_to_end(run, args, "sandboxes, snapshots, daemon and SVM test host cleaned up")


if __name__ == "__main__":
    sys.exit(main())
