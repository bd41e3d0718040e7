"""Snapshots and copy-on-write fan-out, through grpcurl against real
daemons and real microVMs: CreateSnapshot, BranchSandbox FULL and DIFF,
SpawnSandboxes from a snapshot, Get/List/Delete/WatchSnapshot, corruption
(DATA_LOSS), a daemon killed in the middle of a branch, and a restarted
daemon.

Memory contents are checked with the guest's `fill MIB SEED` (a
deterministic pattern from 0x2000000 up) and `checksum [MIB]` (16 hex
digits over the first MIB MiB of that region); the `dirty` writer and
`verify` check that a snapshot is one consistent point in time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from forkd_daemon import (
    BRANCH,
    CREATE,
    DELETE_SNAP,
    GET_SNAP,
    MIB,
    PAGE,
    SPAWN,
    WATCH_SNAP,
    Daemon,
    kill_leftovers,
    orphaned_vmms,
    reap_orphans,
    still_running,
    wait_until,
)

READY = "SNAPSHOT_STATUS_READY"
FAILED = "SNAPSHOT_STATUS_FAILED"
FULL = "BRANCH_MODE_FULL"
DIFF = "BRANCH_MODE_DIFF"
LIVE = "BRANCH_MODE_LIVE"
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{16}$")
# Where `fill` writes, in guest-physical terms; a snapshot's `memory` file
# is laid out by guest-physical address.
FILL_ADDR = 0x200_0000


# ---- helpers -----------------------------------------------------------------


def checksum(d: Daemon, sandbox_id: str, mib: int | None = None) -> str:
    argv = ["checksum"] if mib is None else ["checksum", str(mib)]
    out = d.exec_ok(sandbox_id, argv).decode().strip()
    assert DIGEST_RE.match(out), f"checksum printed {out!r}"
    return out


def checksums(d: Daemon, sandbox_ids, mib: int | None = None) -> dict[str, str]:
    argv = ["checksum"] if mib is None else ["checksum", str(mib)]
    out = {}
    for sid, r in d.exec_many(list(sandbox_ids), argv).items():
        assert r.exit_code == 0, (sid, r)
        out[sid] = r.stdout.decode().strip()
        assert DIGEST_RE.match(out[sid]), (sid, r.stdout)
    return out


def fill(d: Daemon, sandbox_id: str, mib: int, seed: int) -> None:
    out = d.exec_ok(sandbox_id, ["fill", str(mib), str(seed)])
    assert out == f"filled {mib} MiB with seed {seed}\n".encode(), out


def stat(d: Daemon, sandbox_id: str) -> dict[str, str]:
    """`stat` as a dict: `writer=running pages=256 rate=10000 seq=N` and
    the one-pair lines."""
    fields = {}
    for token in d.exec_ok(sandbox_id, ["stat"]).decode().split():
        key, _, value = token.partition("=")
        fields[key] = value
    return fields


def u64(msg: dict, key: str) -> int:
    # proto3 JSON: uint64 is a string, zero is left out.
    return int(msg.get(key, 0))


def smaps_rollup(d: Daemon, pid: int) -> dict[str, int]:
    """KiB figures of /proc/<pid>/smaps_rollup on the daemon's machine."""
    out = {}
    for line in d.machine.path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def assert_snapshot_files(d: Daemon, tag: str, memory_mib: int, diff: bool) -> None:
    sdir = d.snapshot_dir(tag)
    assert sdir.is_dir(), f"{sdir} missing\n{d.log_tail()}"
    for name in ("manifest.json", "vmstate", "memory") + (("pages",) if diff else ()):
        assert (sdir / name).is_file(), f"{sdir / name} missing: {sorted(p.name for p in sdir.iterdir())}"
    mem = sdir / "memory"
    assert mem.stat().st_size == memory_mib * MIB, f"{mem} is {mem.stat().st_size} bytes"
    manifest = json.loads((sdir / "manifest.json").read_text())
    assert tag in json.dumps(manifest), f"manifest does not name {tag}: {manifest}"


def assert_gone(d: Daemon, tag: str) -> None:
    d.client.expect_error("NOT_FOUND", GET_SNAP, {"tag": tag})
    assert not d.snapshot_dir(tag).exists(), (
        f"{d.snapshot_dir(tag)} still exists: {list(d.snapshot_dir(tag).iterdir())}"
    )
    assert tag not in [s["tag"] for s in d.list_snapshots()]


def manifests_naming(d: Daemon, tag: str) -> list[tuple[Path, dict]]:
    """Every manifest under snapshots/ (any directory name) whose tag is
    `tag`."""
    out = []
    root = d.data_dir / "snapshots"
    if not root.is_dir():
        return out
    for m in root.glob("*/manifest.json"):
        try:
            data = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("tag") == tag:
            out.append((m, data))
    return out


