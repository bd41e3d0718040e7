"""Admission control: a spawn that would take the guest memory committed by
running and starting sandboxes past --max-guest-memory-mib (by default the
host's MemTotal) is RESOURCE_EXHAUSTED, with the numbers."""

from __future__ import annotations

import re
import urllib.request

from forkd_daemon import free_port

SPAWN = "forkd.v1.SandboxService/SpawnSandboxes"


def mem_total_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_default_limit_is_memtotal(daemon):
    """20 sandboxes of 64 GiB on this host are refused at once, before any
    VMM starts, and the message carries asked / committed / limit and the
    flag; nothing is left behind."""
    limit = mem_total_mib()
    assert 20 * 65536 > limit, "this host has more than 1.25 TiB: the test needs a smaller ask"
    res = daemon.client.expect_error("RESOURCE_EXHAUSTED", SPAWN, {"n": 20, "memoryMib": 65536})
    msg = res.message
    assert "spawning 20 sandboxes of 65536 MiB asks for 1310720 MiB" in msg, msg
    assert "0 MiB already committed" in msg, msg
    assert f"limit of {limit} MiB" in msg, msg
    assert "--max-guest-memory-mib" in msg, msg
    assert daemon.list() == []
    assert list((daemon.data_dir / "sandboxes").iterdir()) == []
    assert daemon.vmm_children() == []


def committed_and_limit(port: int) -> tuple[int, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("forkd_guest_memory_"))
    return int(values["forkd_guest_memory_committed_bytes"]), int(values["forkd_guest_memory_limit_bytes"])


def test_limit_counts_running_sandboxes_and_frees_on_delete(daemon_factory):
    mport = free_port()
    d = daemon_factory(extra_args=["--max-guest-memory-mib", "1024", "--metrics-listen", f"127.0.0.1:{mport}"])
    first = d.spawn(3, memoryMib=256)  # 768 MiB committed
    assert committed_and_limit(mport) == (768 << 20, 1024 << 20)
    res = d.client.expect_error("RESOURCE_EXHAUSTED", SPAWN, {"n": 2, "memoryMib": 256})
    msg = res.message
    assert "spawning 2 sandboxes of 256 MiB asks for 512 MiB" in msg, msg
    assert "768 MiB already committed" in msg, msg
    assert "limit of 1024 MiB" in msg, msg
    # Nothing started for the refused call.
    assert len(d.list()) == 3
    # One more fits exactly.
    fourth = d.spawn(1, memoryMib=256)
    d.client.expect_error("RESOURCE_EXHAUSTED", SPAWN, {"n": 1, "memoryMib": 36})
    # Deleting gives the memory back.
    d.delete(first[0]["id"])
    d.spawn(1, memoryMib=256)
    # A sandbox that stopped (guest crash) commits nothing any more.
    d.client.expect_error(
        "ABORTED", "forkd.v1.SandboxService/Exec", {"sandboxId": fourth[0]["id"], "argv": ["crash"]}
    )
    assert d.get(fourth[0]["id"])["state"] == "SANDBOX_STATE_FAILED"
    d.spawn(1, memoryMib=256)
    assert committed_and_limit(mport) == (1024 << 20, 1024 << 20)


def test_snapshot_forks_count_the_snapshot_memory(daemon_factory):
    d = daemon_factory(extra_args=["--max-guest-memory-mib", "1024"])
    d.client.call(
        "forkd.v1.SnapshotService/CreateSnapshot",
        {"tag": "base", "memoryMib": 512},
        timeout=300,
    )
    # CreateSnapshot's sandbox is gone again: 512 MiB free for one child,
    # not for three.
    res = d.client.expect_error("RESOURCE_EXHAUSTED", SPAWN, {"snapshotTag": "base", "n": 3})
    assert re.search(r"spawning 3 sandboxes of 512 MiB asks for 1536 MiB", res.message), res.message
    d.spawn(2, snapshotTag="base")
