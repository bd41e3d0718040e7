"""Linux-guest requests against a real daemon on a host without hardware
virtualization, and the Linux-only fields against the reference guest.

A Linux spawn on a KVM-PVM host must fail at once (FAILED_PRECONDITION
naming the hypervisor and `forkd doctor`), not time out booting. The
other checks hold on any host: field validation and the reference guest's
refusals come before anything hypervisor-specific.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

SPAWN = "forkd.v1.SandboxService/SpawnSandboxes"
EXEC = "forkd.v1.SandboxService/Exec"
READ_CONSOLE = "forkd.v1.SandboxService/ReadConsole"


def host_is_pvm() -> bool:
    """Whether this machine's KVM is KVM-PVM (the vendor module is there)."""
    return Path("/sys/module/kvm_pvm").exists() and not any(
        Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd")
    )


@pytest.mark.skipif(not host_is_pvm(), reason="needs a KVM-PVM host")
def test_linux_spawn_fails_fast_on_pvm(daemon):
    for image in ("debian-python", "no-such-image"):
        t0 = time.monotonic()
        res = daemon.client.expect_error("FAILED_PRECONDITION", SPAWN, {"n": 1, "image": image})
        elapsed = time.monotonic() - t0
        assert elapsed < 5, f"took {elapsed:.1f}s:\n{res.describe()}"
        assert "kvm-pvm" in res.message, res.describe()
        assert "forkd doctor" in res.message, res.describe()
        assert "hardware virtualization" in res.message, res.describe()
    assert daemon.list() == [], "a refused spawn must start nothing"
    assert daemon.vmm_children() == []


@pytest.mark.skipif(not host_is_pvm(), reason="needs a KVM-PVM host")
def test_linux_create_snapshot_fails_fast_on_pvm(daemon):
    t0 = time.monotonic()
    res = daemon.client.expect_error(
        "FAILED_PRECONDITION",
        "forkd.v1.SnapshotService/CreateSnapshot",
        {"tag": "warm-linux", "image": "debian-python", "warmup": [{"argv": ["true"]}]},
    )
    assert time.monotonic() - t0 < 5, res.describe()
    assert "kvm-pvm" in res.message and "forkd doctor" in res.message, res.describe()
    assert daemon.list() == [] and daemon.list_snapshots() == []
    res = daemon.client.expect_error(
        "INVALID_ARGUMENT", "forkd.v1.SnapshotService/CreateSnapshot", {"image": "../etc"}
    )
    assert "image name" in res.message, res.describe()


def test_image_with_snapshot_tag_invalid(daemon):
    res = daemon.client.expect_error(
        "INVALID_ARGUMENT", SPAWN, {"n": 1, "image": "debian-python", "snapshotTag": "base"}
    )
    assert "not both" in res.message, res.describe()
    assert daemon.list() == []


@pytest.mark.parametrize(
    "fields",
    [
        {"env": {"A": "1"}},
        {"cwd": "/tmp"},
        {"stdin": base64.b64encode(b"hello\n").decode()},
    ],
    ids=["env", "cwd", "stdin"],
)
def test_linux_only_exec_fields_refused_by_reference_guest(daemon, fields):
    [sb] = daemon.spawn(1)
    res = daemon.client.expect_error(
        "FAILED_PRECONDITION", EXEC, {"sandboxId": sb["id"], "argv": ["echo", "x"], **fields}
    )
    assert res.message == (
        "the reference guest runs builtins only; env, cwd and stdin need a Linux image"
    ), res.describe()
    # The sandbox is fine.
    assert daemon.exec(sb["id"], ["echo", "still"]).stdout == b"still\n"


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"env": {"A=B": "1"}}, "'='"),
        ({"cwd": "relative"}, "not absolute"),
    ],
    ids=["env-key", "cwd"],
)
def test_bad_exec_fields_invalid(daemon, fields, says):
    [sb] = daemon.spawn(1)
    res = daemon.client.expect_error(
        "INVALID_ARGUMENT", EXEC, {"sandboxId": sb["id"], "argv": ["echo"], **fields}
    )
    assert says in res.message, res.describe()


def test_read_console_of_reference_guest(daemon):
    [sb] = daemon.spawn(1)
    assert sb.get("image", "") == "" and "guestBoot" not in sb, sb
    res = daemon.client.expect_error("FAILED_PRECONDITION", READ_CONSOLE, {"sandboxId": sb["id"]})
    assert "no serial console" in res.message, res.describe()
    daemon.client.expect_error(
        "INVALID_ARGUMENT", READ_CONSOLE, {"sandboxId": sb["id"], "tailBytes": (1 << 20) + 1}
    )
    daemon.client.expect_error("NOT_FOUND", READ_CONSOLE, {"sandboxId": "sb-0000000000"})