def status_word(manifest: dict) -> str:
    return str(manifest.get("status", "")).upper()


def restart(daemon_factory, old: Daemon) -> Daemon:
    """A new daemon (same test, same teardown checks) on the old one's data
    directory."""
    assert not old.running()
    return daemon_factory(data_dir=old.data_dir)


# ---- fan-out from one warm parent ---------------------------------------------


@pytest.mark.parametrize("how", ["create", pytest.param("branch", marks=pytest.mark.svm)])
def test_twenty_children_share_the_parents_memory(daemon, how):
    """A 512 MiB parent runs `fill 256 42` and is snapshotted (CreateSnapshot
    with warm-up, or a FULL branch of a running sandbox); 20 children from
    one SpawnSandboxes call all report the parent's checksum, share its
    pages, and a child's own `fill` changes neither its siblings nor the
    parent."""
    d = daemon
    tag = f"warm-{how}"
    if how == "create":
        resp = d.create_snapshot(tag, memory_mib=512, warmup=[["fill", "256", "42"]], keep_running=True)
        parent = resp["sandboxId"]
        assert parent, resp
    else:
        [sb] = d.spawn(1, memoryMib=512)
        parent = sb["id"]
        fill(d, parent, 256, 42)
        resp = d.branch(parent, tag, FULL)
        assert resp["pauseMs"] > 0, resp
        # FULL writes every non-zero page: at least the 256 MiB filled.
        assert 256 * MIB <= u64(resp, "bytesWritten") < 512 * MIB, resp
    snap = resp["snapshot"]
    assert snap["tag"] == tag, snap
    assert snap["status"] == READY, snap
    assert snap["mode"] == FULL, snap
    assert snap.get("parentTag", "") == "", snap
    assert snap["sourceSandboxId"] == parent, snap
    assert (snap["memoryMib"], snap["vcpus"]) == (512, 2), snap
    assert snap["chain"] == [tag], snap
    assert_snapshot_files(d, tag, 512, diff=False)
    mem = d.snapshot_dir(tag) / "memory"
    # Sparse: the 256 MiB written, not the 512 MiB of RAM.
    assert 256 * MIB <= allocated_bytes(mem) < 320 * MIB, allocated_bytes(mem)
    assert d.get(parent)["state"] == "SANDBOX_STATE_RUNNING"
    parent_sum = checksum(d, parent)
    assert parent_sum == checksum(d, parent, 256)

    children = d.spawn(20, snapshotTag=tag)
    ids = [c["id"] for c in children]
    assert len(set(ids)) == 20 and parent not in ids, ids
    pids = {c["vmmPid"] for c in children}
    assert len(pids) == 20 and d.get(parent)["vmmPid"] not in pids, pids
    for c in children:
        assert c["state"] == "SANDBOX_STATE_RUNNING", c
        assert c["snapshotTag"] == tag, c
        assert (c["memoryMib"], c["vcpus"]) == (512, 2), c
    got = d.get_snapshot(tag)
    assert sorted(got.get("children", [])) == sorted(ids), got

    # Every child resumes with the parent's memory: same checksum, and the
    # guest's own record of the fill came along.
    sums = checksums(d, ids)
    assert set(sums.values()) == {parent_sum}, sums
    st = stat(d, ids[0])
    assert (st["memory_mib"], st["filled_mib"], st["fill_seed"]) == ("512", "256", "42"), st

    # Reading 256 MiB copied nothing: the pages are the snapshot's, shared.
    for c in children[:5]:
        m = smaps_rollup(d, c["vmmPid"])
        assert m["Anonymous"] < 32 * 1024, f"child {c['id']} holds {m['Anonymous']} KiB anonymous: {m}"

    # A child's own fill is private to it.
    first, siblings = ids[0], ids[1:]
    fill(d, first, 256, 7)
    own = checksum(d, first)
    assert own != parent_sum
    assert smaps_rollup(d, children[0]["vmmPid"])["Anonymous"] >= 256 * 1024
    after = checksums(d, siblings)
    assert set(after.values()) == {parent_sum}, after
    assert checksum(d, parent) == parent_sum
    # And so is the parent's.
    fill(d, parent, 256, 8)
    assert checksum(d, parent) not in (parent_sum, own)
    assert set(checksums(d, siblings[:3]).values()) == {parent_sum}
    assert checksum(d, first) == own


