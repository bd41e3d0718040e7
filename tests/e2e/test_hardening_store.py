"""The snapshot store never destroys data it cannot validate (issue 12,
item 4), against a real daemon and real microVMs through grpcurl:

- a committed snapshot whose `manifest.json` has one wrong field is FAILED
  after a restart, with the reason, listed as FAILED, and keeps every file
  (its manifest as it was is kept as `manifest.orig.json`); its DIFF child
  is judged on its own files: READY, but spawning from it is
  FAILED_PRECONDITION naming the broken chain; DeleteSnapshot removes both;
- a snapshot whose memory fails its digest check at load is marked FAILED
  on the spot (persisted, with the mismatch as reason, files kept), so it is
  listed FAILED instead of READY, and a restart keeps it so;
- a DIFF child whose own chunk digest is wrong fails on its own, leaving
  its parent READY and spawnable.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from forkd_daemon import Daemon

SPAWN = "forkd.v1.SandboxService/SpawnSandboxes"
READY = "SNAPSHOT_STATUS_READY"
FAILED = "SNAPSHOT_STATUS_FAILED"
MEM = 64  # MiB
FILL_ADDR = 0x200_0000  # where `fill` writes in the reference guest


def files_of(d: Daemon, tag: str) -> dict[str, int]:
    """The files in a snapshot's directory with their sizes."""
    return {p.name: p.stat().st_size for p in sorted(d.snapshot_dir(tag).iterdir())}


def stop(d: Daemon) -> None:
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log_tail()
    assert d.leftover_vmms() == []


def restart(daemon_factory, d: Daemon) -> Daemon:
    return daemon_factory(data_dir=d.data_dir)


def base_and_diff(d: Daemon) -> str:
    """Snapshot `base` (FULL, 16 MiB filled) and its DIFF child `child`;
    returns the id of the sandbox both were taken of."""
    resp = d.create_snapshot("base", memory_mib=MEM, warmup=[["fill", "16", "5"]], keep_running=True)
    sb = resp["sandboxId"]
    d.exec_ok(sb, ["fill", "4", "9"])
    child = d.branch(sb, "child", mode="BRANCH_MODE_DIFF")["snapshot"]
    assert (child["status"], child["parentTag"]) == (READY, "base"), child
    return sb


def status_of(d: Daemon) -> dict[str, tuple[str, str]]:
    return {s["tag"]: (s["status"], s.get("failureReason", "")) for s in d.list_snapshots()}


def test_a_wrong_manifest_field_fails_the_snapshot_but_keeps_its_files(daemon_factory):
    d = daemon_factory()
    sb = base_and_diff(d)
    d.delete(sb)
    stop(d)
    base_files, child_files = files_of(d, "base"), files_of(d, "child")
    assert {"memory", "vmstate", "manifest.json"} <= set(base_files), base_files
    assert {"memory", "vmstate", "pages", "manifest.json"} <= set(child_files), child_files

    # One wrong field: memory_bytes off by a page.
    manifest = d.snapshot_dir("base") / "manifest.json"
    m = json.loads(manifest.read_text())
    m["memory_bytes"] += 4096
    edited = json.dumps(m, indent=2).encode()
    manifest.write_bytes(edited)

    d2 = restart(daemon_factory, d)
    statuses = status_of(d2)
    assert statuses["base"][0] == FAILED, statuses
    assert "the manifest says" in statuses["base"][1] and "memory is" in statuses["base"][1], statuses
    assert [s["tag"] for s in d2.list_snapshots(FAILED)] == ["base"]
    # The child is judged on its own files: READY.
    assert statuses["child"] == (READY, ""), statuses
    assert "broken" in d2.log_tail(200), "the restart did not log the broken chain"

    # Nothing was deleted: every data file is there, the same size, and
    # the manifest as it was is kept next to them.
    assert {k: v for k, v in files_of(d2, "base").items() if k != "manifest.json"} == {
        **{k: v for k, v in base_files.items() if k != "manifest.json"},
        "manifest.orig.json": len(edited),
    }
    assert (d2.snapshot_dir("base") / "manifest.orig.json").read_bytes() == edited
    assert files_of(d2, "child") == child_files

    # Neither can be spawned from, and the child says why.
    res = d2.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "child", "n": 1})
    assert "chain is broken" in res.message and "base is FAILED" in res.message, res.describe()
    res = d2.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "base", "n": 1})
    assert "FAILED" in res.message, res.describe()
    assert d2.list() == []

    # A second restart changes nothing.
    stop(d2)
    d3 = restart(daemon_factory, d2)
    assert status_of(d3) == statuses

    # Only DeleteSnapshot removes data; a FAILED snapshot can be deleted.
    d3.client.expect_error("FAILED_PRECONDITION", "forkd.v1.SnapshotService/DeleteSnapshot", {"tag": "base"})
    assert d3.delete_snapshot("base", cascade=True) == ["child", "base"]
    assert not d3.snapshot_dir("base").exists() and not d3.snapshot_dir("child").exists()
    assert d3.list_snapshots() == []


