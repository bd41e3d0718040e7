"""LIVE branches (userfaultfd write-protect), through grpcurl against real
daemons and real microVMs.

A LIVE BranchSandbox pauses the source only to save vCPU/device state and
arm write-protection, resumes it, and copies memory in the background; a
guest write to a page not copied yet is caught and the old page saved
first, so the snapshot is the branch instant. `wait=false` returns as soon
as the vCPUs run again, with the snapshot WRITING.

How the tests tell that a snapshot is the branch instant:
- the `dirty` writer runs on vCPU 1 of the source throughout, and a child's
  `verify` must find one consistent cut of it. The child's own writer goes
  on from the snapshot, and once it has gone round the whole ring every
  page holds a stamp of the child's own and nothing of the snapshot is
  left to check. The writer keeps to its rate by the TSC, which runs on
  while a snapshot waits to be forked, so a child's writer first catches
  up: by the time the child runs `verify` it has written about RATE x
  (time since the branch) stamps. So the writer runs at WRITER_RATE
  pages/s over WRITER_PAGES pages (6.8 s per round; 2500 pages/s for the
  quick unthrottled copies), and `verify_child` checks that the child's
  verified seq is less than one round past the source's seq read before
  the branch;
- since the child's catch-up rewrites exactly the pages a bad copy would
  have got wrong (the stamps after the snapshot's seq), `ring_cut` also
  reads the writer's ring straight out of the snapshot's `memory` file:
  its stamps must be one consistent cut, taken between the source's seq
  before the branch and its seq right after the reply;
- `fill` rewrites the source's memory while the copy runs (faults on pages
  the copier has not reached yet), and children must still `checksum` to
  the memory of the branch instant.

Fault cases need a copy that runs for seconds: those daemons get
`--live-copy-rate-mibps`, which limits the background copier (faults are
served at once whatever the limit).

The copy limit and the writer's rate are set by one pace (`live_pace`):
the copy and the writer are slowed down by the same factor, so a child
still verifies within the same part of a ring round while the copy window
grows. Here the pace is LOCAL_PACE, so that the few calls the tests make
while a copy runs fit in its window with a wide margin on a loaded host;
on a slower machine (the SVM test host, `machine.slowness` times slower)
the guest's own `fill` is slower too, and the pace is that slowness.
"""

from __future__ import annotations

import re
import signal
import struct
import time

import pytest

