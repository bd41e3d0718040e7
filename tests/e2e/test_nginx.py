"""forkd behind nginx (`server/deploy/nginx/nginx.conf`, the lighter
alternative to the Envoy sidecar), on loopback: grpcurl (reflection, unary,
streams) and the Python client through nginx's grpc_pass."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import forkd
from forkd_daemon import Daemon
from grpcurl_client import Grpcurl
from nginx_proxy import Nginx, find_nginx

READY = forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_READY")


@pytest.fixture
def nginx(daemon_factory, tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    try:
        find_nginx()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    d = daemon_factory(extra_args=["--live-copy-rate-mibps", "16"])
    proxy = Nginx(tmp_path / "nginx", d.port).start()
    try:
        proxy.wait_ready()
        yield d, proxy.listen
    finally:
        proxy.stop()


def test_grpc_through_nginx(nginx: tuple[Daemon, str]) -> None:
    _, target = nginx
    via = Grpcurl(target)
    assert "forkd.v1.SnapshotService" in via.list_services()
    assert via.health() == "SERVING"

    with forkd.Controller(target, timeout=60) as ctl:
        sb = ctl.spawn_sandboxes(memory_mib=64).sandboxes[0]
        assert ctl.exec(sb.id, ["echo", "via", "nginx"]).stdout == b"via nginx\n"
        with pytest.raises(forkd.NotFoundError):
            ctl.get_sandbox("sb-doesnotexist")
        via.expect_error("INVALID_ARGUMENT", "forkd.v1.SandboxService/SpawnSandboxes", {"n": 0})

        t0 = time.monotonic()
        events = list(ctl.exec_stream(sb.id, ["sleep", "2000"]))
        assert events[-1].exit_code == 0 and time.monotonic() - t0 >= 2

        assert ctl.exec(sb.id, ["fill", "16", "4"]).ok
        ctl.branch_sandbox(sb.id, "via-nginx", mode="live", wait=False)
        updates = list(ctl.watch_snapshot("via-nginx", timeout=120))
        assert updates[-1].status == READY and len(updates) >= 2
