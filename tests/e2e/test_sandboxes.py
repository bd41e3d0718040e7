"""Sandbox lifecycle, lookups, label selection and request validation."""

from __future__ import annotations

import pytest

from forkd_daemon import wait_until

UNKNOWN_ID = "sb-0000000000"


@pytest.mark.svm
def test_delete_stops_vmm_and_cleans_data_dir(daemon):
    keep, doomed = daemon.spawn(2)
    got = daemon.get(doomed["id"])
    pid = got["vmmPid"]
    assert pid > 0, got
    m = daemon.machine
    vmm = m.proc_info(pid)
    assert vmm is not None and m.still_running(vmm), f"VMM {pid} not running before delete"
    sb_dir = daemon.data_dir / "sandboxes" / doomed["id"]
    assert sb_dir.is_dir(), f"{sb_dir} missing while the sandbox runs"
    assert (sb_dir / "vmm.log").is_file(), f"{sb_dir}/vmm.log missing"

    deleted = daemon.delete(doomed["id"])
    assert deleted.get("id") == doomed["id"], deleted

    assert not m.still_running(vmm), f"VMM pid {pid} still running after DeleteSandbox returned"
    assert wait_until(lambda: not m.still_exists(vmm), 5 * m.slowness), f"VMM pid {pid} never reaped (zombie)"
    assert not sb_dir.exists(), f"{sb_dir} still exists: {list(sb_dir.rglob('*'))}"

    daemon.client.expect_error("NOT_FOUND", "forkd.v1.SandboxService/GetSandbox", {"id": doomed["id"]})
    assert [s["id"] for s in daemon.list()] == [keep["id"]]
    # The other sandbox is untouched.
    assert daemon.exec(keep["id"], ["echo", "kept"]).stdout == b"kept\n"
    # Deleting twice: the second time the sandbox is unknown.
    daemon.client.expect_error("NOT_FOUND", "forkd.v1.SandboxService/DeleteSandbox", {"id": doomed["id"]})


@pytest.mark.svm
@pytest.mark.parametrize("sandbox_id", [UNKNOWN_ID, "no-such-sandbox"])
def test_unknown_id_not_found(daemon, sandbox_id):
    c = daemon.client
    res = c.expect_error("NOT_FOUND", "forkd.v1.SandboxService/GetSandbox", {"id": sandbox_id})
    assert res.message, res.describe()
    c.expect_error(
        "NOT_FOUND", "forkd.v1.SandboxService/Exec", {"sandboxId": sandbox_id, "argv": ["echo", "x"]}
    )
    c.expect_error("NOT_FOUND", "forkd.v1.SandboxService/DeleteSandbox", {"id": sandbox_id})


@pytest.mark.parametrize(
    "request_body",
    [
        {"n": 0},
        {"n": 100000},
        {"n": 1, "labels": {"Bad Key!": "x"}},
        {"n": 1, "labels": {"ok": "bad value!"}},
        {"n": 1, "vcpus": 9},
    ],
    ids=["n=0", "n=100000", "bad-label-key", "bad-label-value", "vcpus=9"],
)
@pytest.mark.svm
def test_spawn_invalid_argument(daemon, request_body):
    res = daemon.client.expect_error(
        "INVALID_ARGUMENT", "forkd.v1.SandboxService/SpawnSandboxes", request_body
    )
    assert res.message, f"INVALID_ARGUMENT without an actionable message: {res.describe()}"
    assert daemon.list() == [], "a rejected spawn must start nothing"
    assert daemon.vmm_children() == []


@pytest.mark.svm
def test_exec_empty_argv_invalid_argument(daemon):
    [sb] = daemon.spawn(1)
    res = daemon.client.expect_error(
        "INVALID_ARGUMENT", "forkd.v1.SandboxService/Exec", {"sandboxId": sb["id"], "argv": []}
    )
    assert res.message, res.describe()
    assert daemon.exec(sb["id"], ["echo", "fine"]).stdout == b"fine\n"


def test_list_label_selector(daemon):
    team_a = daemon.spawn(2, labels={"team": "a", "env": "test"})
    team_b = daemon.spawn(1, labels={"team": "b", "env": "test"})
    ids_a = sorted(s["id"] for s in team_a)
    id_b = team_b[0]["id"]
    for sb in team_a:
        assert sb["labels"] == {"team": "a", "env": "test"}, sb

    def ids(selector):
        return sorted(s["id"] for s in daemon.list(selector))

    assert ids({"team": "a"}) == ids_a
    assert ids({"team": "b"}) == [id_b]
    assert ids({"env": "test"}) == sorted(ids_a + [id_b])
    assert ids({"team": "a", "env": "test"}) == ids_a
    assert ids({"team": "a", "env": "prod"}) == []
    assert ids({"team": "c"}) == []
    assert ids({"owner": "a"}) == []
    # No selector: everything, oldest first.
    listed = daemon.list()
    assert sorted(s["id"] for s in listed[:2]) == ids_a and listed[2]["id"] == id_b, listed
    assert [s["labels"] for s in daemon.list({"team": "b"})] == [{"team": "b", "env": "test"}]


def test_second_daemon_on_same_data_dir_refused(daemon, daemon_factory):
    second = daemon_factory(wait=False, data_dir=daemon.data_dir)
    second.expect_clean_exit = False
    rc = second.wait(30)
    assert rc is not None and rc != 0, (
        f"a second forkd on {daemon.data_dir} did not refuse to start (rc={rc}):\n{second.log_tail()}"
    )
    assert (daemon.data_dir / "forkd.lock").exists()
    assert daemon.anon.health() == "SERVING"


def test_empty_id_invalid_argument(daemon):
    c = daemon.client
    c.expect_error("INVALID_ARGUMENT", "forkd.v1.SandboxService/GetSandbox", {"id": ""})
    c.expect_error("INVALID_ARGUMENT", "forkd.v1.SandboxService/DeleteSandbox", {})
    c.expect_error("INVALID_ARGUMENT", "forkd.v1.SandboxService/Exec", {"argv": ["echo"]})
