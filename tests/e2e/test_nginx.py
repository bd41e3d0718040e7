"""forkd behind nginx (`server/deploy/nginx/nginx.conf`, the lighter
alternative to the Envoy sidecar), on loopback: grpcurl (reflection, unary,
streams) and the Python client through nginx's grpc_pass."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import forkd
from forkd_daemon import Daemon, free_port, wait_until
from grpcurl_client import REPO_ROOT, Grpcurl

NGINX_CONF = REPO_ROOT / "server" / "deploy" / "nginx" / "nginx.conf"
READY = forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_READY")


def nginx_config(listen_port: int, upstream_port: int) -> str:
    """The checked-in config with its two ports rewritten."""
    text = NGINX_CONF.read_text()
    for old, new in [
        ("listen 8080 http2;", f"listen 127.0.0.1:{listen_port} http2;"),
        ("server 127.0.0.1:50051;", f"server 127.0.0.1:{upstream_port};"),
    ]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


@pytest.fixture
def nginx(daemon_factory, tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed (tests/run installs it: apt-get install nginx)", pytrace=False)
    d = daemon_factory(extra_args=["--live-copy-rate-mibps", "16"])
    prefix = tmp_path / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(port, d.port))
    log = open(prefix / "nginx.log", "wb")
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    via = Grpcurl(f"127.0.0.1:{port}")
    try:
        assert wait_until(lambda: proc.poll() is None and via.run(["list"], reflection=True).ok, 15), (
            prefix / "nginx.log"
        ).read_text()
        yield d, via.target
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
