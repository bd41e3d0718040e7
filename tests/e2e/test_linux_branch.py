"""Branching and forking Linux sandboxes on the SVM test host: a parent
runs a Python process (modules imported, a 100 MiB object, a counter in
tmpfs every 100 ms, started in the background with `setsid -f`); FULL,
DIFF and LIVE branches (LIVE with wait=true, and wait=false followed on
WatchSnapshot) each fork children in which that process lives on; children
are not clones (entropy, clock, identity); files stay apart; a SIGKILLed
daemon never leaves a LIVE snapshot READY.

One daemon and one parent serve the module (a cold boot takes about a
minute in the emulator); the daemon SIGKILL comes last. Driven with
grpcurl (the daemon helper) and the generated Python client.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from conftest import DEFAULT_ARGS
from forkd_daemon import Daemon, wait_until
from grpcurl_client import decode_exec
from machine import LOCAL, Machine
from test_linux_guest import IMAGE, image_in_machine

pytestmark = pytest.mark.svm

EXEC = "forkd.v1.SandboxService/Exec"
SPAWN = "forkd.v1.SandboxService/SpawnSandboxes"
WATCH = "forkd.v1.SnapshotService/WatchSnapshot"
FULL, DIFF, LIVE = "BRANCH_MODE_FULL", "BRANCH_MODE_DIFF", "BRANCH_MODE_LIVE"
READY, WRITING, FAILED = "SNAPSHOT_STATUS_READY", "SNAPSHOT_STATUS_WRITING", "SNAPSHOT_STATUS_FAILED"
# LIVE copies are limited so a copy lasts long enough to watch (the parent's
# RAM holds a few hundred MiB of data).
COPY_RATE_MIBPS = 64

# The warm process: imports, a 100 MiB object, a counter written every
# 100 ms. On /dev/shm/check it writes "<counter> <crc of the object>" to
# /dev/shm/check.out (so a child proves its object is intact).
WARM = r"""
import json, os, time, zlib, hashlib, decimal, email.parser, http.client
data = bytes(range(256)) * (100 * 4096)
crc = zlib.crc32(data)
with open('/dev/shm/warm.json.tmp', 'w') as f:
    json.dump({'crc': crc, 'len': len(data), 'pid': os.getpid()}, f)
os.rename('/dev/shm/warm.json.tmp', '/dev/shm/warm.json')
n = 0
while True:
    n += 1
    with open('/dev/shm/counter.tmp', 'w') as f:
        f.write(str(n))
    os.rename('/dev/shm/counter.tmp', '/dev/shm/counter')
    if os.path.exists('/dev/shm/check'):
        os.unlink('/dev/shm/check')
        with open('/dev/shm/check.tmp', 'w') as f:
            f.write(f'{n} {zlib.crc32(data)} {len(data)}')
        os.rename('/dev/shm/check.tmp', '/dev/shm/check.out')
    time.sleep(0.1)