@pytest.mark.svm
def test_dirty_writer_goes_on_in_every_child(daemon):
    """A `dirty` writer running on vCPU 1 when the parent is branched keeps
    running in every child, and `verify` finds one consistent cut there."""
    d = daemon
    [src] = d.spawn(1, memoryMib=64)
    sid = src["id"]
    out = d.exec_ok(sid, ["dirty", "256", "10000"])
    assert out == b"writer started: pages=256 rate=10000/s on vcpu 1\n", out
    time.sleep(0.3)
    st = stat(d, sid)
    assert st["writer"] == "running", st
    seq_before = int(st["seq"])
    assert seq_before > 0, st

    d.branch(sid, "writer", FULL)
    st = stat(d, sid)
    assert st["writer"] == "running" and int(st["seq"]) > seq_before, st

    children = d.spawn(3, snapshotTag="writer")
    for c in children:
        cid = c["id"]
        first = stat(d, cid)
        assert first["writer"] == "running", (cid, first)
        assert (first["pages"], first["rate"]) == ("256", "10000"), (cid, first)
        # The child starts from the parent's writer state at the branch.
        assert int(first["seq"]) >= seq_before, (cid, first, seq_before)
        # The writer moves on (polled: on a slow host vCPU 1 may wait for
        # the CPU a while).
        seen = [first]
        assert wait_until(
            lambda: int(seen.append(stat(d, cid)) or seen[-1]["seq"]) > int(first["seq"]),
            10 * d.machine.slowness,
            interval=0.1,
        ), (cid, first, seen[-1])
        second = seen[-1]
        r = d.exec(cid, ["verify"])
        assert r.exit_code == 0, (cid, r)
        m = re.fullmatch(rb"verify ok: seq=(\d+) pages=256 consistent\n", r.stdout)
        assert m, (cid, r.stdout, r.stderr)
        assert int(m.group(1)) >= int(second["seq"]), (cid, r.stdout, second)
        # verify restarts the writer.
        third = stat(d, cid)
        assert third["writer"] == "running" and int(third["seq"]) >= int(m.group(1)), third
    r = d.exec(sid, ["verify"])
    assert r.exit_code == 0 and r.stdout.startswith(b"verify ok: "), r


# ---- branches of a running sandbox ---------------------------------------------


@pytest.mark.svm
def test_full_and_diff_branches_capture_the_branch_instant(daemon):
    """FULL and DIFF branches of a running sandbox: children of each show the
    memory of the branch instant, while the source has changed since."""
    d = daemon
    [src] = d.spawn(1, memoryMib=256)
    sid = src["id"]
    fill(d, sid, 64, 1)
    sum_full = checksum(d, sid, 64)

    full = d.branch(sid, "pit-full", FULL)
    fs = full["snapshot"]
    assert (fs["tag"], fs["status"], fs["mode"]) == ("pit-full", READY, FULL), full
    assert fs.get("parentTag", "") == "" and fs["chain"] == ["pit-full"], fs
    assert full["pauseMs"] > 0, full
    full_bytes = u64(full, "bytesWritten")
    assert 64 * MIB <= full_bytes < 96 * MIB, full

    # 16 MiB change between the branches.
    fill(d, sid, 16, 2)
    sum_diff = checksum(d, sid, 64)
    assert sum_diff != sum_full
    diff = d.branch(sid, "pit-diff", DIFF)
    ds = diff["snapshot"]
    assert (ds["tag"], ds["status"], ds["mode"]) == ("pit-diff", READY, DIFF), diff
    assert ds["parentTag"] == "pit-full", ds
    assert ds["chain"] == ["pit-diff", "pit-full"], ds
    assert diff["pauseMs"] > 0, diff
    dirty = u64(diff, "dirtyPages")
    assert 16 * MIB // PAGE <= dirty < 32 * MIB // PAGE, diff
    diff_bytes = u64(diff, "bytesWritten")
    assert 16 * MIB <= diff_bytes < 32 * MIB, diff
    assert diff_bytes < full_bytes
    assert_snapshot_files(d, "pit-diff", 256, diff=True)
    # The diff's memory file holds only its own pages.
    assert allocated_bytes(d.snapshot_dir("pit-diff") / "memory") < 40 * MIB
    assert d.get_snapshot("pit-full").get("dependents", []) == ["pit-diff"]

    # The source moves on; a FULL with measure_diff counts what changed
    # since its last snapshot (pit-diff).
    fill(d, sid, 16, 3)
    sum_full2 = checksum(d, sid, 64)
    assert sum_full2 not in (sum_full, sum_diff)
    full2 = d.branch(sid, "pit-full2", FULL, measureDiff=True)
    f2 = full2["snapshot"]
    assert (f2["mode"], f2.get("parentTag", "")) == (FULL, ""), full2
    assert 16 * MIB // PAGE <= u64(full2, "dirtyPages") < 32 * MIB // PAGE, full2
    fill(d, sid, 8, 4)
    sum_now = checksum(d, sid, 64)
    assert sum_now not in (sum_full, sum_diff, sum_full2)

    for tag, want in (("pit-full", sum_full), ("pit-diff", sum_diff), ("pit-full2", sum_full2)):
        kids = d.spawn(2, snapshotTag=tag)
        got = checksums(d, [k["id"] for k in kids], 64)
        assert set(got.values()) == {want}, (tag, got, want)
    assert checksum(d, sid, 64) == sum_now


