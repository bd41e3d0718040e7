"""The standby-VMM pool (`forkd serve --vmm-pool N`): children of a
reference-guest snapshot start on VMM processes that built their VM (KVM
VM, vCPUs, memory slot) before the fork. A pooled child must be
indistinguishable from a freshly started one, and a standby must serve
one sandbox at most.

Metrics are scraped over --metrics-listen: forkd_vmm_pool_ready (waiting
standbys), forkd_vmm_pool_claims_total and forkd_vmm_pool_misses_total.
"""

from __future__ import annotations

import re

from forkd_daemon import Daemon, free_port, wait_until
from test_metrics import scrape
from test_snapshots import checksum, fill, stat

FULL = "BRANCH_MODE_FULL"
LIVE = "BRANCH_MODE_LIVE"
READY = "SNAPSHOT_STATUS_READY"
POOL = 3


def pool_daemon(daemon_factory, **kwargs) -> tuple[Daemon, int]:
    port = free_port()
    d = daemon_factory(
        extra_args=["--metrics-listen", f"127.0.0.1:{port}", "--vmm-pool", str(POOL)], **kwargs
    )
    return d, port


def gauge(port: int, name: str) -> float:
    return scrape(port).samples.get((name, frozenset()), 0)


def wait_pool_full(d: Daemon, port: int) -> set[int]:
    """Waits until POOL standbys are ready; returns the pids of the daemon's
    VMMs that are no sandbox's (the standbys)."""
    assert wait_until(lambda: gauge(port, "forkd_vmm_pool_ready") == POOL, 30 * d.machine.slowness), (
        scrape(port).text,
        d.log_tail(),
    )
    sandboxes = {int(s.get("vmmPid", 0)) for s in d.list()}
    return {p.pid for p in d.vmm_children()} - sandboxes


def guest_view(d: Daemon, sandbox_id: str) -> dict[str, str]:
    """What the guest reports of itself: checksum of the filled memory and
    its `stat` fields that do not move by themselves."""
    fields = stat(d, sandbox_id)
    keep = {k: fields.get(k) for k in ("memory_mib", "filled_mib", "fill_seed")}
    return {"checksum": checksum(d, sandbox_id, 64), **keep}


def test_pooled_children_match_fresh_ones(daemon_factory):
    """Three children of a FULL snapshot start on the three standbys (their
    pids are the standbys' pids; claims 3, misses 0), each report the
    snapshot's memory (checksum, stat) and a consistent `verify`, and a
    LIVE branch of a pooled child forks children with its memory. After a
    restart without the pool, a fresh child of the same snapshot reports
    the very same."""
    d, port = pool_daemon(daemon_factory)
    [src] = d.spawn(1)
    sid = src["id"]
    fill(d, sid, 64, 42)
    # A writer on vCPU 1 (its ring is outside the filled range), for verify.
    d.exec_ok(sid, ["dirty", "64", "1000"])
    standbys = wait_pool_full(d, port)
    assert len(standbys) == POOL, (standbys, d.vmm_children())

    snap = d.branch(sid, "pooled", FULL)["snapshot"]
    assert snap["status"] == READY, snap
    want = guest_view(d, sid)

    children = d.spawn(POOL, snapshotTag="pooled")
    pids = [int(c["vmmPid"]) for c in children]
    assert set(pids) == standbys, (pids, standbys)
    s = scrape(port)
    assert s.samples.get(("forkd_vmm_pool_claims_total", frozenset())) == POOL, s.text
    assert s.samples.get(("forkd_vmm_pool_misses_total", frozenset())) == 0, s.text

    views = {c["id"]: guest_view(d, c["id"]) for c in children}
    assert all(v == want for v in views.values()), (want, views)
    for c in children:
        r = d.exec(c["id"], ["verify"])
        assert r.exit_code == 0 and r.stdout.startswith(b"verify ok: "), (c["id"], r)
        # The standby's log became the sandbox's, timed from the claim.
        log = (d.data_dir / "sandboxes" / c["id"] / "vmm.log").read_text()
        assert re.search(rf"forkd-vmm\[{c['id']}\]: startup µs: claim=\d+ ", log), log

    # A LIVE branch of a pooled child, and a child of that.
    pooled = children[0]["id"]
    fill(d, pooled, 32, 7)
    own = guest_view(d, pooled)
    assert own["checksum"] != want["checksum"], own
    live = d.branch(pooled, "from-pooled", LIVE)["snapshot"]
    assert live["status"] == READY, live
    [grandchild] = d.spawn(1, snapshotTag="from-pooled")
    assert guest_view(d, grandchild["id"]) == own

    # The same snapshot, forked by a daemon without a pool.
    d.stop()
    d2 = daemon_factory(data_dir=d.data_dir)
    [fresh] = d2.spawn(1, snapshotTag="pooled")
    assert guest_view(d2, fresh["id"]) == want
    r = d2.exec(fresh["id"], ["verify"])
    assert r.exit_code == 0 and r.stdout.startswith(b"verify ok: "), r
    assert "startup µs: exec=" in (d2.data_dir / "sandboxes" / fresh["id"] / "vmm.log").read_text()