"""


class Env:
    """The module's daemon (inside the SVM test host) and its parent."""

    def __init__(self, machine: Machine, daemon: Daemon, parent: str, inner_images: str):
        self.machine = machine
        self.daemon = daemon
        self.parent = parent
        self.inner_images = inner_images
        self.warm: dict[str, Any] = {}

    @property
    def client(self):
        return self.daemon.client

    def exec(self, sid: str, argv: list[str], **fields: Any):
        req: dict[str, Any] = {"sandboxId": sid, "argv": argv, **fields}
        r = decode_exec(self.client.stream(EXEC, req))
        return r

    def sh(self, sid: str, script: str) -> str:
        r = self.exec(sid, ["sh", "-c", script])
        assert r.exit_code == 0, (script, r.exit_code, r.stdout, r.stderr)
        return r.stdout.decode()

    def counter(self, sid: str) -> int:
        return int(self.sh(sid, "cat /dev/shm/counter"))

    def check_warm(self, sid: str) -> int:
        """The warm process in `sid` is alive with its object intact;
        returns its counter when it answered."""
        self.sh(sid, "rm -f /dev/shm/check.out; touch /dev/shm/check")
        out = ""
        for _ in range(600):
            out = self.sh(sid, "cat /dev/shm/check.out 2>/dev/null || true")
            if out:
                break
            time.sleep(0.1)
        assert out, f"the warm process in {sid} did not answer"
        n, crc, length = (int(x) for x in out.split())
        assert (crc, length) == (self.warm["crc"], self.warm["len"]), (sid, out, self.warm)
        pid = self.warm["pid"]
        assert self.sh(sid, f"cat /proc/{pid}/comm").strip() == "python3"
        return n

    def spawn(self, n: int, **fields: Any) -> list[dict]:
        resp = self.client.call(SPAWN, {"n": n, **fields}, timeout=900)
        kids = resp.get("sandboxes", [])
        self.daemon.record_sandboxes(kids)
        assert not resp.get("failures") and len(kids) == n, resp
        assert all(k["state"] == "SANDBOX_STATE_RUNNING" for k in kids), kids
        return kids

    def delete(self, sids: list[str]) -> None:
        for sid in sids:
            self.daemon.delete(sid)


@pytest.fixture(scope="module")
def env(machine: Machine, forkd_bin: Path) -> Iterator[Env]:
    if machine is LOCAL:
        pytest.skip("Linux guests need VMX or SVM: these run on the SVM test host (pytest --svm)")
    inner_images = image_in_machine(machine, forkd_bin)
    gp, hp = machine.host.take_daemon_port()
    args = list(DEFAULT_ARGS) + [
        "--images-dir", inner_images, "--linux-boot-timeout", "1200",
        "--live-copy-rate-mibps", str(COPY_RATE_MIBPS),
    ]
    d = Daemon(forkd_bin, machine.work_dir("linux-branch"), host="0.0.0.0", port=gp, client_port=hp,
               token=machine.host.token, extra_args=args, machine=machine)
    d.start()
    holder: dict[str, Daemon] = {"d": d}
    try:
        d.wait_ready()
        d.client = d.client.with_options(timeout=1500)
        # The image's least memory (448 MiB for ~103 MiB of initramfs): the
        # 100 MiB object fits beside the root; every snapshot's memory is
        # hashed when first forked (slow in TCG), so no more than that.
        [parent] = d.spawn(1, image=IMAGE, vcpus=1, memoryMib=448)
        d.client = d.client.with_options(timeout=900)
        e = Env(machine, d, parent["id"], inner_images)
        e.holder = holder  # type: ignore[attr-defined]
        e.sh(e.parent, "echo parent-file > /root/shared.txt")
        e.exec(e.parent, ["sh", "-c", "setsid -f python3 -c \"$WARM\" >/dev/null 2>&1 </dev/null"], env={"WARM": WARM})
        assert wait_until(lambda: e.sh(e.parent, "cat /dev/shm/warm.json 2>/dev/null || true") != "", timeout=600)
        e.warm = json.loads(e.sh(e.parent, "cat /dev/shm/warm.json"))
        assert wait_until(lambda: e.counter(e.parent) > 3, timeout=300)
        yield e
    finally:
        dd = holder["d"]
        rc, leftovers = dd.stop(timeout=300)
        machine.host.release_daemon_port(gp)
        assert not leftovers, f"VMMs left after the daemon stopped: {leftovers}"


def children_continue(e: Env, tag: str, before: int, after: int, n: int = 3) -> list[str]:
    """Forks `n` children of `tag`; in each the warm process lives with its
    object, its counter starting from the branch instant (between the
    parent's readings `before` and `after` the branch) and going on."""
    t0 = time.monotonic()
    kids = e.spawn(n, snapshotTag=tag)
    sids = [k["id"] for k in kids]
    for k in kids:
        assert k["image"] == IMAGE and k["snapshotTag"] == tag, k
        first = e.counter(k["id"])
        # Ticks are at most 10 a second of the child's own (monotonic) time.
        limit = after + 10 * (time.monotonic() - t0) + 20
        assert before <= first <= limit, (tag, k["id"], before, first, after, limit)
        n_check = e.check_warm(k["id"])
        assert n_check >= first
    print(f"{tag}: {n} children continue from the branch instant (parent {before}..{after})")
    return sids


