"""Runs the nginx config of `server/deploy/nginx/nginx.conf` for a test or
benchmark: the checked-in file with only its two ports rewritten (the
listener, bound to loopback here, and the upstream forkd port), under a
private `-p` prefix. nginx comes from Debian (tests/install-test-deps)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from forkd_daemon import free_port, wait_until
from grpcurl_client import REPO_ROOT, Grpcurl

NGINX_CONF = REPO_ROOT / "server" / "deploy" / "nginx" / "nginx.conf"


def find_nginx() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise FileNotFoundError("nginx is not installed (tests/run installs it: apt-get install nginx)")
    return found


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


def worker_user_directive() -> list[str]:
    """Started as root, nginx runs its workers as `nobody` unless told
    otherwise, and forkd (no token) accepts only its own user and root:
    run the workers as this process's user, as forkd is. Unprivileged, the
    workers are this user anyway (and `user` would be ignored)."""
    if os.geteuid() != 0:
        return []
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return ["-g", f"user {user} {group};"]


class Nginx:
    """One nginx process in front of a forkd daemon on `upstream_port`."""

    def __init__(self, prefix: Path, upstream_port: int):
        self.prefix = prefix
        self.upstream_port = upstream_port
        self.port = free_port()
        self.listen = f"127.0.0.1:{self.port}"
        self.log_path = prefix / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Nginx":
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_config(self.port, self.upstream_port))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [find_nginx(), "-p", str(self.prefix), "-c", str(conf), *worker_user_directive()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 15.0) -> "Nginx":
        """Waits until a reflection call through nginx succeeds."""
        via = Grpcurl(self.listen)
        proc = self.proc
        assert proc is not None
        ok = wait_until(lambda: proc.poll() is None and via.run(["list"], reflection=True).ok, timeout)
        assert ok, f"nginx did not proxy in {timeout}s:\n{self.log_path.read_text(errors='replace')}"
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        self.proc.wait(timeout=10)