from forkd_daemon import (
    BRANCH,
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

WRITING = "SNAPSHOT_STATUS_WRITING"
READY = "SNAPSHOT_STATUS_READY"
FAILED = "SNAPSHOT_STATUS_FAILED"
FULL = "BRANCH_MODE_FULL"
DIFF = "BRANCH_MODE_DIFF"
LIVE = "BRANCH_MODE_LIVE"
RUNNING = "SANDBOX_STATE_RUNNING"
DIGEST_RE = re.compile(r"^[0-9a-f]{16}$")
# Where the writer's ring lives, in guest-physical terms (forkd-guest-abi
# RING_ADDR); a snapshot's `memory` file is laid out by guest-physical
# address.
RING_ADDR = 0x100_0000
VERIFY_RE = re.compile(rb"verify ok: seq=(\d+) pages=(\d+) consistent\n")

# The writer: 4096 pages (the largest ring) at 600 pages/s / pace: 27 s a
# round at LOCAL_PACE.
WRITER_PAGES = 4096
WRITER_RATE = 600
# Background copy limit of the rate-limited daemons, MiB/s / pace. A 512 MiB
# source with 128 MiB filled has ~150 MiB of data: a copy of ~9 s at
# LOCAL_PACE.
COPY_RATE_MIBPS = 64
LOCAL_PACE = 4


def live_pace(machine) -> float:
    """How much the copy limit and the writer are slowed down on `machine`."""
    return max(LOCAL_PACE, machine.slowness)


def copy_rate_args(machine) -> list[str]:
    """`--live-copy-rate-mibps` for a rate-limited daemon on `machine`."""
    return ["--live-copy-rate-mibps", str(max(1, round(COPY_RATE_MIBPS / live_pace(machine))))]


def writer_rate(d: Daemon, rate: int = WRITER_RATE) -> int:
    """A writer rate (pages/s) at `d`'s machine's pace; 0 (flat out) stays 0."""
    return rate and max(1, round(rate / live_pace(d.machine)))


# ---- helpers -----------------------------------------------------------------


def u64(msg: dict, key: str) -> int:
    # proto3 JSON: uint64 is a string, zero is left out.
    return int(msg.get(key, 0))


def fill(d: Daemon, sandbox_id: str, mib: int, seed: int) -> None:
    out = d.exec_ok(sandbox_id, ["fill", str(mib), str(seed)])
    assert out == f"filled {mib} MiB with seed {seed}\n".encode(), out


def checksum(d: Daemon, sandbox_id: str, mib: int) -> str:
    out = d.exec_ok(sandbox_id, ["checksum", str(mib)]).decode().strip()
    assert DIGEST_RE.match(out), f"checksum printed {out!r}"
    return out


def stat(d: Daemon, sandbox_id: str) -> dict[str, str]:
    fields = {}
    for token in d.exec_ok(sandbox_id, ["stat"]).decode().split():
        key, _, value = token.partition("=")
        fields[key] = value
    return fields


def seq(d: Daemon, sandbox_id: str) -> int:
    st = stat(d, sandbox_id)
    assert st["writer"] == "running", (sandbox_id, st)
    return int(st["seq"])


def writing_source(
    d: Daemon,
    memory_mib: int = 512,
    fill_mib: int = 128,
    seed: int = 1,
    rate: int = WRITER_RATE,
    **spawn_fields,
):
    """A running sandbox with `fill_mib` filled and the writer running at
    `rate` (scaled by `writer_rate`); returns (sandbox, checksum of the
    filled region). `spawn_fields` go into its SpawnSandboxes request."""
    rate = writer_rate(d, rate)
    [sb] = d.spawn(1, memoryMib=memory_mib, **spawn_fields)
    sid = sb["id"]
    fill(d, sid, fill_mib, seed)
    out = d.exec_ok(sid, ["dirty", str(WRITER_PAGES), str(rate)])
    assert out == f"writer started: pages={WRITER_PAGES} rate={rate}/s on vcpu 1\n".encode(), out
    assert wait_until(lambda: seq(d, sid) > 0, 5 * d.machine.slowness), stat(d, sid)
    return sb, checksum(d, sid, fill_mib)


def verify_child(d: Daemon, child_id: str, floor: int | None) -> int:
    """`verify` in a child: one consistent cut of the writer. `floor` is
    the source's seq read before the branch (at or below the snapshot's):
    the child's verified seq must be at or above it and less than one ring
    round past it, or the child's own writer has overwritten every stamp of
    the snapshot and the check proved nothing. Returns the verified seq."""
    r = d.exec(child_id, ["verify"])
    assert r.exit_code == 0, f"verify in {child_id}: exit {r.exit_code} {r.stdout!r} {r.stderr!r}"
    m = VERIFY_RE.fullmatch(r.stdout)
    assert m, (child_id, r.stdout, r.stderr)
    got, pages = int(m.group(1)), int(m.group(2))
    assert pages == WRITER_PAGES, r.stdout
    if floor is not None:
        assert got >= floor, f"child {child_id} verified seq {got}, below the source's {floor} before the branch"
        assert got - floor < WRITER_PAGES, (
            f"child {child_id} verified seq {got}, {got - floor} past the source's {floor} before "
            f"the branch: its writer went round the whole ring, so verify saw none of the snapshot"
        )
        print(f"verify in {child_id}: seq {got}, {got - floor} past the source's before the branch")
    return got


def expected_stamp(index: int, seq: int, pages: int) -> int:
    """What ring page `index` holds once stamps up to `seq` are written
    (the guest's `verify` rule)."""
    if seq < index:
        return 0
    return seq - (seq - index) % pages


def ring_cut(d: Daemon, tag: str, low: int, high: int) -> int:
    """Reads the writer's ring from READY snapshot `tag`'s memory file: the
    stamps must be one consistent cut at the largest stamp S (every page
    holds the largest s <= S in its slot, in both words; only the page being
    stamped when the vCPUs stopped may have its first word new and its last
    word old), and S must lie in [low, high]: after the source's seq read
    before the branch and not after its seq read once the vCPUs ran again.
    Returns S."""
    with (d.snapshot_dir(tag) / "memory").open("rb") as f:
        f.seek(RING_ADDR)
        data = f.read(WRITER_PAGES * PAGE)
    assert len(data) == WRITER_PAGES * PAGE, len(data)
    front = [struct.unpack_from("<Q", data, i * PAGE)[0] for i in range(WRITER_PAGES)]
    back = [struct.unpack_from("<Q", data, (i + 1) * PAGE - 8)[0] for i in range(WRITER_PAGES)]
    top = max(front)
    bad = []
    for i in range(WRITER_PAGES):
        want = expected_stamp(i, top, WRITER_PAGES)
        if front[i] == back[i] == want:
            continue
        in_flight = i == top % WRITER_PAGES and front[i] == want and back[i] == expected_stamp(
            i, top - 1, WRITER_PAGES
        )
        if not in_flight:
            bad.append((i, front[i], back[i], want))
    assert not bad, (
        f"snapshot {tag}: {len(bad)} ring pages break the cut at stamp {top} "
        f"(page, first word, last word, expected): {bad[:5]}"
    )
    assert low <= top <= high, f"snapshot {tag}: its writer cut is at {top}, outside [{low}, {high}]"
    print(f"snapshot {tag}: consistent writer cut at {top} (source seq {low} before, {high} after)")
    return top


def check_live_snapshot(snap: dict, tag: str, source_id: str, memory_mib: int, status: str) -> None:
    assert snap["tag"] == tag, snap
    assert snap["status"] == status, snap
    assert snap["mode"] == LIVE, snap
    assert snap.get("parentTag", "") == "", snap
    assert snap["chain"] == [tag], snap
    assert snap["sourceSandboxId"] == source_id, snap
    assert snap["memoryMib"] == memory_mib, snap


def check_watch_stream(
    msgs: list[dict], tag: str, *, min_total: int, max_total: int, from_writing: bool = True
) -> None:
    """WatchSnapshot of a LIVE snapshot followed from WRITING: WRITING at
    once, progress, READY last. With `from_writing=False` the watch may
    have started after the copy ended (a slow or loaded host): then READY
    alone is right too, and what progress there was is checked."""
    assert msgs, "WatchSnapshot sent nothing"
    statuses = [m.get("status") for m in msgs]
    assert all(m.get("tag") == tag for m in msgs), msgs
    assert statuses[-1] == READY, statuses
    assert FAILED not in statuses and READY not in statuses[:-1], statuses
    if not from_writing and statuses == [READY]:
        return
    assert statuses[0] == WRITING, statuses
    writing = [m for m in msgs if m.get("status") == WRITING]
    if from_writing:
        # The status at once, then progress about every 100 ms of a copy of seconds.
        assert len(writing) >= 3, f"too few progress messages: {msgs}"
    copied = [u64(m, "bytesCopied") for m in writing]
    assert copied == sorted(copied), f"bytes_copied went backwards: {copied}"
    assert copied[-1] > 0, msgs
    totals = {u64(m, "bytesTotal") for m in writing} - {0}
    assert len(totals) == 1, f"bytes_total changed during the copy: {sorted(totals)}"
    [total] = totals
    assert min_total <= total <= max_total, (total, min_total, max_total)
    assert max(copied) <= total, (copied, total)
    faults = [u64(m, "faultsServed") for m in writing]
    assert faults == sorted(faults), f"faults_served went backwards: {faults}"


# ---- the branch instant, wait=true and wait=false --------------------------------------


@pytest.mark.svm
def test_live_wait_true_child_is_the_branch_instant(daemon_factory, machine):
    """LIVE with wait=true of a source whose writer runs and which rewrites
    128 MiB during the copy: the call returns READY with the VMM's pause and
    the faults served, Get/ListSnapshots showed WRITING meanwhile, the
    source's writer kept going, and a child verifies one consistent cut and
    has the branch instant's memory. A DIFF afterwards has the LIVE snapshot
    as its base."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, sum0 = writing_source(d)
    sid = src["id"]
    floor = seq(d, sid)

    call = d.client.start(BRANCH, {"sandboxId": sid, "tag": "lw", "mode": LIVE})
    try:
        # The copy takes seconds: the snapshot shows WRITING meanwhile, in
        # GetSnapshot and in ListSnapshots.
        snap = d.wait_snapshot_status("lw", [WRITING, READY, FAILED], 30, interval=0.02, missing_ok=True)
        assert snap["status"] == WRITING, snap
        check_live_snapshot(snap, "lw", sid, 512, WRITING)
        assert [s["tag"] for s in d.list_snapshots(WRITING)] == ["lw"]
        assert d.list_snapshots(READY) == []
        assert call.proc.poll() is None, "wait=true returned while the snapshot was WRITING"
        s1 = seq(d, sid)
        time.sleep(0.3)
        s2 = seq(d, sid)
        still = d.get_snapshot("lw")["status"]
        # Rewrite the filled region while the copier is behind: the pages
        # it has not reached fault, and their old content is saved first.
        fill(d, sid, 128, 2)
        res = call.wait(timeout=120)
    finally:
        call.kill()
    assert res.ok, res.describe()
    [resp] = res.messages
    print("LIVE wait=true:", {k: v for k, v in resp.items() if k != "snapshot"})
    assert s2 > s1 > floor, (floor, s1, s2)
    assert still == WRITING, "the copy ended before the source's writer was seen moving"
    check_live_snapshot(resp["snapshot"], "lw", sid, 512, READY)
    assert 0 < resp["pauseMs"] < 1000, resp
    assert 128 * MIB <= u64(resp, "bytesWritten") < 512 * MIB, resp
    # The fill hit thousands of pages the copier had not reached.
    assert u64(resp, "faultsServed") >= 1000, resp
    after_ready = seq(d, sid)
    ring_cut(d, "lw", floor, s1)
    assert checksum(d, sid, 128) != sum0
    got = d.get_snapshot("lw")
    check_live_snapshot(got, "lw", sid, 512, READY)
    assert (d.snapshot_dir("lw") / "memory").stat().st_size == 512 * MIB

    # The source's writer kept (at least half) its pace through the copy.
    assert after_ready - floor >= writer_rate(d) * res.elapsed / 2, (floor, after_ready, res.elapsed)

    [kid] = d.spawn(1, snapshotTag="lw")
    verify_child(d, kid["id"], floor)
    assert checksum(d, kid["id"], 128) == sum0, "the child does not have the branch instant's memory"
    st = stat(d, kid["id"])
    assert (st["filled_mib"], st["fill_seed"]) == ("128", "1"), st

    # The LIVE snapshot is the source's base: a DIFF against it.
    fill(d, sid, 4, 3)
    sum_diff = checksum(d, sid, 128)
    diff = d.branch(sid, "lw-diff", DIFF)
    ds = diff["snapshot"]
    assert (ds["status"], ds["mode"], ds["parentTag"], ds["chain"]) == (READY, DIFF, "lw", ["lw-diff", "lw"]), diff
    [dkid] = d.spawn(1, snapshotTag="lw-diff")
    assert checksum(d, dkid["id"], 128) == sum_diff
    verify_child(d, dkid["id"], None)


@pytest.mark.svm
def test_live_wait_false_returns_writing_and_watch_follows_to_ready(daemon_factory, machine):
    """LIVE with wait=false returns WRITING as soon as the vCPUs run again;
    WatchSnapshot sends WRITING at once, progress, READY, and ends; the
    source's writer moved on while the snapshot was WRITING; a child
    verifies and has the branch instant's memory."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, sum0 = writing_source(d)
    sid = src["id"]
    floor = seq(d, sid)

    t_branch = time.monotonic()
    resp = d.branch(sid, "lnw", LIVE, wait=False)
    t_reply = time.monotonic()
    watch = d.start_watch("lnw")
    try:
        print("LIVE wait=false:", {k: v for k, v in resp.items() if k != "snapshot"})
        check_live_snapshot(resp["snapshot"], "lnw", sid, 512, WRITING)
        assert 0 < resp["pauseMs"] < 1000, resp
        assert u64(resp, "faultsServed") == 0, resp
        s1 = seq(d, sid)
        assert d.get_snapshot("lnw")["status"] == WRITING
        assert [s["tag"] for s in d.list_snapshots(WRITING)] == ["lnw"]
        assert d.list_snapshots(READY) == []
        time.sleep(0.3)
        s2 = seq(d, sid)
        assert d.get_snapshot("lnw")["status"] == WRITING, "the copy ended too early to watch the source"
        assert s2 > s1 > floor, (floor, s1, s2)
        fill(d, sid, 128, 2)
        res = watch.wait(timeout=120)
    finally:
        watch.kill()
    t_ready = time.monotonic()
    assert res.ok, res.describe()
    check_watch_stream(res.messages, "lnw", min_total=128 * MIB, max_total=512 * MIB)
    assert t_ready - t_reply > 0.5, "the copy of ~150 MiB at 64 MiB/s ended within 0.5 s"
    after_ready = seq(d, sid)
    check_live_snapshot(d.get_snapshot("lnw"), "lnw", sid, 512, READY)
    ring_cut(d, "lnw", floor, s1)
    # A finished snapshot: WatchSnapshot sends READY and ends.
    again = d.client.stream(WATCH_SNAP, {"tag": "lnw"})
    assert [m["status"] for m in again] == [READY], again

    # The source's writer kept (at least half) its pace through the copy.
    assert after_ready - floor >= writer_rate(d) * (t_ready - t_branch) / 2, (floor, after_ready)

    [kid] = d.spawn(1, snapshotTag="lnw")
    verify_child(d, kid["id"], floor)
    assert checksum(d, kid["id"], 128) == sum0
    assert checksum(d, sid, 128) != sum0


def test_ten_consecutive_live_branches_all_verify(daemon):
    """Ten LIVE branches in a row of one source whose writer never stops
    (wait=true and wait=false alternating; a wait=false one is forked with
    wait_for_snapshot), each with new memory: a child of each verifies and
    has that branch's memory; child and snapshot are deleted each time."""
    d = daemon
    src, _ = writing_source(d, memory_mib=256, fill_mib=64, rate=2500)
    sid = src["id"]
    for i in range(10):
        fill(d, sid, 8, 100 + i)
        want = checksum(d, sid, 64)
        floor = seq(d, sid)
        tag = f"ten-{i}"
        wait = i % 2 == 0
        resp = d.branch(sid, tag, LIVE, wait=wait)
        ceiling = seq(d, sid)
        snap = resp["snapshot"]
        assert snap["status"] == (READY if wait else WRITING), resp
        assert snap["mode"] == LIVE and resp["pauseMs"] > 0, resp
        [kid] = d.spawn(1, snapshotTag=tag, waitForSnapshot=True)
        assert d.get_snapshot(tag)["status"] == READY
        verify_child(d, kid["id"], floor)
        ring_cut(d, tag, floor, ceiling)
        assert checksum(d, kid["id"], 64) == want, f"child of {tag} lacks that branch's memory"
        d.delete(kid["id"])
        assert d.delete_snapshot(tag) == [tag]
    assert d.list_snapshots() == []
    assert d.get(sid)["state"] == RUNNING
    assert seq(d, sid) > floor
    assert [p.pid for p in d.vmm_children()] == [src["vmmPid"]]


def test_flat_out_writer_snapshot_holds_one_cut(daemon_factory, machine):
    """The writer at full speed (rate 0: tens of millions of stamps a
    second on vCPU 1) while the copy is throttled to seconds: each LIVE
    snapshot's memory file holds one consistent cut of the ring, between
    the source's seq before the branch and right after the reply, the
    writer ran on through the copy, and a child restored from it verifies.
    (A child's own `verify` cannot judge the cut here: its writer rewrites
    the ring at once, so the cut is read from the file.)"""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, _ = writing_source(d, memory_mib=256, fill_mib=64, rate=0)
    sid = src["id"]
    for i, wait in enumerate([True, False]):
        tag = f"flat-{i}"
        floor = seq(d, sid)
        resp = d.branch(sid, tag, LIVE, wait=wait)
        ceiling = seq(d, sid)
        assert resp["snapshot"]["status"] == (READY if wait else WRITING), resp
        assert ceiling > floor, (floor, ceiling)
        if not wait:
            assert d.wait_snapshot_status(tag, [READY, FAILED], 60)["status"] == READY
        assert seq(d, sid) > ceiling, "the writer stopped"
        ring_cut(d, tag, floor, ceiling)
        [kid] = d.spawn(1, snapshotTag=tag)
        verify_child(d, kid["id"], None)
        d.delete(kid["id"])


@pytest.mark.svm
def test_live_between_full_and_diff_branches(daemon):
    """LIVE, FULL and DIFF branches of one writing source, mixed (the VMM
    keeps write-protection armed after a LIVE copy, across the FULL and
    DIFF captures that follow): every snapshot gives a child with that
    branch's memory and a consistent writer, and DIFFs chain onto LIVE
    and FULL bases alike."""
    d = daemon
    src, _ = writing_source(d, memory_mib=256, fill_mib=64, rate=2500)
    sid = src["id"]
    plan = [(LIVE, True), (FULL, True), (DIFF, True), (LIVE, True), (DIFF, True), (LIVE, False), (LIVE, True)]
    for i, (mode, wait) in enumerate(plan):
        fill(d, sid, 4, 200 + i)
        want = checksum(d, sid, 64)
        floor = seq(d, sid)
        tag = f"mix-{i}"
        resp = d.branch(sid, tag, mode, wait=wait) if mode == LIVE else d.branch(sid, tag, mode)
        ceiling = seq(d, sid)
        [kid] = d.spawn(1, snapshotTag=tag, waitForSnapshot=True)
        assert d.get_snapshot(tag)["status"] == READY, resp
        verify_child(d, kid["id"], floor)
        if mode != DIFF:
            ring_cut(d, tag, floor, ceiling)
        assert checksum(d, kid["id"], 64) == want, f"child of {tag} ({mode}) lacks that branch's memory"
        d.delete(kid["id"])
    assert d.get_snapshot("mix-4")["chain"] == ["mix-4", "mix-3"]
    assert d.get_snapshot("mix-2")["chain"] == ["mix-2", "mix-1"]


# ---- fault cases -------------------------------------------------------------------------


def test_spawn_from_writing_snapshot(daemon_factory, machine):
    """Forking from a WRITING snapshot is FAILED_PRECONDITION and starts
    nothing; with wait_for_snapshot=true the call waits for READY and the
    child has the branch instant's memory."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, sum0 = writing_source(d)
    sid = src["id"]
    floor = seq(d, sid)
    resp = d.branch(sid, "sw", LIVE, wait=False)
    ceiling = seq(d, sid)
    assert resp["snapshot"]["status"] == WRITING, resp
    res = d.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "sw", "n": 2})
    assert res.message, res.describe()
    assert [s["id"] for s in d.list()] == [sid], "a refused spawn must start nothing"
    fill(d, sid, 128, 2)
    assert d.get_snapshot("sw")["status"] == WRITING

    t0 = time.monotonic()
    kids = d.spawn(2, snapshotTag="sw", waitForSnapshot=True)
    waited = time.monotonic() - t0
    assert d.get_snapshot("sw")["status"] == READY
    print(f"spawn with wait_for_snapshot waited {waited:.2f} s")
    for k in kids:
        assert k["snapshotTag"] == "sw" and k["state"] == RUNNING, k
    # Both verify first, before their writers go round the ring.
    for k in kids:
        verify_child(d, k["id"], floor)
    ring_cut(d, "sw", floor, ceiling)
    for k in kids:
        assert checksum(d, k["id"], 128) == sum0
    assert sorted(d.get_snapshot("sw").get("children", [])) == sorted(k["id"] for k in kids)
    # A READY snapshot: wait_for_snapshot changes nothing.
    [late] = d.spawn(1, snapshotTag="sw", waitForSnapshot=True)
    assert checksum(d, late["id"], 128) == sum0


def test_second_live_branch_is_queued_behind_the_running_copy(daemon_factory, machine):
    """A second LIVE branch of a source whose first copy is still running
    waits for it, then runs: both snapshots end READY, each with its own
    instant's memory, and children of both verify."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, sum_a = writing_source(d)
    sid = src["id"]
    floor = seq(d, sid)
    a = d.branch(sid, "qa", LIVE, wait=False)
    ceiling_a = seq(d, sid)
    assert a["snapshot"]["status"] == WRITING, a
    fill(d, sid, 16, 2)
    sum_b = checksum(d, sid, 128)
    assert sum_b != sum_a
    floor_b = seq(d, sid)
    b_call = d.client.start(BRANCH, {"sandboxId": sid, "tag": "qb", "mode": LIVE})
    try:
        time.sleep(0.3)
        a_status = d.get_snapshot("qa")["status"]
        b_pending = b_call.proc.poll() is None
        # A child of the first as soon as it is READY (while the second
        # copies), verified before its writer catches up a whole ring.
        [kid_a] = d.spawn(1, snapshotTag="qa", waitForSnapshot=True)
        verify_child(d, kid_a["id"], floor)
        b_res = b_call.wait(timeout=120)
    finally:
        b_call.kill()
    assert a_status == WRITING, "the first copy ended before the second branch could queue"
    assert b_pending, f"the second branch returned while the first copy ran: {b_res.describe()}"
    assert b_res.ok, b_res.describe()
    [b] = b_res.messages
    check_live_snapshot(b["snapshot"], "qb", sid, 512, READY)
    assert b["pauseMs"] > 0, b
    check_live_snapshot(d.get_snapshot("qa"), "qa", sid, 512, READY)
    ceiling_b = seq(d, sid)
    fill(d, sid, 16, 3)
    cut_a = ring_cut(d, "qa", floor, ceiling_a)
    cut_b = ring_cut(d, "qb", floor_b, ceiling_b)
    # The second waited for the first copy (seconds).
    assert cut_b - cut_a >= writer_rate(d), (cut_a, cut_b)

    assert checksum(d, kid_a["id"], 128) == sum_a
    [kid_b] = d.spawn(1, snapshotTag="qb")
    verify_child(d, kid_b["id"], None)
    assert checksum(d, kid_b["id"], 128) == sum_b


def test_delete_writing_snapshot_cancels_the_copy(daemon_factory, machine):
    """DeleteSnapshot of a WRITING LIVE snapshot cancels its copy and
    deletes it (NOT_FOUND afterwards, files gone, a watcher never sees
    READY); the source runs on, and branches live again."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, _ = writing_source(d)
    sid = src["id"]
    resp = d.branch(sid, "del", LIVE, wait=False)
    assert resp["snapshot"]["status"] == WRITING, resp
    watch = d.start_watch("del")
    try:
        time.sleep(0.5)
        assert d.get_snapshot("del")["status"] == WRITING
        t0 = time.monotonic()
        assert d.delete_snapshot("del") == ["del"]
        took = time.monotonic() - t0
        res = watch.wait(timeout=30)
    finally:
        watch.kill()
    print(f"DeleteSnapshot of the WRITING snapshot took {took * 1e3:.0f} ms; watch ended with "
          f"{res.code} after {[m.get('status') for m in res.messages]}")
    # The copy had ~1.6 s to go.
    assert took < 1.0, f"DeleteSnapshot took {took:.1f} s: it waited for the copy instead of cancelling it"
    d.client.expect_error("NOT_FOUND", GET_SNAP, {"tag": "del"})
    assert not d.snapshot_dir("del").exists(), list(d.snapshot_dir("del").iterdir())
    assert d.list_snapshots() == []
    assert READY not in [m.get("status") for m in res.messages], res.messages
    assert res.ok or res.code in ("NOT_FOUND", "ABORTED", "CANCELLED"), res.describe()
    d.client.expect_error("NOT_FOUND", SPAWN, {"snapshotTag": "del", "n": 1})

    # The source is unharmed and its writer still runs.
    assert d.get(sid)["state"] == RUNNING
    assert d.exec_ok(sid, ["echo", "still", "here"]) == b"still here\n"
    s1 = seq(d, sid)
    time.sleep(0.1)
    assert seq(d, sid) > s1
    # Nothing of the cancelled copy is left in the way: the tag branches again.
    fill(d, sid, 8, 5)
    want = checksum(d, sid, 128)
    floor = seq(d, sid)
    again = d.branch(sid, "del", LIVE)
    check_live_snapshot(again["snapshot"], "del", sid, 512, READY)
    [kid] = d.spawn(1, snapshotTag="del")
    verify_child(d, kid["id"], floor)
    assert checksum(d, kid["id"], 128) == want


@pytest.mark.parametrize("how", ["kill-vmm", "delete-sandbox"])
def test_source_dies_mid_copy_snapshot_fails(daemon_factory, how, machine):
    """The source's VMM dies while its LIVE copy runs (kill -9 of its
    vmm_pid, or DeleteSandbox): the snapshot ends FAILED with a reason and
    never READY; a watcher sees FAILED last; a spawn waiting for it and one
    not waiting are FAILED_PRECONDITION; the FAILED snapshot can be
    deleted; the daemon serves on."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, _ = writing_source(d)
    sid, pid = src["id"], src["vmmPid"]
    resp = d.branch(sid, "doomed", LIVE, wait=False)
    assert resp["snapshot"]["status"] == WRITING, resp
    watch = d.start_watch("doomed")
    waiter = d.client.start(SPAWN, {"snapshotTag": "doomed", "n": 1, "waitForSnapshot": True})
    try:
        time.sleep(0.5)
        assert d.get_snapshot("doomed")["status"] == WRITING
        if how == "kill-vmm":
            d.kill_vmm(pid)
        else:
            d.delete(sid)
        snap = d.wait_snapshot_status("doomed", [READY, FAILED], 30)
        w = watch.wait(timeout=30)
        spawned = waiter.wait(timeout=30)
    finally:
        watch.kill()
        waiter.kill()
    print(f"{how}: snapshot {snap['status']}: {snap.get('failureReason')!r}")
    assert snap["status"] == FAILED, snap
    assert snap.get("failureReason"), snap
    assert w.ok, w.describe()
    statuses = [m.get("status") for m in w.messages]
    assert statuses[0] == WRITING and statuses[-1] == FAILED and READY not in statuses, w.messages
    assert w.messages[-1].get("failureReason"), w.messages[-1]
    assert spawned.code == "FAILED_PRECONDITION", spawned.describe()
    assert spawned.message, spawned.describe()
    d.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "doomed", "n": 1})
    assert "doomed" not in [s["tag"] for s in d.list_snapshots(READY)]
    assert [s["tag"] for s in d.list_snapshots(FAILED)] == ["doomed"]
    # It stays FAILED.
    time.sleep(0.5)
    assert d.get_snapshot("doomed")["status"] == FAILED
    assert wait_until(lambda: not any(p.pid == pid for p in d.vmm_children()), 10)
    if how == "kill-vmm":
        assert d.get(sid)["state"] != RUNNING
    else:
        d.client.expect_error("NOT_FOUND", "forkd.v1.SandboxService/GetSandbox", {"id": sid})
    assert d.delete_snapshot("doomed") == ["doomed"]
    d.client.expect_error("NOT_FOUND", GET_SNAP, {"tag": "doomed"})
    # The daemon serves on: a new source branches live.
    [fresh] = d.spawn(1, memoryMib=64)
    ok = d.branch(fresh["id"], "after", LIVE)
    assert ok["snapshot"]["status"] == READY, ok