def test_full_branch_children_continue(env: Env) -> None:
    e = env
    e.warm["uptime_before_full"] = float(e.sh(e.parent, "cut -d' ' -f1 /proc/uptime"))
    before = e.counter(e.parent)
    resp = e.daemon.branch(e.parent, "lx-full", FULL)
    e.warm["full_taken"] = time.monotonic()
    after = e.counter(e.parent)
    snap = resp["snapshot"]
    assert (snap["status"], snap["image"]) == (READY, IMAGE), snap
    sids = children_continue(e, "lx-full", before, after)
    assert e.check_warm(e.parent) > after
    e.delete(sids)


def test_diff_branch_children_continue(env: Env) -> None:
    e = env
    before = e.counter(e.parent)
    resp = e.daemon.branch(e.parent, "lx-diff", DIFF)
    after = e.counter(e.parent)
    snap = resp["snapshot"]
    assert (snap["status"], snap["parentTag"], snap["image"]) == (READY, "lx-full", IMAGE), snap
    assert int(resp.get("dirtyPages", 0)) > 0, resp
    e.delete(children_continue(e, "lx-diff", before, after))


def test_live_wait_true_children_continue(env: Env) -> None:
    e = env
    before = e.counter(e.parent)
    resp = e.daemon.branch(e.parent, "lx-live", LIVE)
    after = e.counter(e.parent)
    assert resp["snapshot"]["status"] == READY, resp
    # The parent ran through the copy: its writes were served by copying
    # the page first.
    assert int(resp.get("faultsServed", 0)) > 0, resp
    e.delete(children_continue(e, "lx-live", before, after))


def test_live_wait_false_watched_to_ready_children_continue(env: Env) -> None:
    e = env
    before = e.counter(e.parent)
    resp = e.daemon.branch(e.parent, "lx-live-nw", LIVE, wait=False)
    assert resp["snapshot"]["status"] == WRITING, resp
    during = e.counter(e.parent)
    watch = e.daemon.start_watch("lx-live-nw")
    try:
        res = watch.wait(timeout=900)
    finally:
        watch.kill()
    assert res.ok, res.describe()
    statuses = [m["status"] for m in res.messages]
    assert statuses[0] == WRITING and statuses[-1] == READY and FAILED not in statuses, statuses
    after_ready = e.counter(e.parent)
    assert after_ready > during >= before, (before, during, after_ready)
    e.delete(children_continue(e, "lx-live-nw", before, during))


def test_children_are_not_clones(env: Env) -> None:
    """10 siblings: os.urandom, uuid4 and a freshly seeded random all
    differ between them and from the parent; each knows its own id.

    Each sibling's one Exec first stops its copy of the warm process: ten
    of them waking every 100 ms saturate the emulated CPU (Execs then take
    minutes), and this test is about entropy, not about the warm process.
    The ten Execs run at once."""
    e = env
    script = "import os, uuid, random; print(os.urandom(16).hex(), uuid.uuid4(), random.Random().getrandbits(64))"
    parent_vals = e.exec(e.parent, ["python3", "-c", script]).stdout.decode().split()
    kids = e.spawn(10, snapshotTag="lx-full")
    probe = 'kill "$1"; python3 -c "$2"; hostname; cat /run/forkd/sandbox-id'
    argv = ["sh", "-c", probe, "sh", str(e.warm["pid"]), script]
    with ThreadPoolExecutor(max_workers=len(kids)) as pool:
        results = list(pool.map(lambda k: e.exec(k["id"], argv), kids))
    values: list[str] = []
    rand: list[str] = []
    for k, r in zip(kids, results):
        sid = k["id"]
        assert r.exit_code == 0, (sid, r.stdout, r.stderr)
        urnd, uid, rnd, hostname, sandbox_id = r.stdout.decode().split()
        uuid.UUID(uid)
        values += [urnd, uid]
        rand.append(rnd)
        assert (hostname, sandbox_id) == (sid, sid), r.stdout
    assert len(set(values)) == 20, values
    assert not set(values) & set(parent_vals[:2]), (values, parent_vals)
    assert len(set(rand)) == 10 and parent_vals[2] not in rand, (rand, parent_vals)
    print("10 siblings: 20 distinct urandom/uuid4 values, none the parent's")
    e.delete([k["id"] for k in kids])


