"""The daemon's memory and file descriptors across repeated connection
floods (issue 12's reproduction: RSS 9 -> 616 MB over five floods of
20,000 idle connections, not coming back).

    .venv/bin/python bench/flood_rss.py [--floods N] [--connections N] [--forkd PATH]

Starts its own daemon (default flags) on a free loopback port, then N times:
opens the connections with the e2e suite's Flooder (half send the HTTP/2
preface, half nothing; at most 4,000 kept open on this side), samples the
daemon's RSS while it runs, closes them, waits 5 s, and prints the peak
RSS, the RSS after, and the daemon's open fds after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from forkd_daemon import free_port, wait_until  # noqa: E402
from grpcurl_client import Grpcurl  # noqa: E402
from test_flood import Flooder, raise_own_fd_limit, rss_mib  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--floods", type=int, default=5)
    ap.add_argument("--connections", type=int, default=20_000)
    ap.add_argument("--forkd", default=str(REPO / "target" / "release" / "forkd"))
    args = ap.parse_args()
    raise_own_fd_limit()
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        with open(Path(work) / "forkd.log", "wb") as log:
            daemon = subprocess.Popen(
                [args.forkd, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", f"{work}/data"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            client = Grpcurl(f"127.0.0.1:{port}")
            assert wait_until(lambda: client.run(["grpc.health.v1.Health/Check"], {}).ok, 30)
            print(f"RSS at start: {rss_mib(daemon.pid):.1f} MiB")
            for i in range(args.floods):
                flood = Flooder(port, args.connections, 300)
                flood.start()
                peak = 0.0
                while flood.is_alive():
                    peak = max(peak, rss_mib(daemon.pid))
                    time.sleep(0.2)
                flood.close_all()
                time.sleep(5)
                fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
                print(
                    f"flood {i + 1}: {flood.opened} connections, peak RSS {peak:.1f} MiB, "
                    f"5 s after {rss_mib(daemon.pid):.1f} MiB, {fds} fds open"
                )
        finally:
            daemon.terminate()
            daemon.wait(60)


if __name__ == "__main__":
    main()