@pytest.mark.svm
def test_diff_chain_of_depth_three(daemon):
    """FULL, then DIFF, DIFF, DIFF with memory changes in between (and the
    dirty writer running throughout): a child of each level shows that
    level's memory and a consistent writer; GetSnapshot shows the chain."""
    d = daemon
    [src] = d.spawn(1, memoryMib=128)
    sid = src["id"]
    fill(d, sid, 64, 10)
    # A child's writer catches up to the TSC before it is looked at; on a
    # slower machine it writes slower too, so the rate is scaled down.
    d.exec_ok(sid, ["dirty", "64", str(round(5000 / d.machine.slowness))])
    sums = {"c0": checksum(d, sid, 64)}
    # Each level's writer seq is read before its branch: a child resumes at
    # the snapshot's seq or later, whatever the guest's clock did meanwhile.
    seq_at = {"c0": int(stat(d, sid)["seq"])}
    r0 = d.branch(sid, "c0", FULL)
    assert r0["snapshot"]["mode"] == FULL
    # Each level overwrites a shorter prefix, so a child of c3 needs pages of
    # every level: c3 [0,2) MiB, c2 [2,4), c1 [4,8), c0 the rest.
    levels = [
        ("c1", 8, 11, {"mode": DIFF}),
        ("c2", 4, 12, {"mode": None, "diff": True}),  # the legacy spelling
        ("c3", 2, 13, {"mode": DIFF, "diff": True}),  # both, agreeing
    ]
    parent = "c0"
    for tag, mib, seed, how in levels:
        fill(d, sid, mib, seed)
        sums[tag] = checksum(d, sid, 64)
        seq_at[tag] = int(stat(d, sid)["seq"])
        resp = d.branch(sid, tag, **how)
        s = resp["snapshot"]
        assert (s["tag"], s["status"], s["mode"], s["parentTag"]) == (tag, READY, DIFF, parent), resp
        assert u64(resp, "dirtyPages") >= mib * MIB // PAGE, resp
        assert mib * MIB <= u64(resp, "bytesWritten") < (mib + 16) * MIB, resp
        parent = tag
    assert len(set(sums.values())) == 4, sums
    fill(d, sid, 1, 14)
    assert checksum(d, sid, 64) not in sums.values()

    c3 = d.get_snapshot("c3")
    assert c3["chain"] == ["c3", "c2", "c1", "c0"], c3
    assert c3["parentTag"] == "c2" and c3["mode"] == DIFF, c3
    assert c3.get("dependents", []) == [], c3
    c0 = d.get_snapshot("c0")
    assert c0["chain"] == ["c0"] and c0.get("dependents", []) == ["c1"], c0
    assert d.get_snapshot("c1").get("dependents", []) == ["c2"]
    assert d.get_snapshot("c2")["chain"] == ["c2", "c1", "c0"]
    listed = {s["tag"]: s for s in d.list_snapshots()}
    assert set(listed) == {"c0", "c1", "c2", "c3"}, listed
    assert all(s["status"] == READY for s in listed.values()), listed

    for tag in ("c0", "c1", "c2", "c3"):
        [kid] = d.spawn(1, snapshotTag=tag)
        kid_id = kid["id"]
        assert checksum(d, kid_id, 64) == sums[tag], tag
        st = stat(d, kid_id)
        print(f"child of {tag}: writer seq {st['seq']}, source's before the branch {seq_at[tag]}")
        assert st["writer"] == "running" and int(st["seq"]) >= seq_at[tag], (tag, st, seq_at)
        r = d.exec(kid_id, ["verify"])
        assert r.exit_code == 0 and re.fullmatch(rb"verify ok: seq=\d+ pages=64 consistent\n", r.stdout), (tag, r)
        d.delete(kid_id)

    # A leaf goes alone; the root takes the rest with cascade.
    assert d.delete_snapshot("c3") == ["c3"]
    deleted = d.delete_snapshot("c0", cascade=True)
    assert sorted(deleted) == ["c0", "c1", "c2"] and deleted[-1] == "c0", deleted
    for tag in ("c0", "c1", "c2", "c3"):
        assert_gone(d, tag)


# ---- corruption -----------------------------------------------------------------


