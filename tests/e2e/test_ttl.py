"""Sandbox lifetimes (TTL): `ttl_seconds` on SpawnSandboxes, `expireTime` on
the sandbox, SetSandboxTtl, `--default-ttl`/`--max-ttl`, and the reaper that
deletes an expired sandbox as DeleteSandbox does (VMM stopped, directory
removed), leaves snapshots alone, and counts `forkd_sandboxes_expired_total`.

Nothing here is specific to the host's hypervisor, so none of it is marked
`svm`. Every wait polls for the outcome with a generous deadline; nothing
asserts on how fast the reaper is beyond "gone well after the deadline".
"""

from __future__ import annotations

import re
import time
import urllib.request
from datetime import datetime, timezone

from forkd_daemon import Daemon, free_port, wait_until

SPAWN = "forkd.v1.SandboxService/SpawnSandboxes"
GET = "forkd.v1.SandboxService/GetSandbox"
SET_TTL = "forkd.v1.SandboxService/SetSandboxTtl"
MEM = 64  # MiB per sandbox: small and quick on two cores


def parse_time(text: str) -> float:
    """An RFC 3339 timestamp as grpcurl prints it (nanoseconds, `Z`), as a
    Unix time."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    assert m, f"not an RFC 3339 UTC timestamp: {text!r}"
    whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return whole.timestamp() + frac


def expired_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^forkd_sandboxes_expired_total (\S+)$", text, re.M)
    assert m, f"no forkd_sandboxes_expired_total in:\n{text}"
    return float(m.group(1))


def set_ttl(d: Daemon, sandbox_id: str, ttl: int) -> dict:
    resp = d.client.call(SET_TTL, {"sandboxId": sandbox_id, "ttlSeconds": ttl})
    assert resp["sandbox"]["id"] == sandbox_id, resp
    return resp["sandbox"]


def gone(d: Daemon, sandbox_id: str) -> bool:
    res = d.client.run([GET], {"id": sandbox_id})
    if res.ok:
        return False
    assert res.code == "NOT_FOUND", res.describe()
    return True


def check_deleted_like_delete(d: Daemon, sb: dict) -> None:
    """The VMM is stopped and reaped, the sandbox's directory removed."""
    m = d.machine
    vmm = d.vmms.get(int(sb["vmmPid"]))
    assert vmm is not None, f"VMM of {sb['id']} was never seen"
    assert wait_until(lambda: not m.still_running(vmm), 10 * m.slowness), (
        f"VMM {vmm.pid} of expired {sb['id']} still running"
    )
    assert wait_until(lambda: not m.still_exists(vmm), 10 * m.slowness), (
        f"VMM {vmm.pid} of expired {sb['id']} never reaped"
    )
    sb_dir = d.data_dir / "sandboxes" / sb["id"]
    assert wait_until(lambda: not sb_dir.exists(), 10 * m.slowness), f"{sb_dir} still exists"


