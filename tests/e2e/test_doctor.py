"""`forkd doctor`: host checks and the daemon health check, human and JSON
output, exit codes (0 nothing failed, 1 a check failed, 2 usage error).

The hypervisor the doctor names is compared with what /proc and /sys say
on this machine, not with a fixed answer.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from forkd_daemon import free_port, wait_until
from machine import LOCAL, Machine

CHECKS = [
    "kvm",
    "hypervisor",
    "dirty_log",
    "memfd",
    "userfaultfd_wp",
    "hugepages",
    "vmm_binary",
    "data_dir",
    "daemon",
]
TOP_KEYS = {"schema_version", "forkd_version", "status", "exit_code", "summary", "checks"}
CHECK_KEYS = {"name", "status", "finding", "hint", "elapsed_ms", "details"}
STATUSES = {"ok", "warn", "fail", "skip"}
BACKEND_MODULES = {"kvm_intel": "vmx", "kvm_amd": "svm", "kvm_pvm": "pvm"}
TITLES = {"vmx": "Intel VMX", "svm": "AMD SVM", "pvm": "KVM-PVM"}
# forkd_guest_abi::MIN_MEMORY_MIB: the smallest sandbox the huge page pool must fit.
MIN_MEMORY_MIB = 36


def doctor(forkd_bin: Path, *args: str, machine: Machine = LOCAL) -> subprocess.CompletedProcess[str]:
    """`forkd doctor ARGS` on `machine` (this one, or the SVM test host)."""
    res = machine.run([str(forkd_bin), "doctor", *args], timeout=60 * machine.slowness)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())


def doctor_json(forkd_bin: Path, *args: str, machine: Machine = LOCAL) -> tuple[int, dict]:
    res = doctor(forkd_bin, "--json", *args, machine=machine)
    try:
        doc = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"not JSON ({e}): rc={res.returncode}\n{res.stdout}\n{res.stderr}")
    assert doc["exit_code"] == res.returncode, doc
    return res.returncode, doc


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def expected_backend(machine: Machine = LOCAL) -> str | None:
    """What /proc/modules, /sys/module and /proc/cpuinfo of `machine` say
    backs /dev/kvm."""
    names: set[str] = set()
    known = False
    try:
        text = machine.path("/proc/modules").read_text()
        names |= {line.split()[0] for line in text.splitlines() if line}
        known = True
    except OSError:
        pass
    try:
        names |= {p.name for p in machine.path("/sys/module").iterdir()}
        known = True
    except OSError:
        pass
    loaded = sorted(b for m, b in BACKEND_MODULES.items() if m in names)
    if len(loaded) == 1:
        return loaded[0]
    if loaded or known:
        return None
    flags: set[str] = set()
    for line in machine.path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() == "flags":
            flags = set(line.split(":", 1)[1].split())
            break
    if ("vmx" in flags) != ("svm" in flags):
        return "vmx" if "vmx" in flags else "svm"
    return None


def huge_pool(machine: Machine = LOCAL) -> dict[str, int]:
    """The HugePages_* and Hugepagesize fields of `machine`'s /proc/meminfo."""
    pool = {}
    for line in machine.path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("HugePages_") or key == "Hugepagesize":
            pool[key] = int(rest.split()[0])
    return pool


def expected_statuses(machine: Machine = LOCAL) -> dict[str, str]:
    """Every host check ok, except `hugepages`, which warns unless
    `machine` has a 2 MiB pool with room for the smallest sandbox (the
    pool is the host's business, not the test's)."""
    pool = huge_pool(machine)
    room_mib = (pool.get("HugePages_Free", 0) - pool.get("HugePages_Rsvd", 0)) * 2
    usable = pool.get("Hugepagesize") == 2048 and room_mib >= MIN_MEMORY_MIB
    return {n: "warn" if n == "hugepages" and not usable else "ok" for n in CHECKS}


def check_schema(doc: dict) -> None:
    assert set(doc) == TOP_KEYS, sorted(doc)
    assert doc["schema_version"] == 1
    assert isinstance(doc["forkd_version"], str) and doc["forkd_version"]
    assert doc["status"] in {"ok", "warn", "fail"}
    assert set(doc["summary"]) == STATUSES
    assert [c["name"] for c in doc["checks"]] == CHECKS
    for c in doc["checks"]:
        assert set(c) == CHECK_KEYS, (c["name"], sorted(c))
        assert c["status"] in STATUSES
        assert isinstance(c["finding"], str) and c["finding"] and "\n" not in c["finding"]
        assert isinstance(c["details"], dict)
        assert isinstance(c["elapsed_ms"], (int, float)) and c["elapsed_ms"] >= 0
        if c["status"] == "ok":
            assert c["hint"] is None, c
        else:
            assert isinstance(c["hint"], str) and c["hint"], c
    counts = {s: sum(c["status"] == s for c in doc["checks"]) for s in STATUSES}
    assert doc["summary"] == counts
    worst = "fail" if counts["fail"] else "warn" if counts["warn"] else "ok"
    assert doc["status"] == worst
    assert doc["exit_code"] == (1 if counts["fail"] else 0)