@pytest.mark.svm
def test_flipped_byte_in_memory_file_is_data_loss(daemon_factory):
    """One flipped byte inside the data of a snapshot's `memory` file: the
    next spawn from it fails with DATA_LOSS and starts nothing (and the
    snapshot is FAILED from then on), while an
    intact snapshot beside it still spawns. The byte is flipped while the
    daemon is stopped, so the restarted daemon has to load the file."""
    d = daemon_factory()
    intact = d.create_snapshot("intact", memory_mib=64, warmup=[["fill", "16", "5"]], keep_running=True)
    want = checksum(d, intact["sandboxId"])
    d.create_snapshot("corrupt", memory_mib=64, warmup=[["fill", "16", "5"]])
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log_tail()
    assert d.leftover_vmms() == []

    mem = d.snapshot_dir("corrupt") / "memory"
    size = mem.stat().st_size
    offset = FILL_ADDR + 0x12345  # inside the 16 MiB that were filled
    with mem.open("r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    assert mem.stat().st_size == size

    d2 = restart(daemon_factory, d)
    res = d2.client.expect_error("DATA_LOSS", SPAWN, {"snapshotTag": "corrupt", "n": 3})
    assert res.message, res.describe()
    assert d2.list() == [], "a spawn that failed with DATA_LOSS must leave no sandbox"
    assert d2.vmm_children() == []
    [kid] = d2.spawn(1, snapshotTag="intact")
    assert checksum(d2, kid["id"]) == want
    # Still refused on a second try: the first load marked it FAILED (with
    # the mismatch as reason; its files are kept), nothing was cached.
    res = d2.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "corrupt", "n": 1})
    assert "does not match its SHA-256" in res.message, res.describe()
    assert d2.get_snapshot("corrupt")["status"] == FAILED
    assert [s["id"] for s in d2.list()] == [kid["id"]]


# ---- delete -----------------------------------------------------------------------


@pytest.mark.svm
def test_delete_snapshot_dependents_children_cascade_force(daemon):
    d = daemon
    [src] = d.spawn(1, memoryMib=128)
    sid = src["id"]
    fill(d, sid, 8, 1)
    d.branch(sid, "d0", FULL)
    fill(d, sid, 4, 2)
    sum_d1 = checksum(d, sid, 8)
    assert d.branch(sid, "d1", DIFF)["snapshot"]["parentTag"] == "d0"

    # A dependent blocks the delete, and the message names it.
    res = d.client.expect_error("FAILED_PRECONDITION", DELETE_SNAP, {"tag": "d0"})
    assert "d1" in res.message, res.describe()
    for tag in ("d0", "d1"):
        assert d.get_snapshot(tag)["status"] == READY
        assert d.snapshot_dir(tag).is_dir()

    # So does a running child, even with cascade (it maps d1, and d0 below).
    [kid] = d.spawn(1, snapshotTag="d1")
    assert checksum(d, kid["id"], 8) == sum_d1
    d.client.expect_error("FAILED_PRECONDITION", DELETE_SNAP, {"tag": "d1"})
    d.client.expect_error("FAILED_PRECONDITION", DELETE_SNAP, {"tag": "d0", "cascade": True})
    assert d.get_snapshot("d1")["children"] == [kid["id"]]
    d.delete(kid["id"])

    deleted = d.delete_snapshot("d0", cascade=True)
    assert deleted == ["d1", "d0"], deleted
    assert_gone(d, "d0")
    assert_gone(d, "d1")

    # force deletes a snapshot that a running child maps; the child goes on.
    fill(d, sid, 8, 3)
    sum_f0 = checksum(d, sid, 8)
    d.branch(sid, "f0", FULL)
    [kid] = d.spawn(1, snapshotTag="f0")
    d.client.expect_error("FAILED_PRECONDITION", DELETE_SNAP, {"tag": "f0"})
    assert d.delete_snapshot("f0", force=True) == ["f0"]
    assert_gone(d, "f0")
    assert d.get(kid["id"])["state"] == "SANDBOX_STATE_RUNNING"
    assert d.exec_ok(kid["id"], ["echo", "orphan"]) == b"orphan\n"
    assert checksum(d, kid["id"], 8) == sum_f0

    # The source's base is gone: a DIFF must either be refused or produce a
    # snapshot that spawns correctly, never one that cannot be used.
    fill(d, sid, 2, 4)
    sum_now = checksum(d, sid, 8)
    res = d.client.run([BRANCH], {"sandboxId": sid, "tag": "after-base", "mode": DIFF})
    if res.code == "OK":
        [late] = d.spawn(1, snapshotTag="after-base")
        assert checksum(d, late["id"], 8) == sum_now
    else:
        assert res.code == "FAILED_PRECONDITION", res.describe()


# ---- the daemon dies or restarts ------------------------------------------------------