def test_files_are_inherited_and_stay_apart(env: Env) -> None:
    e = env
    a, b = (k["id"] for k in e.spawn(2, snapshotTag="lx-full"))
    for sid in (a, b):
        assert e.sh(sid, "cat /root/shared.txt") == "parent-file\n"
    e.sh(a, "echo from-a > /root/a.txt; echo changed-in-a > /root/shared.txt")
    assert e.sh(a, "cat /root/a.txt /root/shared.txt") == "from-a\nchanged-in-a\n"
    for sid in (b, e.parent):
        assert e.sh(sid, "cat /root/shared.txt; test -e /root/a.txt && echo leaked || echo absent") == "parent-file\nabsent\n"
    e.delete([a, b])


def test_child_clock_is_stepped_and_monotonic(env: Env) -> None:
    """A child spawned 60 s (or more) after its snapshot reads the host's
    wall clock (within 2 s); its monotonic clock continues from the
    parent's at the snapshot, never behind it."""
    e = env
    mono_before = e.warm["uptime_before_full"]
    time.sleep(max(0.0, 60 - (time.monotonic() - e.warm["full_taken"])))
    assert time.monotonic() - e.warm["full_taken"] >= 60
    [kid] = e.spawn(1, snapshotTag="lx-full")
    host_before = float(e.machine.run(["date", "+%s.%N"]).stdout)
    r = e.exec(kid["id"], ["sh", "-c", "date +%s.%N; cut -d' ' -f1 /proc/uptime"])
    host_after = float(e.machine.run(["date", "+%s.%N"]).stdout)
    guest_now, uptime = (float(x) for x in r.stdout.decode().split())
    # The child read its clock between the two readings of the host's.
    assert host_before - 2.0 <= guest_now <= host_after + 2.0, (host_before, guest_now, host_after)
    assert uptime >= mono_before, (uptime, mono_before)
    print(
        f"child 60 s after its snapshot: date {guest_now - host_before:+.3f} s after the host's reading "
        f"before the Exec, {guest_now - host_after:+.3f} s after the one after it"
    )
    e.delete([kid["id"]])


def test_exec_running_at_branch_is_gone_in_children(env: Env) -> None:
    """An Exec still running when the branch is taken finishes normally in
    the parent; in children it is gone (no such process). Branch, spawn and
    Exec here go through the generated Python client."""
    import threading

    from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc, snapshot_pb2

    e = env
    md = [("authorization", f"Bearer {e.machine.host.token}")]
    with grpc.insecure_channel(f"127.0.0.1:{e.daemon.client_port}") as ch:
        stub = sandbox_pb2_grpc.SandboxServiceStub(ch)

        def run(sid: str, script: str) -> tuple[bytes, int]:
            out, code = b"", -1
            for m in stub.Exec(sandbox_pb2.ExecRequest(sandbox_id=sid, argv=["sh", "-c", script]), metadata=md, timeout=900):
                if m.WhichOneof("event") == "stdout":
                    out += m.stdout
                elif m.WhichOneof("event") == "exit":
                    code = m.exit.exit_code
            return out, code

        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=run(e.parent, "echo $$ > /dev/shm/long.pid; sleep 20; echo done")))
        t.start()
        assert wait_until(lambda: run(e.parent, "cat /dev/shm/long.pid 2>/dev/null")[0] != b"", timeout=300)
        pid = run(e.parent, "cat /dev/shm/long.pid")[0].decode().strip()
        resp = stub.BranchSandbox(
            sandbox_pb2.BranchSandboxRequest(sandbox_id=e.parent, tag="lx-running", mode=snapshot_pb2.BRANCH_MODE_FULL),
            metadata=md, timeout=900,
        )
        assert resp.snapshot.status == snapshot_pb2.SNAPSHOT_STATUS_READY and resp.snapshot.image == IMAGE
        spawned = stub.SpawnSandboxes(sandbox_pb2.SpawnSandboxesRequest(snapshot_tag="lx-running", n=1), metadata=md, timeout=900)
        [kid] = spawned.sandboxes
        assert kid.image == IMAGE and kid.state == sandbox_pb2.SANDBOX_STATE_RUNNING
        out, code = run(kid.id, f"test -e /proc/{pid} && cat /proc/{pid}/stat || echo gone")
        assert code == 0 and (out.strip() == b"gone" or b" Z " in out), out
        assert run(kid.id, "hostname") == (kid.id.encode() + b"\n", 0)
        t.join(timeout=600)
        assert result["r"] == (b"done\n", 0), result
        stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(id=kid.id), metadata=md, timeout=120)


