"""Graceful shutdown: SIGTERM drains in-flight calls, refuses new ones,
then the daemon exits 0 with no VMM left behind."""

from __future__ import annotations

import signal
import time

from forkd_daemon import wait_until
from grpcurl_client import GrpcError, decode_exec

DRAIN_GRACE_S = 2


def test_sigterm_drains_running_exec(daemon_factory):
    d = daemon_factory(extra_args=["--drain-grace", str(DRAIN_GRACE_S), "--shutdown-timeout", "30"])
    [sb] = d.spawn(1)
    vmms = d.vmm_children()
    assert [p.pid for p in vmms] == [sb["vmmPid"]], (vmms, sb)

    call = d.client.start("forkd.v1.SandboxService/Exec", {"sandboxId": sb["id"], "argv": ["sleep", "3000"]})
    try:
        # Give the command time to reach the guest before the signal.
        time.sleep(0.7)
        assert call.proc.poll() is None, "Exec sleep 3000 ended before SIGTERM"
        t_term = time.monotonic()
        d.signal(signal.SIGTERM)

        # During the drain: health says NOT_SERVING ...
        seen: list[str] = []

        def not_serving() -> bool:
            try:
                seen.append(d.anon.health(timeout=5))
            except GrpcError as e:
                seen.append(f"{e.code}: {e.message}")
            return seen[-1] == "NOT_SERVING"

        assert wait_until(not_serving, DRAIN_GRACE_S - 0.5, interval=0.05), (
            f"health never reported NOT_SERVING during the drain: {seen}\n{d.log_tail()}"
        )
        # ... and new calls are refused with UNAVAILABLE, while the listener
        # is still up (the drain grace has not run out).
        res = d.client.run(["forkd.v1.SandboxService/ListSandboxes"], {})
        assert time.monotonic() - t_term < DRAIN_GRACE_S, "checks ran past the drain grace"
        assert res.code == "UNAVAILABLE", res.describe()
        res = d.client.run(["forkd.v1.SandboxService/SpawnSandboxes"], {"n": 1})
        assert res.code == "UNAVAILABLE", res.describe()

        # The in-flight Exec still completes normally.
        done = call.wait(timeout=60)
    finally:
        call.kill()
    assert done.ok, f"in-flight Exec failed during shutdown:\n{done.describe()}\n{d.log_tail()}"
    r = decode_exec(done.messages)
    assert r.exit_code == 0
    assert r.stdout == b""
    assert r.duration_us >= 2_500_000, f"sleep 3000 ran for only {r.duration_us} us"

    # Then the daemon exits 0 and its VMMs are gone.
    rc = d.wait(60)
    assert rc == 0, f"forkd exited {rc} after SIGTERM:\n{d.log_tail()}"
    leftovers = d.leftover_vmms()
    assert leftovers == [], f"forkd-vmm processes outlived the daemon: {leftovers}"
    assert not d.running()


def test_sigterm_idle_daemon_stops_vmms(daemon):
    sandboxes = daemon.spawn(2)
    assert len(daemon.vmm_children()) == 2
    daemon.signal(signal.SIGTERM)
    rc = daemon.wait(60)
    assert rc == 0, f"forkd exited {rc} after SIGTERM:\n{daemon.log_tail()}"
    assert daemon.leftover_vmms() == []
    # Nothing answers any more on the port.
    res = daemon.anon.run(["grpc.health.v1.Health/Check"], {}, timeout=20)
    assert not res.ok, res.describe()
    assert {sb["vmmPid"] for sb in sandboxes} <= set(daemon.vmms)