def test_sigkill_during_full_branch(daemon_factory):
    """kill -9 of the daemon ~50-100 ms into a FULL branch of a 2 GiB guest
    with 1 GiB filled; after a restart on the same data directory there is
    no READY snapshot of that tag, the earlier snapshot of the same sandbox
    is READY and spawns with its memory, and no VMM is left."""
    d = daemon_factory()
    [src] = d.spawn(1, memoryMib=2048)
    sid = src["id"]
    fill(d, sid, 8, 9)
    sum_before = checksum(d, sid)
    d.branch(sid, "k-before", FULL)
    fill(d, sid, 1024, 10)

    snaps = d.data_dir / "snapshots"
    entries = set(os.listdir(snaps))
    vmms = d.vmm_children()
    assert [p.pid for p in vmms] == [src["vmmPid"]], vmms
    call = d.client.start(BRANCH, {"sandboxId": sid, "tag": "k-doomed", "mode": FULL})
    try:
        t0 = time.monotonic()
        # The branch has reached the daemon when something new appears under
        # snapshots/ (grpcurl itself needs ~20 ms to start and connect).
        seen = wait_until(lambda: set(os.listdir(snaps)) != entries, 0.3, interval=0.002)
        time.sleep(0.06)
        in_flight = call.proc.poll() is None
        t_kill = time.monotonic() - t0
        rc = d.kill9()
        res = call.wait(timeout=60)
    finally:
        call.kill()
    assert in_flight, (
        f"the FULL branch finished within {t_kill * 1e3:.0f} ms, before the SIGKILL: "
        f"{res.describe()}"
    )
    # Shown with -s, and with the report of a failure.
    print(f"SIGKILL {t_kill * 1e3:.0f} ms after grpcurl started; new entry under snapshots/ seen: {seen}")
    assert rc == -signal.SIGKILL, rc
    assert not res.ok, res.describe()

    # Restart at once, as a supervisor would; the old VMM may still be
    # finishing its write and must exit by itself (control socket EOF).
    d2 = restart(daemon_factory, d)

    def old_vmms_left():
        return [p for p in vmms if still_running(p)] + [
            p for p in orphaned_vmms() if p.state not in ("Z", "X")
        ]

    gone = wait_until(lambda: not old_vmms_left(), 30, interval=0.1)
    left = old_vmms_left()
    kill_leftovers(left)
    reap_orphans()
    assert gone, f"VMMs of the killed daemon still running 30 s later: {left}"

    def check_doomed():
        listed = {s["tag"]: s for s in d2.list_snapshots()}
        if "k-doomed" in listed:
            assert listed["k-doomed"]["status"] == FAILED, listed["k-doomed"]
        res = d2.client.run([GET_SNAP], {"tag": "k-doomed"})
        if res.ok:
            snap = res.messages[0]["snapshot"]
            assert snap["status"] == FAILED and snap.get("failureReason"), snap
        else:
            assert res.code == "NOT_FOUND", res.describe()
        for path, manifest in manifests_naming(d2, "k-doomed"):
            assert "READY" not in status_word(manifest), (path, manifest)
        assert d2.list_snapshots(READY) == [s for s in d2.list_snapshots() if s["status"] == READY]
        assert "k-doomed" not in [s["tag"] for s in d2.list_snapshots(READY)]
        return listed

    listed = check_doomed()
    print("after the restart:", {t: s["status"] for t, s in listed.items()},
          "on disk:", sorted(os.listdir(snaps)))
    assert listed["k-before"]["status"] == READY, listed
    assert d2.get_snapshot("k-before")["memoryMib"] == 2048
    # Nothing can be forked from the interrupted branch.
    code = "FAILED_PRECONDITION" if "k-doomed" in listed else "NOT_FOUND"
    d2.client.expect_error(code, SPAWN, {"snapshotTag": "k-doomed", "n": 1})
    [kid] = d2.spawn(1, snapshotTag="k-before")
    assert checksum(d2, kid["id"]) == sum_before
    assert [p.pid for p in d2.vmm_children()] == [kid["vmmPid"]]
    # A second look, now that nothing of the old daemon can still write.
    check_doomed()
    # The tag can be used again once its failed attempt is gone (or it is
    # refused as taken while a FAILED record keeps it).
    res = d2.client.run([BRANCH], {"sandboxId": kid["id"], "tag": "k-doomed", "mode": FULL})
    print("branching to the interrupted tag again:", res.code, res.message)
    if "k-doomed" in listed:
        assert res.code in ("OK", "ALREADY_EXISTS"), res.describe()
    else:
        assert res.ok, res.describe()