def test_memory_failing_its_digest_at_load_is_marked_failed(daemon_factory):
    d = daemon_factory()
    sb = base_and_diff(d)
    d.delete(sb)
    stop(d)
    mem = d.snapshot_dir("base") / "memory"
    with open(mem, "r+b") as f:
        f.seek(FILL_ADDR + 0x12345)
        old = f.read(1)
        f.seek(FILL_ADDR + 0x12345)
        f.write(bytes([old[0] ^ 0xFF]))
    corrupted = mem.read_bytes()

    d2 = restart(daemon_factory, d)
    # Recovery checks sizes, not digests: still READY until loaded.
    assert status_of(d2)["base"] == (READY, "")
    res = d2.client.expect_error("DATA_LOSS", SPAWN, {"snapshotTag": "base", "n": 1})
    assert "snapshot base is corrupt: memory chunk" in res.message, res.describe()
    assert d2.list() == []

    # Now FAILED (listed so), with the mismatch as its reason.
    snap = d2.get_snapshot("base")
    assert snap["status"] == FAILED, snap
    reason = snap["failureReason"]
    assert reason.startswith("memory chunk ") and "does not match its SHA-256" in reason, snap
    assert [s["tag"] for s in d2.list_snapshots(FAILED)] == ["base"]
    # The next spawn says FAILED and why, instead of loading it again.
    res = d2.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "base", "n": 1})
    assert "does not match its SHA-256" in res.message, res.describe()
    # The child stays READY in its own files but cannot be spawned from.
    assert d2.get_snapshot("child")["status"] == READY
    res = d2.client.expect_error("FAILED_PRECONDITION", SPAWN, {"snapshotTag": "child", "n": 1})
    assert "chain is broken" in res.message and "base is FAILED" in res.message, res.describe()
    # Files kept as they were (the corrupt byte included).
    assert mem.read_bytes() == corrupted
    assert (d2.snapshot_dir("base") / "vmstate").exists()

    # Persisted: a restart lists it FAILED with the same reason.
    stop(d2)
    d3 = restart(daemon_factory, d2)
    assert status_of(d3)["base"] == (FAILED, reason)
    assert d3.delete_snapshot("base", cascade=True) == ["child", "base"]
    assert not d3.snapshot_dir("base").exists()


def test_a_diff_with_a_wrong_chunk_digest_fails_alone(daemon_factory):
    d = daemon_factory()
    sb = base_and_diff(d)
    d.delete(sb)
    stop(d)
    manifest = d.snapshot_dir("child") / "manifest.json"
    m = json.loads(manifest.read_text())
    digest = m["memory_chunks"][4]  # every chunk is checked, holes included
    m["memory_chunks"][4] = ("0" if digest[0] != "0" else "1") + digest[1:]
    manifest.write_text(json.dumps(m, indent=2))
    child_files = files_of(d, "child")

    d2 = restart(daemon_factory, d)
    res = d2.client.expect_error("DATA_LOSS", SPAWN, {"snapshotTag": "child", "n": 1})
    assert "snapshot child is corrupt: memory chunk 4" in res.message, res.describe()
    snap = d2.get_snapshot("child")
    assert snap["status"] == FAILED and snap["failureReason"].startswith("memory chunk 4 "), snap
    # Its parent is untouched and still forks.
    assert d2.get_snapshot("base")["status"] == READY
    [kid] = d2.spawn(1, snapshotTag="base")
    assert d2.exec_ok(kid["id"], ["echo", "ok"]) == b"ok\n"
    d2.delete(kid["id"])
    # Its files are kept until it is deleted.
    assert set(child_files) <= set(files_of(d2, "child"))
    assert d2.delete_snapshot("child") == ["child"]
    assert not Path(d2.snapshot_dir("child")).exists()
    assert d2.get_snapshot("base")["status"] == READY
