"""forkd behind its Envoy sidecar (`server/deploy/envoy/envoy.yaml`), on
loopback: grpcurl and the generated Python client reach the daemon only
through Envoy.

- unary calls keep their status codes through the proxy, reflection and
  health work, the active gRPC health check sees the daemon;
- an Exec stream that lasts longer than Envoy's default 15 s route timeout
  completes, and a WatchSnapshot stream follows a LIVE copy to READY;
- on SIGTERM (with --drain-grace) Envoy marks the host unhealthy before the
  daemon stops accepting connections, new calls through Envoy get
  UNAVAILABLE, and an Exec in flight through Envoy completes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import forkd
from envoy_proxy import Envoy
from forkd_daemon import Daemon
from grpcurl_client import Grpcurl

MEM = 64

READY = forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_READY")
WRITING = forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_WRITING")


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Callable[[Daemon], Envoy]]:
    started: list[Envoy] = []

    def start(d: Daemon) -> Envoy:
        e = Envoy(tmp_path / f"envoy{len(started)}", d.port)
        started.append(e)
        return e.start().wait_healthy()

    yield start
    for e in started:
        e.stop()


def test_calls_streams_and_health_through_envoy(daemon_factory, sidecar) -> None:
    # A throttled copy keeps the LIVE snapshot WRITING for a few seconds.
    d = daemon_factory(extra_args=["--live-copy-rate-mibps", "16"])
    envoy = sidecar(d)
    via = Grpcurl(envoy.listen)

    # Reflection (a bidi stream) and health, through the proxy.
    assert "forkd.v1.SandboxService" in via.list_services()
    assert via.health() == "SERVING"
    assert envoy.stat("cluster.forkd.health_check.success") >= 1

    with forkd.Controller(envoy.listen, timeout=60) as ctl:
        sb = ctl.spawn_sandboxes(memory_mib=MEM).sandboxes[0]
        assert ctl.exec(sb.id, ["echo", "through", "envoy"]).stdout == b"through envoy\n"
        assert via.exec(sb.id, ["echo", "grpcurl"]).stdout == b"grpcurl\n"

        # Status codes survive the proxy.
        with pytest.raises(forkd.NotFoundError):
            ctl.get_sandbox("sb-doesnotexist")
        with pytest.raises(forkd.InvalidArgumentError):
            ctl.spawn_sandboxes(n=0)
        via.expect_error("NOT_FOUND", "forkd.v1.SnapshotService/GetSnapshot", {"tag": "nope"})

        # WatchSnapshot: a LIVE copy of 24 MiB at 16 MiB/s, followed to READY.
        assert ctl.exec(sb.id, ["fill", "24", "9"]).ok
        branch = ctl.branch_sandbox(sb.id, "via-envoy", mode="live", wait=False)
        assert branch.snapshot.status == WRITING
        updates = list(ctl.watch_snapshot("via-envoy", timeout=120))
        assert updates[-1].status == READY
        assert sum(1 for u in updates if u.status == WRITING) >= 3, "expected progress while WRITING"
        assert updates[-1].bytes_copied == updates[-1].bytes_total > 0

        child = ctl.spawn_sandboxes("via-envoy").sandboxes[0]
        assert ctl.exec(child.id, ["checksum"]).text == ctl.exec(sb.id, ["checksum"]).text

    assert envoy.stat("cluster.forkd.upstream_rq_total") >= 10
    assert envoy.host_health() == "healthy"


def test_exec_stream_outlives_envoys_default_route_timeout(daemon, sidecar) -> None:
    envoy = sidecar(daemon)
    with forkd.Controller(envoy.listen) as ctl:
        sb = ctl.spawn_sandboxes(memory_mib=MEM).sandboxes[0]
        t0 = time.monotonic()
        events = list(ctl.exec_stream(sb.id, ["sleep", "16500"]))
        elapsed = time.monotonic() - t0
    assert events[-1].kind == "exit" and events[-1].exit_code == 0, events
    assert elapsed > 16, elapsed  # Envoy's default route timeout is 15 s
    assert (events[-1].duration_us or 0) >= 16_500_000


def connect_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def test_sigterm_drain_moves_traffic_before_the_daemon_stops(daemon_factory, sidecar) -> None:
    grace = 3
    d = daemon_factory(extra_args=["--drain-grace", str(grace)])
    envoy = sidecar(d)

    ctl = forkd.Controller(envoy.listen, timeout=60)
    sb = ctl.spawn_sandboxes(memory_mib=MEM).sandboxes[0]
    assert len(d.vmm_children()) == 1

    # An Exec in flight through Envoy when the daemon is told to stop.
    result: dict[str, object] = {}

    def run_exec() -> None:
        try:
            result["exec"] = ctl.exec(sb.id, ["sleep", "7000"])
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    worker = threading.Thread(target=run_exec)
    worker.start()
    time.sleep(1.0)  # the call has reached the daemon (it needs ~1 ms)

    t_term = time.monotonic()
    d.signal(15)
    t_unhealthy = t_refused = None
    unavailable_seen = False
    deadline = t_term + 20
    while time.monotonic() < deadline and (t_unhealthy is None or t_refused is None):
        now = time.monotonic()
        if t_unhealthy is None and "failed_active_hc" in envoy.host_health():
            t_unhealthy = now
            # Envoy now answers new calls itself: no healthy upstream.
            with forkd.Controller(envoy.listen, timeout=10) as fresh:
                with pytest.raises(forkd.UnavailableError):
                    fresh.list_sandboxes()
            unavailable_seen = True
        if t_refused is None and connect_refused(d.port):
            t_refused = now
        time.sleep(0.05)

    assert t_unhealthy is not None, f"envoy never marked the host unhealthy:\n{envoy.log_tail()}"
    assert t_refused is not None, "the daemon kept accepting connections"
    print(
        f"after SIGTERM: envoy saw the host unhealthy at {t_unhealthy - t_term:.2f} s, "
        f"the daemon refused connections at {t_refused - t_term:.2f} s"
    )
    assert t_unhealthy < t_refused, (t_unhealthy - t_term, t_refused - t_term)
    assert t_refused - t_term >= grace - 0.5, "listeners stopped before the drain grace ran out"
    assert unavailable_seen

    worker.join(timeout=30)
    assert not worker.is_alive()
    assert "error" not in result, result
    res = result["exec"]
    assert isinstance(res, forkd.ExecResult) and res.exit_code == 0
    assert res.duration_us >= 7_000_000
    ctl.close()

    assert d.wait(timeout=30) == 0, d.log_tail()
    # The drain's last step stops every sandbox: none is left to re-adopt.
    assert d.leftover_vmms() == []
    assert "sandbox stopped" in d.log_path.read_text()
