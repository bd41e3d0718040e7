"""Huge-page guest RAM (SpawnSandboxes `huge_pages`): the reference guest's
RAM in a hugetlb memfd of 2 MiB pages from the host's pool, branched FULL,
DIFF and LIVE and forked like 4 KiB RAM, children mapping the snapshot's
2 MiB pages copy-on-write. Real daemons and microVMs, through grpcurl and
the generated Python client.

The host's pool (`vm.nr_hugepages`) is raised for this module if it is too
small, and put back afterwards. Only these tests use huge pages, so the
pool's counters move by what these sandboxes take.
"""

from __future__ import annotations

from pathlib import Path

import forkd
import pytest

from test_live_branch import (
    LIVE,
    READY,
    WRITING,
    check_live_snapshot,
    checksum,
    fill,
    ring_cut,
    seq,
    verify_child,
    writing_source,
)

FULL = "BRANCH_MODE_FULL"
DIFF = "BRANCH_MODE_DIFF"
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
# A 512 MiB source (256 pages), its snapshots' memory (about 150 MiB each
# in the daemon, two loaded at once), and the children's own pages.
POOL_PAGES = 700


def meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    return fields


def committed_pages() -> int:
    """Huge pages in use or promised to a mapping."""
    m = meminfo()
    return m["HugePages_Total"] - m["HugePages_Free"] + m["HugePages_Rsvd"]


def available_pages() -> int:
    m = meminfo()
    return m["HugePages_Free"] - m["HugePages_Rsvd"]


@pytest.fixture(scope="module", autouse=True)
def huge_pool():
    """At least POOL_PAGES free 2 MiB pages for the module's tests."""
    before = int(NR_HUGEPAGES.read_text())
    short = POOL_PAGES - available_pages()
    if short > 0:
        NR_HUGEPAGES.write_text(str(before + short))
        assert available_pages() >= POOL_PAGES, (
            f"the kernel could not grow the huge page pool by {short} pages: {meminfo()}"
        )
    yield
    if short > 0:
        NR_HUGEPAGES.write_text(str(before))


def test_huge_page_sandbox_branches_and_forks(daemon):
    """A huge-page sandbox takes its whole RAM from the pool at start; its
    first LIVE branch (wait=false) is the branch instant (one consistent
    cut of the writer, children checksum to the filled memory); children
    are huge-page sandboxes too, and a child's own LIVE branch, and the
    source's FULL then DIFF branches, fork children with the right memory."""
    d = daemon
    base = committed_pages()
    src, sum0 = writing_source(d, hugePages=True)
    sid = src["id"]
    assert src.get("hugePages") is True, src
    assert committed_pages() - base == 256, "512 MiB of RAM should take 256 huge pages"
    floor = seq(d, sid)

    resp = d.branch(sid, "hl", LIVE, wait=False)
    after = seq(d, sid)
    check_live_snapshot(resp["snapshot"], "hl", sid, 512, WRITING)
    watch = d.start_watch("hl")
    try:
        fill(d, sid, 128, 2)
        res = watch.wait(timeout=120)
    finally:
        watch.kill()
    assert res.ok, res.describe()
    assert res.messages[-1]["status"] == READY, res.messages
    snap = d.get_snapshot("hl")
    check_live_snapshot(snap, "hl", sid, 512, READY)
    assert snap.get("hugePages") is True, snap
    ring_cut(d, "hl", floor, after)

    kids = d.spawn(2, snapshotTag="hl")
    for kid in kids:
        assert kid.get("hugePages") is True, kid
        verify_child(d, kid["id"], floor)
        assert checksum(d, kid["id"], 128) == sum0

    # A child's RAM is a private view of the snapshot's huge pages: its own
    # LIVE branch finds the snapshot's data by reading the memfd.
    kid = kids[0]["id"]
    fill(d, kid, 16, 5)
    kid_sum = checksum(d, kid, 128)
    assert d.branch(kid, "hk", LIVE)["snapshot"]["status"] == READY
    [grandchild] = d.spawn(1, snapshotTag="hk")
    assert grandchild.get("hugePages") is True, grandchild
    assert checksum(d, grandchild["id"], 128) == kid_sum

    # FULL, then a DIFF on top: the diff's chain is assembled into a
    # huge-page memfd, its changed pages over the root's.
    assert d.branch(sid, "hf", FULL)["snapshot"]["status"] == READY
    fill(d, sid, 8, 9)
    want = checksum(d, sid, 128)
    diff = d.branch(sid, "hd", DIFF)["snapshot"]
    assert diff["status"] == READY and diff.get("hugePages") is True, diff
    [from_diff] = d.spawn(1, snapshotTag="hd")
    assert checksum(d, from_diff["id"], 128) == want


def test_huge_page_errors_say_what_to_fix(daemon):
    """Odd RAM, a Linux image and a 4 KiB snapshot's children are
    INVALID_ARGUMENT; more pages than the pool has free is
    RESOURCE_EXHAUSTED naming the sysctl, and starts nothing."""
    d = daemon
    spawn = "forkd.v1.SandboxService/SpawnSandboxes"
    res = d.client.expect_error("INVALID_ARGUMENT", spawn, {"n": 1, "memoryMib": 257, "hugePages": True})
    assert "memory_mib must be even with huge_pages" in res.message, res.describe()
    res = d.client.expect_error(
        "INVALID_ARGUMENT", spawn, {"n": 1, "image": "debian-python", "hugePages": True}
    )
    assert "not available for Linux images" in res.message, res.describe()
    [small] = d.spawn(1, memoryMib=64)
    d.branch(small["id"], "small", FULL)
    res = d.client.expect_error(
        "INVALID_ARGUMENT", spawn, {"n": 1, "snapshotTag": "small", "hugePages": True}
    )
    assert "huge_pages must be false when forking snapshot small" in res.message, res.describe()

    # Each 2048 MiB sandbox needs 1024 pages: one more than fit.
    n = available_pages() // 1024 + 1
    before = {s["id"] for s in d.list()}
    with forkd.Controller(d.listen, timeout=60) as ctl:
        with pytest.raises(forkd.ResourceExhaustedError) as err:
            ctl.spawn_sandboxes(n=n, memory_mib=2048, huge_pages=True)
    text = str(err.value)
    assert "vm.nr_hugepages" in text and f"needs {n * 1024} free 2 MiB huge pages" in text, text
    assert {s["id"] for s in d.list()} == before

    # The generated client's field, end to end: a huge-page sandbox.
    with forkd.Controller(d.listen, timeout=60) as ctl:
        [sb] = ctl.spawn_sandboxes(memory_mib=64, huge_pages=True)
        assert sb.huge_pages
        assert ctl.get_sandbox(sb.id).huge_pages
