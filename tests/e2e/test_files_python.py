"""The Python client's 200 MiB round trip on the SVM test host, in a module
of its own so that `tests/run` can run it in one emulated machine while
`test_files.py` runs in another (each round trip takes minutes there).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from files_env import BIG, RSS_BOUND, Files, big_file, files, sha256_of

pytestmark = pytest.mark.svm
__all__ = ["big_file", "files"]  # module-scoped fixtures, used by name


def test_200_mib_round_trip_through_python(files: Files, big_file: tuple[Path, str], tmp_path: Path) -> None:
    """The Python client streams a local file up and back down into a
    local file; the daemon's RSS is sampled all along."""
    import forkd

    src, digest = big_file
    base = files.daemon_rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(2.0):
            peak[0] = max(peak[0], files.daemon_rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    try:
        with forkd.Controller(files.target(), token=files.token) as ctl:
            up = ctl.write_file(files.sid, "/root/py.bin", src, timeout=1800)
            t1 = time.monotonic()
            down = ctl.read_file(files.sid, "/root/py.bin", tmp_path / "py.bin", timeout=1800)
    finally:
        done.set()
        sampler.join()
    t2 = time.monotonic()
    assert (up.size, up.sha256) == (BIG, digest)
    assert (down.size, down.sha256, down.file_size) == (BIG, digest, BIG)
    assert sha256_of(tmp_path / "py.bin") == digest
    grew = peak[0] - base
    print(
        f"python: {BIG >> 20} MiB up in {t1 - t0:.1f} s, down in {t2 - t1:.1f} s (emulated); "
        f"daemon RSS {base >> 20} MiB before, peak {peak[0] >> 20} MiB"
    )
    assert grew < RSS_BOUND, f"the daemon's RSS grew by {grew >> 20} MiB"
    files.run("rm -f /root/py.bin")