def test_ttl_expires_extends_clears_and_counts(daemon_factory):
    port = free_port()
    d = daemon_factory(extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    assert expired_total(port) == 0

    before = time.time()
    doomed, extended, cleared = d.spawn(3, memoryMib=MEM, ttlSeconds=3)
    keeper = d.spawn(1, memoryMib=MEM)[0]
    after = time.time()
    for sb in (doomed, extended, cleared):
        assert "expireTime" in sb, sb
        at = parse_time(sb["expireTime"])
        # 3 s from when it started (within the spawn call), give or take a
        # second of clock granularity.
        assert before + 3 - 1 <= at <= after + 3 + 1, (sb, before, after)
    assert "expireTime" not in keeper, keeper
    assert d.get(doomed["id"])["expireTime"] == doomed["expireTime"]
    original_deadline = max(parse_time(sb["expireTime"]) for sb in (doomed, extended, cleared))

    # Extend one, clear another, before the deadline.
    ext = set_ttl(d, extended["id"], 600)
    assert parse_time(ext["expireTime"]) >= original_deadline + 500, ext
    clr = set_ttl(d, cleared["id"], 0)
    assert "expireTime" not in clr, clr
    assert "expireTime" not in d.get(cleared["id"])

    # The doomed one goes, as DeleteSandbox would have taken it.
    assert wait_until(lambda: gone(d, doomed["id"]), 30 * d.machine.slowness), (
        f"{doomed['id']} still there 30 s after its 3 s ttl\n{d.log_tail()}"
    )
    assert time.time() >= parse_time(doomed["expireTime"]) - 1.0, "deleted before its deadline"
    check_deleted_like_delete(d, doomed)
    assert wait_until(lambda: expired_total(port) == 1, 10), expired_total(port)
    expired_lines = [l for l in d.log_path.read_text().splitlines() if "sandbox expired" in l]
    assert any(doomed["id"] in l and "expire_time" in l for l in expired_lines), expired_lines

    # Past the original deadline (with a margin), the other two still run.
    while time.time() < original_deadline + 2:
        time.sleep(0.2)
    for sb in (extended, cleared, keeper):
        got = d.get(sb["id"])
        assert got["state"] == "SANDBOX_STATE_RUNNING", got
    assert d.exec_ok(extended["id"], ["echo", "still"]) == b"still\n"
    assert d.exec_ok(cleared["id"], ["echo", "here"]) == b"here\n"
    assert expired_total(port) == 1


def test_snapshot_outlives_its_expiring_source(daemon_factory):
    port = free_port()
    d = daemon_factory(extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    # A long ttl while branching, then shortened: nothing races the branch.
    [src] = d.spawn(1, memoryMib=MEM, ttlSeconds=600)
    d.exec_ok(src["id"], ["fill", "16", "7"])
    sum_before = d.exec_ok(src["id"], ["checksum"])
    d.branch(src["id"], "ttl-snap")
    short = set_ttl(d, src["id"], 1)
    assert "expireTime" in short, short
    assert wait_until(lambda: gone(d, src["id"]), 30 * d.machine.slowness), d.log_tail()
    check_deleted_like_delete(d, src)

    snap = d.get_snapshot("ttl-snap")
    assert snap["status"] == "SNAPSHOT_STATUS_READY", snap
    # Children get the ttl of their own spawn: none, or their own.
    plain, timed = d.spawn(1, snapshotTag="ttl-snap")[0], d.spawn(1, snapshotTag="ttl-snap", ttlSeconds=2)[0]
    assert "expireTime" not in plain, plain
    assert "expireTime" in timed, timed
    assert d.exec_ok(plain["id"], ["checksum"]) == sum_before
    assert wait_until(lambda: gone(d, timed["id"]), 30 * d.machine.slowness), d.log_tail()
    assert d.get(plain["id"])["state"] == "SANDBOX_STATE_RUNNING"
    assert d.get_snapshot("ttl-snap")["status"] == "SNAPSHOT_STATUS_READY"
    assert wait_until(lambda: expired_total(port) == 2, 10), expired_total(port)


def test_default_and_max_ttl_flags(daemon_factory):
    d = daemon_factory(extra_args=["--default-ttl", "2", "--max-ttl", "60"])
    c = d.client
    # Over the maximum: refused, on spawn and on SetSandboxTtl, naming the flag.
    res = c.expect_error("INVALID_ARGUMENT", SPAWN, {"n": 1, "memoryMib": MEM, "ttlSeconds": 61})
    assert "--max-ttl 60" in res.message and "61" in res.message, res.describe()
    assert d.list() == [] and d.vmm_children() == []

    # ttl_seconds 0: --default-ttl applies.
    [by_default] = d.spawn(1, memoryMib=MEM)
    assert "expireTime" in by_default, by_default
    [explicit] = d.spawn(1, memoryMib=MEM, ttlSeconds=60)
    res = c.expect_error("INVALID_ARGUMENT", SET_TTL, {"sandboxId": explicit["id"], "ttlSeconds": 61})
    assert "--max-ttl 60" in res.message, res.describe()
    assert parse_time(d.get(explicit["id"])["expireTime"]) == parse_time(explicit["expireTime"])

    assert wait_until(lambda: gone(d, by_default["id"]), 30 * d.machine.slowness), d.log_tail()
    check_deleted_like_delete(d, by_default)
    assert d.get(explicit["id"])["state"] == "SANDBOX_STATE_RUNNING"

    # Unknown: NOT_FOUND; stopped (the guest crashed): FAILED_PRECONDITION.
    c.expect_error("NOT_FOUND", SET_TTL, {"sandboxId": "sb-0000000000", "ttlSeconds": 5})
    crashed = set_ttl(d, explicit["id"], 0)
    assert "expireTime" not in crashed
    c.expect_error("ABORTED", "forkd.v1.SandboxService/Exec", {"sandboxId": explicit["id"], "argv": ["crash"]})
    assert wait_until(lambda: d.get(explicit["id"])["state"] == "SANDBOX_STATE_FAILED", 10)
    res = c.expect_error("FAILED_PRECONDITION", SET_TTL, {"sandboxId": explicit["id"], "ttlSeconds": 5})
    assert "FAILED" in res.message, res.describe()