def test_restarted_daemon_lists_and_spawns_the_same_snapshots(daemon_factory):
    d = daemon_factory()
    r1 = d.create_snapshot("r1", memory_mib=128, warmup=[["fill", "16", "21"]], keep_running=True)
    sums = {"r1": checksum(d, r1["sandboxId"])}
    [src] = d.spawn(1, memoryMib=128)
    sid = src["id"]
    fill(d, sid, 16, 22)
    sums["r2"] = checksum(d, sid, 16)
    d.branch(sid, "r2", FULL)
    fill(d, sid, 4, 23)
    sums["r3"] = checksum(d, sid, 16)
    d.branch(sid, "r3", DIFF)
    before = {s["tag"]: s for s in d.list_snapshots()}
    assert set(before) == {"r1", "r2", "r3"}, before
    assert all(s["status"] == READY for s in before.values()), before

    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log_tail()
    assert d.leftover_vmms() == []

    d2 = restart(daemon_factory, d)
    after = {s["tag"]: s for s in d2.list_snapshots()}
    assert set(after) == set(before), (before, after)
    keys = ("status", "mode", "parentTag", "sourceSandboxId", "memoryMib", "vcpus",
            "memoryBytes", "createTime", "chain", "dependents")
    for tag in before:
        was = {k: before[tag].get(k) for k in keys}
        now = {k: after[tag].get(k) for k in keys}
        assert was == now, (tag, was, now)
        assert after[tag].get("children", []) == [], after[tag]
    assert after["r3"]["chain"] == ["r3", "r2"], after["r3"]
    assert [s["tag"] for s in d2.list_snapshots(READY)] == [s["tag"] for s in d2.list_snapshots()]
    assert d2.list_snapshots(FAILED) == []

    kids = {}
    for tag in ("r1", "r2", "r3"):
        [kid] = d2.spawn(1, snapshotTag=tag)
        kids[tag] = kid["id"]
        assert checksum(d2, kid["id"], 16) == sums[tag], tag
    # A child of the restored diff can itself be diffed against it.
    fill(d2, kids["r3"], 2, 24)
    sum_r4 = checksum(d2, kids["r3"], 16)
    r4 = d2.branch(kids["r3"], "r4", DIFF)["snapshot"]
    assert (r4["parentTag"], r4["chain"]) == ("r3", ["r4", "r3", "r2"]), r4
    [kid4] = d2.spawn(1, snapshotTag="r4")
    assert checksum(d2, kid4["id"], 16) == sum_r4


# ---- validation and the remaining API surface -----------------------------------------

BAD_TAGS = ["-lead", ".hidden", "_x", "a/b", "../up", "..", "x" * 65, "has space", "caf\u00e9", "a\nb"]


def test_bad_tags_invalid_argument(daemon):
    d = daemon
    [sb] = d.spawn(1)
    snaps = d.data_dir / "snapshots"
    on_disk = sorted(os.listdir(snaps)) if snaps.is_dir() else []
    for tag in BAD_TAGS:
        res = d.client.expect_error("INVALID_ARGUMENT", CREATE, {"tag": tag})
        assert res.message, res.describe()
        d.client.expect_error("INVALID_ARGUMENT", BRANCH, {"sandboxId": sb["id"], "tag": tag, "mode": FULL})
    assert d.list_snapshots() == []
    assert (sorted(os.listdir(snaps)) if snaps.is_dir() else []) == on_disk
    assert [s["id"] for s in d.list()] == [sb["id"]], "a refused CreateSnapshot must leave no sandbox"
    assert d.exec_ok(sb["id"], ["echo", "ok"]) == b"ok\n"


def test_reused_tag_already_exists_and_generated_tags(daemon):
    d = daemon
    tag = "Z9" + "._-a" * 15 + "zz"  # 64 characters, every allowed kind
    assert len(tag) == 64 and TAG_RE.match(tag)
    snap = d.create_snapshot(tag, memory_mib=64)["snapshot"]
    assert (snap["tag"], snap["status"], snap["memoryMib"]) == (tag, READY, 64), snap
    d.client.expect_error("ALREADY_EXISTS", CREATE, {"tag": tag, "memoryMib": 64})
    [sb] = d.spawn(1, memoryMib=64)
    d.client.expect_error("ALREADY_EXISTS", BRANCH, {"sandboxId": sb["id"], "tag": tag, "mode": FULL})
    assert [s["tag"] for s in d.list_snapshots()] == [tag]
    assert d.get(sb["id"])["state"] == "SANDBOX_STATE_RUNNING"

    # Forking must not change the guest's size.
    d.client.expect_error("INVALID_ARGUMENT", SPAWN, {"snapshotTag": tag, "n": 1, "memoryMib": 128})

    # WatchSnapshot of a READY snapshot: its status at once, then the end.
    msgs = d.client.stream(WATCH_SNAP, {"tag": tag})
    assert msgs and msgs[-1]["tag"] == tag and msgs[-1]["status"] == READY, msgs

    # No tag: one is generated, valid and unique.
    gen1 = d.create_snapshot(memory_mib=64)["snapshot"]["tag"]
    gen2 = d.branch(sb["id"], "", FULL)["snapshot"]["tag"]
    for g in (gen1, gen2):
        assert TAG_RE.match(g), g
    assert len({tag, gen1, gen2}) == 3
    assert sorted(s["tag"] for s in d.list_snapshots()) == sorted([tag, gen1, gen2])