def test_a_standby_serves_one_sandbox(daemon_factory):
    """Claimed standbys leave the pool for good: the refill starts new
    processes, the next children get those, and a deleted child's process
    is gone rather than returned to the pool. Forks beyond the pool start
    fresh VMMs (misses) and work the same."""
    d, port = pool_daemon(daemon_factory)
    [src] = d.spawn(1)
    d.branch(src["id"], "once", FULL)
    first_pool = wait_pool_full(d, port)
    first = d.spawn(POOL, snapshotTag="once")
    first_pids = {int(c["vmmPid"]) for c in first}
    assert first_pids == first_pool

    for c in first:
        d.delete(c["id"])
    assert wait_until(lambda: not first_pids & {p.pid for p in d.vmm_children()}, 10 * d.machine.slowness)
    second_pool = wait_pool_full(d, port)
    assert not second_pool & first_pids, (second_pool, first_pids)

    # More children than standbys: the rest start fresh.
    more = d.spawn(POOL + 2, snapshotTag="once")
    pids = [int(c["vmmPid"]) for c in more]
    assert len(set(pids)) == POOL + 2 and not set(pids) & first_pids, pids
    s = scrape(port)
    claims = s.samples.get(("forkd_vmm_pool_claims_total", frozenset()))
    misses = s.samples.get(("forkd_vmm_pool_misses_total", frozenset()))
    # The first POOL forks of this call find the refilled pool; the refill
    # may add one more while the call runs.
    assert claims + misses == 2 * POOL + 2 and claims >= 2 * POOL, s.text
    want = d.exec_ok(src["id"], ["checksum"])
    for c in more:
        assert d.exec_ok(c["id"], ["checksum"]) == want, c


def test_no_pool_with_vmm_pool_0(daemon_factory):
    """--vmm-pool 0 is no pool: no standby processes, forks start fresh
    VMMs, and neither claims nor misses are counted."""
    port = free_port()
    d = daemon_factory(extra_args=["--metrics-listen", f"127.0.0.1:{port}", "--vmm-pool", "0"])
    [src] = d.spawn(1)
    d.branch(src["id"], "nopool", FULL)
    [kid] = d.spawn(1, snapshotTag="nopool")
    assert {p.pid for p in d.vmm_children()} == {int(src["vmmPid"]), int(kid["vmmPid"])}
    s = scrape(port)
    assert s.samples.get(("forkd_vmm_pool_ready", frozenset())) == 0, s.text
    assert s.samples.get(("forkd_vmm_pool_claims_total", frozenset())) == 0, s.text
    assert s.samples.get(("forkd_vmm_pool_misses_total", frozenset())) == 0, s.text
    assert "startup µs: exec=" in (d.data_dir / "sandboxes" / kid["id"] / "vmm.log").read_text()
