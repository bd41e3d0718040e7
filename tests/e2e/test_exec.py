"""Spawning sandboxes and running the guest builtins in them."""

from __future__ import annotations

import re
import time

import pytest

from grpcurl_client import decode_exec

SANDBOX_ID = re.compile(r"^sb-[0-9a-z]{10}$")
DIGEST = re.compile(rb"^[0-9a-f]{16}\n$")


@pytest.mark.svm
def test_spawn_three_and_echo(daemon):
    sandboxes = daemon.spawn(3)
    ids = [sb["id"] for sb in sandboxes]
    assert len(set(ids)) == 3, ids
    vmm_children = {p.pid for p in daemon.vmm_children()}
    for sb in sandboxes:
        assert SANDBOX_ID.match(sb["id"]), sb
        assert sb["state"] == "SANDBOX_STATE_RUNNING", sb
        # Proto defaults for a cold boot: 0 means 256 MiB and 2 vCPUs.
        assert sb["memoryMib"] == 256, sb
        assert sb["vcpus"] == 2, sb
        assert sb.get("snapshotTag", "") == "", sb
        assert sb.get("createTime"), sb
        pid = sb["vmmPid"]
        info = daemon.machine.proc_info(pid)
        assert info is not None and daemon.machine.is_vmm(info), f"vmmPid {pid} is not a forkd-vmm: {info}"
        assert pid in vmm_children, f"vmmPid {pid} is not a child of the daemon {daemon.pid}"
    assert len({sb["vmmPid"] for sb in sandboxes}) == 3, "one VMM process per sandbox"

    for sb in sandboxes:
        r = daemon.exec(sb["id"], ["echo", "hello"])
        assert r.stdout == b"hello\n"
        assert r.stderr == b""
        assert r.exit_code == 0

    listed = daemon.list()
    assert sorted(s["id"] for s in listed) == sorted(ids)


@pytest.mark.svm
def test_echo_joins_arguments(daemon):
    [sb] = daemon.spawn(1)
    r = daemon.exec(sb["id"], ["echo", "a", "b c", "d"])
    assert (r.stdout, r.exit_code) == (b"a b c d\n", 0)
    r = daemon.exec(sb["id"], ["echo"])
    assert (r.stdout, r.exit_code) == (b"\n", 0)


@pytest.mark.svm
def test_exit_code(daemon):
    [sb] = daemon.spawn(1)
    r = daemon.exec(sb["id"], ["exit", "3"])
    assert r.exit_code == 3
    assert r.stdout == b""
    # `exit` ends the command, not the sandbox.
    assert daemon.get(sb["id"])["state"] == "SANDBOX_STATE_RUNNING"
    r = daemon.exec(sb["id"], ["echo", "after"])
    assert (r.stdout, r.exit_code) == (b"after\n", 0)


@pytest.mark.svm
def test_emit_streams_exact_bytes(daemon):
    [sb] = daemon.spawn(1)
    # Larger than the guest's 1 MiB output buffer: several flushes.
    n = 3 * 1024 * 1024 + 123
    r = daemon.exec(sb["id"], ["emit", str(n)])
    assert r.exit_code == 0
    assert len(r.stdout) == n
    assert r.stderr == b""


@pytest.mark.svm
def test_fill_checksum_deterministic(daemon):
    a, b, c = daemon.spawn(3)
    for sb, seed in ((a, "7"), (b, "7"), (c, "8")):
        r = daemon.exec(sb["id"], ["fill", "64", seed])
        assert r.exit_code == 0, (sb["id"], r)
    digests = {}
    for sb in (a, b, c):
        r = daemon.exec(sb["id"], ["checksum"])
        assert r.exit_code == 0
        assert DIGEST.match(r.stdout), r.stdout
        digests[sb["id"]] = r.stdout
    assert digests[a["id"]] == digests[b["id"]], digests
    assert digests[c["id"]] != digests[a["id"]], digests
    # Checksumming does not change the region.
    assert daemon.exec(a["id"], ["checksum"]).stdout == digests[a["id"]]


@pytest.mark.svm
def test_exec_timeout_then_usable(daemon):
    [sb] = daemon.spawn(1)
    t0 = time.monotonic()
    res = daemon.client.expect_error(
        "DEADLINE_EXCEEDED",
        "forkd.v1.SandboxService/Exec",
        {"sandboxId": sb["id"], "argv": ["sleep", "60000"], "timeoutMs": 500},
        # The client's own deadline is far away: the status must come from
        # the server's timeout_ms.
        max_time=60,
    )
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"timeoutMs=500 took {elapsed:.1f}s to fail: {res.describe()}"
    assert "exit" not in str(res.messages), res.describe()
    r = daemon.exec(sb["id"], ["echo", "ok"])
    assert (r.stdout, r.exit_code) == (b"ok\n", 0)
    assert daemon.get(sb["id"])["state"] == "SANDBOX_STATE_RUNNING"


@pytest.mark.svm
def test_crash_marks_failed_and_daemon_survives(daemon):
    victim, bystander = daemon.spawn(2)
    res = daemon.client.expect_error(
        "ABORTED", "forkd.v1.SandboxService/Exec", {"sandboxId": victim["id"], "argv": ["crash"]}
    )
    assert res.message, res.describe()
    got = daemon.get(victim["id"])
    assert got["state"] == "SANDBOX_STATE_FAILED", got
    assert got.get("exitReason", "").strip(), got
    # The daemon and the other sandbox are unaffected.
    assert daemon.anon.health() == "SERVING"
    r = daemon.exec(bystander["id"], ["echo", "alive"])
    assert (r.stdout, r.exit_code) == (b"alive\n", 0)
    assert daemon.get(bystander["id"])["state"] == "SANDBOX_STATE_RUNNING"
    # A new sandbox still boots.
    [fresh] = daemon.spawn(1)
    assert daemon.exec(fresh["id"], ["echo", "new"]).stdout == b"new\n"


def test_sandboxes_run_commands_in_parallel(daemon):
    sandboxes = daemon.spawn(6)
    t0 = time.monotonic()
    calls = [
        daemon.client.start(
            "forkd.v1.SandboxService/Exec", {"sandboxId": sb["id"], "argv": ["sleep", "1000"]}
        )
        for sb in sandboxes
    ]
    try:
        results = [c.wait(timeout=60) for c in calls]
    finally:
        for c in calls:
            c.kill()
    wall = time.monotonic() - t0
    for res in results:
        assert res.ok, res.describe()
        r = decode_exec(res.messages)
        assert r.exit_code == 0
        assert r.duration_us >= 900_000, r
    # Six 1 s sleeps in six sandboxes overlap (serially they would take 6 s).
    assert wall < 4, f"6 parallel `sleep 1000` took {wall:.1f}s"


def test_commands_in_one_sandbox_run_in_order(daemon):
    [sb] = daemon.spawn(1)
    first = daemon.client.start(
        "forkd.v1.SandboxService/Exec", {"sandboxId": sb["id"], "argv": ["sleep", "1500"]}
    )
    try:
        time.sleep(0.3)
        t_second = time.monotonic()
        r = daemon.exec(sb["id"], ["echo", "second"])
        second_done = time.monotonic()
        res = first.wait(timeout=60)
    finally:
        first.kill()
    assert res.ok, res.describe()
    assert decode_exec(res.messages).exit_code == 0
    assert (r.stdout, r.exit_code) == (b"second\n", 0)
    # The echo queued behind the sleep: it could not finish before the sleep
    # (1.5 s, started 0.3 s earlier) did.
    assert second_done - t_second >= 1.0, f"echo finished {second_done - t_second:.2f}s after it was sent"