def test_unknown_snapshot_not_found(daemon):
    c = daemon.client
    res = c.expect_error("NOT_FOUND", SPAWN, {"snapshotTag": "no-such-snap", "n": 2})
    assert res.message, res.describe()
    assert daemon.list() == [] and daemon.vmm_children() == []
    for method in (GET_SNAP, DELETE_SNAP, WATCH_SNAP):
        c.expect_error("NOT_FOUND", method, {"tag": "no-such-snap"})
    c.expect_error("NOT_FOUND", BRANCH, {"sandboxId": "sb-0000000000", "mode": FULL})
    assert daemon.list_snapshots() == []


def test_branch_mode_conflicts_and_diff_without_base(daemon):
    d = daemon
    [sb] = d.spawn(1)
    sid = sb["id"]
    # `diff` is the legacy spelling of DIFF: contradicting `mode` is refused.
    for mode in (FULL, LIVE):
        res = d.client.expect_error("INVALID_ARGUMENT", BRANCH, {"sandboxId": sid, "diff": True, "mode": mode})
        assert res.message, res.describe()
    # A cold-booted sandbox never snapshotted has no base for a DIFF.
    for req in ({"mode": DIFF}, {"diff": True}, {"diff": True, "mode": DIFF}):
        res = d.client.expect_error("FAILED_PRECONDITION", BRANCH, {"sandboxId": sid, **req})
        assert res.message, res.describe()
    assert d.list_snapshots() == []
    assert d.get(sid)["state"] == "SANDBOX_STATE_RUNNING"
    assert d.exec_ok(sid, ["echo", "fine"]) == b"fine\n"
    # Once it has a base, the same DIFF request works.
    d.branch(sid, "base", FULL)
    resp = d.branch(sid, "on-base", None, diff=True)
    assert (resp["snapshot"]["mode"], resp["snapshot"]["parentTag"]) == (DIFF, "base"), resp


def test_live_branch_validation_and_a_plain_live_branch(daemon):
    """wait=false is for LIVE only (FULL, DIFF and the default mode refuse
    it); LIVE checks tag, sandbox and tag reuse like the other modes; a
    LIVE branch of an idle sandbox gives a READY snapshot of its memory; and
    wait_for_snapshot with a READY snapshot or an unknown tag behaves as a
    plain fork."""
    d = daemon
    [sb] = d.spawn(1, memoryMib=128)
    sid = sb["id"]
    for req in ({"mode": FULL}, {"mode": DIFF}, {}, {"diff": True}):
        res = d.client.expect_error("INVALID_ARGUMENT", BRANCH, {"sandboxId": sid, "wait": False, **req})
        assert "wait" in res.message, res.describe()
    d.client.expect_error("INVALID_ARGUMENT", BRANCH, {"sandboxId": sid, "tag": "a/b", "mode": LIVE})
    d.client.expect_error("NOT_FOUND", BRANCH, {"sandboxId": "sb-0000000000", "mode": LIVE})
    d.client.expect_error("NOT_FOUND", BRANCH, {"sandboxId": "sb-0000000000", "mode": LIVE, "wait": False})
    assert d.list_snapshots() == []
    assert d.get(sid)["state"] == "SANDBOX_STATE_RUNNING"

    fill(d, sid, 32, 3)
    want = checksum(d, sid, 32)
    resp = d.branch(sid, "plain-live", LIVE)
    snap = resp["snapshot"]
    assert (snap["tag"], snap["status"], snap["mode"], snap["chain"]) == (
        "plain-live", READY, LIVE, ["plain-live"]), resp
    assert snap.get("parentTag", "") == "" and snap["sourceSandboxId"] == sid, snap
    assert resp["pauseMs"] > 0, resp
    assert 32 * MIB <= u64(resp, "bytesWritten") < 128 * MIB, resp
    assert_snapshot_files(d, "plain-live", 128, diff=False)
    d.client.expect_error("ALREADY_EXISTS", BRANCH, {"sandboxId": sid, "tag": "plain-live", "mode": LIVE})
    d.client.expect_error(
        "ALREADY_EXISTS", BRANCH, {"sandboxId": sid, "tag": "plain-live", "mode": LIVE, "wait": False})
    assert d.exec_ok(sid, ["echo", "still", "here"]) == b"still here\n"

    [kid] = d.spawn(1, snapshotTag="plain-live", waitForSnapshot=True)
    assert checksum(d, kid["id"], 32) == want
    d.client.expect_error("NOT_FOUND", SPAWN, {"snapshotTag": "no-such-snap", "n": 1, "waitForSnapshot": True})
    assert [s["tag"] for s in d.list_snapshots()] == ["plain-live"]