def test_daemon_sigkill_mid_copy_snapshot_is_failed_after_restart(daemon_factory, machine):
    """SIGKILL of the daemon while a LIVE copy runs; after a restart on the
    same data directory that snapshot is FAILED (never READY), an earlier
    LIVE snapshot of the same source is READY and spawns with its memory,
    and no VMM of the killed daemon is left."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, _ = writing_source(d)
    sid = src["id"]
    fill(d, sid, 8, 7)
    sum_before = checksum(d, sid, 128)
    before = d.branch(sid, "k-before", LIVE)
    assert before["snapshot"]["status"] == READY, before
    fill(d, sid, 8, 8)
    resp = d.branch(sid, "k-doomed", LIVE, wait=False)
    assert resp["snapshot"]["status"] == WRITING, resp
    time.sleep(0.5)
    assert d.get_snapshot("k-doomed")["status"] == WRITING
    vmms = d.vmm_children()
    assert [p.pid for p in vmms] == [src["vmmPid"]], vmms
    rc = d.kill9()
    assert rc == -signal.SIGKILL, rc

    d2 = daemon_factory(data_dir=d.data_dir, extra_args=copy_rate_args(machine))

    def old_vmms_left():
        return [p for p in vmms if still_running(p)] + [
            p for p in orphaned_vmms() if p.state not in ("Z", "X")
        ]

    gone = wait_until(lambda: not old_vmms_left(), 30, interval=0.1)
    left = old_vmms_left()
    kill_leftovers(left)
    reap_orphans()
    assert gone, f"VMMs of the killed daemon still running 30 s later: {left}"

    def check_doomed() -> dict:
        snap = d2.get_snapshot("k-doomed")
        assert snap["status"] == FAILED, snap
        assert snap.get("failureReason"), snap
        assert snap["mode"] == LIVE, snap
        listed = {s["tag"]: s["status"] for s in d2.list_snapshots()}
        assert listed == {"k-before": READY, "k-doomed": FAILED}, listed
        return snap

    snap = check_doomed()
    print("after the restart:", snap)
    msgs = d2.client.stream(WATCH_SNAP, {"tag": "k-doomed"})
    assert [m["status"] for m in msgs] == [FAILED] and msgs[0].get("failureReason"), msgs
    d2.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "k-doomed", "n": 1})
    d2.client.expect_error(
        "FAILED_PRECONDITION", SPAWN, {"snapshotTag": "k-doomed", "n": 1, "waitForSnapshot": True}
    )
    [kid] = d2.spawn(1, snapshotTag="k-before")
    assert checksum(d2, kid["id"], 128) == sum_before
    verify_child(d2, kid["id"], None)
    assert [p.pid for p in d2.vmm_children()] == [kid["vmmPid"]]
    # A second look, now that nothing of the old daemon can still write.
    check_doomed()
    assert d2.delete_snapshot("k-doomed") == ["k-doomed"]


# ---- LIVE of a child restored from a snapshot -----------------------------------------------


@pytest.mark.svm
def test_live_branch_of_a_restored_child(daemon_factory, machine):
    """A child forked from a snapshot (its RAM a private mapping of the
    snapshot's memory) is branched LIVE while it rewrites memory it still
    shares with the snapshot; a grandchild forked from that verifies and
    has the child's memory of the branch instant."""
    d = daemon_factory(extra_args=copy_rate_args(machine))
    src, sum_src = writing_source(d, memory_mib=512, fill_mib=128)
    sid = src["id"]
    d.branch(sid, "gen0", FULL)
    [child] = d.spawn(1, snapshotTag="gen0")
    cid = child["id"]
    assert checksum(d, cid, 128) == sum_src
    # Half of the region private to the child, half still the snapshot's.
    fill(d, cid, 64, 5)
    sum_child = checksum(d, cid, 128)
    floor = seq(d, cid)

    resp = d.branch(cid, "gen1", LIVE, wait=False)
    ceiling = seq(d, cid)
    check_live_snapshot(resp["snapshot"], "gen1", cid, 512, WRITING)
    watch = d.start_watch("gen1")
    try:
        # Writes to both kinds of pages, while the copy runs or (on a slow
        # or loaded host) after it ended: either way the grandchild must
        # have the branch instant, which is what is checked below.
        fill(d, cid, 128, 6)
        res = watch.wait(timeout=120)
    finally:
        watch.kill()
    assert res.ok, res.describe()
    check_watch_stream(res.messages, "gen1", min_total=64 * MIB, max_total=512 * MIB, from_writing=False)
    gen1 = d.get_snapshot("gen1")
    check_live_snapshot(gen1, "gen1", cid, 512, READY)

    [grand] = d.spawn(1, snapshotTag="gen1")
    verify_child(d, grand["id"], floor)
    ring_cut(d, "gen1", floor, ceiling)
    assert checksum(d, grand["id"], 128) == sum_child
    # Everyone else kept their own memory.
    assert checksum(d, cid, 128) not in (sum_src, sum_child)
    assert checksum(d, sid, 128) == sum_src