def test_create_snapshot_of_an_image(env: Env) -> None:
    """CreateSnapshot boots the image, runs the warm-up commands and takes
    the snapshot; its children hold what the warm-up left."""
    e = env
    req = {
        "tag": "lx-created", "image": IMAGE, "vcpus": 1, "memoryMib": 448,
        "warmup": [{"argv": ["sh", "-c", "echo warmed > /root/warm.txt"]}, {"argv": ["python3", "-c", "import json"]}],
    }  # fmt: skip
    resp = e.client.call("forkd.v1.SnapshotService/CreateSnapshot", req, timeout=1500)
    snap = resp["snapshot"]
    assert (snap["status"], snap["image"], snap["mode"]) == (READY, IMAGE, FULL), snap
    assert not resp.get("sandboxId"), resp
    [kid] = e.spawn(1, snapshotTag="lx-created")
    assert e.sh(kid["id"], "cat /root/warm.txt; hostname") == f"warmed\n{kid['id']}\n"
    e.delete([kid["id"]])


def test_daemon_sigkill_mid_live_copy(env: Env, forkd_bin: Path) -> None:
    """SIGKILL of the daemon while a LIVE copy of the Linux parent runs:
    after a restart on the same data directory the snapshot is FAILED,
    never READY, and the parent (its VMM gone with the daemon's control
    socket) is not reported as running."""
    e = env
    d = e.daemon
    resp = d.branch(e.parent, "lx-doomed", LIVE, wait=False)
    assert resp["snapshot"]["status"] == WRITING, resp
    vmms = d.vmm_children()
    assert d.kill9() == -signal.SIGKILL
    m = e.machine
    # The VMMs see their control socket close and exit.
    assert wait_until(lambda: not [p for p in vmms if m.still_running(p)], 120, interval=0.5), vmms
    d2 = Daemon(forkd_bin, m.work_dir("linux-branch-restarted"), data_dir=d.data_dir, host="0.0.0.0",
                port=d.port, client_port=d.client_port, token=e.machine.host.token,
                extra_args=d.extra_args, machine=m)
    d2.start()
    e.holder["d"] = d2  # type: ignore[attr-defined]
    d2.wait_ready()
    snap = d2.get_snapshot("lx-doomed")
    assert snap["status"] == FAILED and snap.get("failureReason"), snap
    msgs = d2.client.stream(WATCH, {"tag": "lx-doomed"})
    assert [m["status"] for m in msgs] == [FAILED], msgs
    d2.client.expect_error("NOT_FOUND", "forkd.v1.SandboxService/GetSandbox", {"id": e.parent})
    assert not [p for p in m.orphaned_vmms() if p.state not in ("Z", "X")]
    m.reap_orphans()
    # READY snapshots taken before still fork.
    e.daemon = d2
    [kid] = e.spawn(1, snapshotTag="lx-full")
    assert e.check_warm(kid["id"]) > 0