@pytest.mark.svm
def test_json_against_running_daemon(daemon, forkd_bin):
    """Every check ok against a running daemon, on the machine the daemon
    runs on (here, or inside the SVM test host), and the hypervisor named
    is the one that machine's /proc and /sys show."""
    m = daemon.machine
    target = f"127.0.0.1:{daemon.port}"
    rc, doc = doctor_json(forkd_bin, "--target", target, "--data-dir", str(daemon.data_dir), machine=m)
    check_schema(doc)
    checks = by_name(doc)
    assert rc == 0, json.dumps(doc, indent=2)
    want_statuses = expected_statuses(m)
    assert {n: c["status"] for n, c in checks.items()} == want_statuses, json.dumps(doc, indent=2)
    warns = list(want_statuses.values()).count("warn")
    assert doc["status"] == ("warn" if warns else "ok")
    assert doc["summary"] == {"ok": len(CHECKS) - warns, "warn": warns, "fail": 0, "skip": 0}

    kvm = checks["kvm"]
    assert kvm["details"]["api_version"] == 12
    assert kvm["details"]["max_vcpus"] >= 1

    hv = checks["hypervisor"]
    want = expected_backend(m)
    assert want is not None, "this machine's /proc and /sys name no single KVM backend"
    assert hv["details"]["backend"] == want, hv
    assert hv["finding"].startswith(TITLES[want]), hv["finding"]
    assert hv["details"]["guest_cpl0_native"] == (want != "pvm")
    module = next(mod for mod, b in BACKEND_MODULES.items() if b == want)
    assert module in hv["details"]["modules"]
    # EPT/NPT as the vendor module's parameter says (none for PVM).
    param = {"vmx": "ept", "svm": "npt"}.get(want)
    tdp = None
    if param:
        raw = m.path(f"/sys/module/{module}/parameters/{param}").read_text().strip()
        tdp = raw in ("Y", "1")
    assert hv["details"]["two_dimensional_paging"] == tdp, hv

    assert checks["userfaultfd_wp"]["details"]["faults_caught"] == 1
    assert checks["dirty_log"]["details"]["pages"] == 16
    hp, pool = checks["hugepages"]["details"], huge_pool(m)
    assert hp["total"] == pool["HugePages_Total"], (hp, pool)
    assert hp["page_size_kib"] == pool["Hugepagesize"], (hp, pool)
    assert checks["vmm_binary"]["details"]["path"] == str(forkd_bin.parent / "forkd-vmm")

    dd = checks["data_dir"]["details"]
    assert dd["existed"] is True
    assert dd["path"] == str(daemon.data_dir)
    assert dd["avail_bytes"] > 0 and dd["total_bytes"] >= dd["avail_bytes"]
    assert dd["lock_holder_pid"] == daemon.pid, "the running daemon holds forkd.lock"
    assert isinstance(dd["fs_type"], str) and dd["fs_type"]

    d = checks["daemon"]
    assert d["details"]["serving_status"] == "SERVING"
    assert d["details"]["target"] == target
    assert d["details"]["target_explicit"] is True
    # Doctor must not disturb the daemon.
    assert daemon.client.health() == "SERVING"


def test_human_output(daemon, forkd_bin):
    res = doctor(forkd_bin, "--target", daemon.listen, "--data-dir", str(daemon.data_dir))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert re.fullmatch(r"forkd doctor \d+\.\d+\.\d+\S*", lines[0]), lines[0]
    assert lines[1] == ""
    want = expected_statuses()
    # One aligned line per check: status, name, finding, in fixed columns;
    # a warning's hint on the line below it.
    width = max(len(n) for n in CHECKS)
    rows = [line for line in lines[2:-2] if not line.lstrip().startswith("hint: ")]
    assert len(rows) == len(CHECKS), lines
    for name, row in zip(CHECKS, rows):
        assert row.startswith(f"{want[name].upper():<4}  {name.ljust(width)}  "), row
        assert len(row) > 6 + width + 2
    warns = list(want.values()).count("warn")
    assert res.stdout.count("hint:") == warns
    verdict = "forkd can run here; see the warnings" if warns else "forkd can run here"
    assert lines[-1] == (
        f"{len(CHECKS) - warns} ok, {warns} warning{'' if warns == 1 else 's'}, 0 failed, 0 skipped: "
        f"{verdict} (exit 0)"
    )
    assert f"forkd at {daemon.listen} is SERVING" in res.stdout


def test_unix_socket_target(daemon_factory, forkd_bin, short_tmp):
    sock = short_tmp / "forkd.sock"
    d = daemon_factory(listen_unix=sock)
    rc, doc = doctor_json(forkd_bin, "--target", f"unix:{sock}", "--data-dir", str(d.data_dir))
    daemon_check = by_name(doc)["daemon"]
    assert rc == 0 and daemon_check["status"] == "ok", daemon_check
    assert daemon_check["details"]["target"] == f"unix:{sock}"


def test_nothing_listening_fails_with_hint(forkd_bin, tmp_path):
    target = f"127.0.0.1:{free_port()}"
    rc, doc = doctor_json(forkd_bin, "--target", target, "--data-dir", str(tmp_path))
    check_schema(doc)
    assert rc == 1
    checks = by_name(doc)
    assert checks["daemon"]["status"] == "fail"
    assert target in checks["daemon"]["finding"]
    assert "forkd serve" in checks["daemon"]["hint"]
    assert doc["status"] == "fail" and doc["summary"]["fail"] == 1
    # Everything about the host is still fine.
    want = expected_statuses()
    assert all(c["status"] == want[n] for n, c in checks.items() if n != "daemon"), doc

    res = doctor(forkd_bin, "--target", target, "--data-dir", str(tmp_path))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    [i] = [i for i, line in enumerate(lines) if line.startswith("FAIL  daemon")]
    assert lines[i + 1].lstrip().startswith("hint: start it"), lines[i + 1]
    assert "1 failed" in lines[-1] and lines[-1].endswith("(exit 1)")


def test_default_target_unreachable_is_a_warning(forkd_bin, tmp_path):
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", 50051)) == 0:
            pytest.skip("something listens on the default 127.0.0.1:50051 here")
    rc, doc = doctor_json(forkd_bin, "--data-dir", str(tmp_path))
    d = by_name(doc)["daemon"]
    assert rc == 0, doc
    assert d["status"] == "warn" and d["details"]["target_explicit"] is False
    assert "--no-daemon" in d["hint"]


def test_data_dir_under_a_regular_file_fails(forkd_bin, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    rc, doc = doctor_json(forkd_bin, "--no-daemon", "--data-dir", str(blocker / "data"))
    check_schema(doc)
    assert rc == 1
    checks = by_name(doc)
    dd = checks["data_dir"]
    assert dd["status"] == "fail"
    assert dd["finding"] == f"{blocker} exists but is not a directory"
    assert "--data-dir" in dd["hint"]
    assert checks["daemon"]["status"] == "skip"
    assert blocker.read_text() == "not a directory\n"


def test_missing_data_dir_is_tested_and_removed(forkd_bin, tmp_path):
    rc, doc = doctor_json(forkd_bin, "--no-daemon", "--data-dir", str(tmp_path / "a" / "b"))
    dd = by_name(doc)["data_dir"]
    assert rc == 0 and dd["status"] == "ok", dd
    assert dd["details"]["existed"] is False
    assert "can be created" in dd["finding"]
    assert list(tmp_path.iterdir()) == [], "doctor left something behind"


def test_draining_daemon_is_a_warning(daemon_factory, forkd_bin):
    d = daemon_factory(extra_args=["--drain-grace", "3"])
    d.signal(signal.SIGTERM)
    assert wait_until(lambda: d.anon.health() == "NOT_SERVING", 5), "health never turned NOT_SERVING"
    rc, doc = doctor_json(forkd_bin, "--target", d.listen, "--data-dir", str(d.data_dir))
    daemon_check = by_name(doc)["daemon"]
    assert rc == 0, doc
    assert daemon_check["status"] == "warn"
    assert daemon_check["details"]["serving_status"] == "NOT_SERVING"
    assert "draining" in daemon_check["finding"]
    assert d.wait(30) == 0


def test_ci_command(forkd_bin, tmp_path):
    """What CI runs: host checks only, exit 0 on a good host."""
    res = doctor(forkd_bin, "--no-daemon", "--data-dir", str(tmp_path / "ci"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^SKIP  daemon +--no-daemon given$", res.stdout, re.M), res.stdout
    assert "0 failed, 1 skipped" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--target", "https://127.0.0.1:1"],
        ["--target", "nonsense"],
        ["--target", "127.0.0.1:1", "--no-daemon"],
        ["--no-such-flag"],
    ],
)
def test_usage_errors_exit_2(forkd_bin, args):
    res = doctor(forkd_bin, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == ""
    assert "Usage:" in res.stderr or "error:" in res.stderr
