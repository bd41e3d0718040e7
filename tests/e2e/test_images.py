"""`forkd image build|ls|rm`: a real build of the default image
(`debian-python`: mmdebstrap'ed bookworm userland with python3 and procps,
Debian's generic kernel) into a temporary `--images-dir`, with a
placeholder file as the agent (nothing here boots the image).

Needs root, apt (the host's Debian mirror configuration), mmdebstrap,
kmod and cpio. The first build takes a minute or two (mmdebstrap); the
kernel package is downloaded once into IMAGES_DIR/.cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from grpcurl_client import REPO_ROOT

pytestmark = pytest.mark.timeout(1200)

NAME = "debian-python"
MODULES = ("virtio_mmio", "virtio_console", "virtio_rng")


@pytest.fixture(scope="module")
def forkd() -> Path:
    src = Path(os.environ.get("FORKD_BIN", REPO_ROOT / "target" / "release" / "forkd"))
    if not src.is_file():
        pytest.fail(f"missing {src}: build it with `cargo build --release -p forkd` (or set FORKD_BIN)", pytrace=False)
    if os.geteuid() != 0:
        pytest.skip("building images needs root")
    for tool in ("mmdebstrap", "cpio"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run tests/install-test-deps", pytrace=False)
    return src


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("agent") / "forkd-agent"
    p.write_text("#!/bin/sh\n# placeholder forkd-agent for test_images.py\n")
    return p


def image(forkd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(forkd), "image", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(forkd: Path, images: Path, agent: Path) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    res = image(forkd, "build", NAME, "--images-dir", str(images), "--agent", str(agent))
    print(f"first build: {time.monotonic() - t0:.1f}s\n{res.stdout}{res.stderr}")
    assert res.returncode == 0, res.stderr
    return res


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpio_listing(initrd: Path) -> dict[str, str]:
    """name -> `cpio -tv` line of every entry of the archive."""

    def cpio(*flags: str) -> list[str]:
        return subprocess.run(
            ["cpio", *flags, "--quiet", "-F", str(initrd)], capture_output=True, text=True, check=True
        ).stdout.splitlines()

    names, lines = cpio("-t"), cpio("-tv")
    assert len(names) == len(lines)
    return dict(zip(names, lines))


def cpio_read(initrd: Path, name: str) -> str:
    return subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", "-F", str(initrd), name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def resolve(entries: dict[str, str], path: str) -> str:
    """`path` with symlinked leading directories resolved (bin -> usr/bin)."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        head = "/".join(parts[:i])
        line = entries.get(head, "")
        if line.startswith("l") and " -> " in line:
            return resolve(entries, "/".join([line.split(" -> ")[1], *parts[i:]]))
    return path


def test_build_default_image(built: subprocess.CompletedProcess[str], images: Path, agent: Path) -> None:
    assert f"built image {NAME}" in built.stdout
    for step in ("mmdebstrap", "write the initramfs"):
        assert step in built.stderr  # each step is printed with its duration
    d = images / NAME
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == 1 and m["name"] == NAME
    assert m["packages"] == ["python3", "procps"]
    assert m["kernel_args"] == "" and m["memory_mib"] == 512
    assert m["agent_sha256"] == sha256(agent)
    assert len(m["input_digest"]) == 64
    assert m["created"].endswith("Z")
    k = m["kernel"]
    assert k["path"] == "vmlinuz" and k["package"] == f"linux-image-{k['release']}" and k["version"]
    for f in (k, m["initrd"]):
        p = d / f["path"]
        assert p.stat().st_size == f["bytes"]
        assert sha256(p) == f["sha256"]
        assert oct(p.stat().st_mode & 0o777) == oct(0o644)
    assert m["initrd"]["path"] == "initrd"
    assert oct(d.stat().st_mode & 0o777) == oct(0o755)

    initrd = d / "initrd"
    assert initrd.read_bytes()[:6] == b"070701", "an uncompressed newc cpio"
    entries = cpio_listing(initrd)
    assert entries["init"].startswith("-rwxr-xr-x"), entries["init"]
    for path in ("usr/bin/python3", "bin/ps", "etc/forkd/modules", "etc/hostname", "dev/console"):
        assert resolve(entries, path) in entries, path
    assert cpio_read(initrd, "etc/hostname") == "forkd\n"
    listed = cpio_read(initrd, "etc/forkd/modules").split()
    assert listed == m["modules"]
    names = [Path(p).name for p in listed]
    assert len(set(names)) == len(names), "each module once"
    for mod in MODULES:
        assert any(n.replace("-", "_") == f"{mod}.ko" for n in names), (mod, names)
    assert names.index("virtio.ko") < names.index("virtio_mmio.ko"), "dependencies first"
    for p in listed:
        assert p.startswith(f"lib/modules/{k['release']}/")
        assert resolve(entries, p) in entries, p
    for trimmed in ("usr/share/doc", "usr/share/man"):
        assert not [e for e in entries if e.startswith(trimmed + "/")], trimmed
    assert not [e for e in os.listdir(images) if e.startswith((".building-", ".old-"))]


def test_rebuild_is_up_to_date(forkd: Path, built: subprocess.CompletedProcess[str], images: Path, agent: Path) -> None:
    before = (images / NAME / "manifest.json").read_bytes()
    res = image(forkd, "build", NAME, "--images-dir", str(images), "--agent", str(agent))
    assert res.returncode == 0, res.stderr
    assert f"image {NAME} is up to date" in res.stdout
    assert (images / NAME / "manifest.json").read_bytes() == before


def test_ls(forkd: Path, built: subprocess.CompletedProcess[str], images: Path) -> None:
    res = image(forkd, "ls", "--images-dir", str(images), "--json")
    assert res.returncode == 0, res.stderr
    manifests = json.loads(res.stdout)
    assert [m["name"] for m in manifests] == [NAME]
    assert manifests[0] == json.loads((images / NAME / "manifest.json").read_text())
    res = image(forkd, "ls", "--images-dir", str(images))
    assert res.returncode == 0, res.stderr
    [header, row] = res.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "KERNEL"]
    assert row.split()[0] == NAME and "python3,procps" in row


def test_unknown_package_fails_cleanly(forkd: Path, built: subprocess.CompletedProcess[str], images: Path, agent: Path) -> None:
    bad = "forkd-no-such-package-xyz"
    res = image(forkd, "build", "broken", "--packages", bad, "--images-dir", str(images), "--agent", str(agent))
    assert res.returncode == 1, res
    assert "unknown Debian package" in res.stderr and bad in res.stderr, res.stderr
    assert not (images / "broken").exists()
    assert not [e for e in os.listdir(images) if e.startswith(".building-")]
    assert (images / NAME / "manifest.json").is_file(), "other images untouched"


def test_usage_errors(forkd: Path, images: Path, agent: Path, tmp_path: Path) -> None:
    res = image(forkd, "build", "Bad/Name", "--images-dir", str(images), "--agent", str(agent))
    assert res.returncode == 1 and "invalid image name" in res.stderr, res
    missing = tmp_path / "no-agent"
    res = image(forkd, "build", "x", "--images-dir", str(images), "--agent", str(missing))
    assert res.returncode == 1, res
    assert str(missing) in res.stderr and "cargo build --release -p forkd-agent" in res.stderr
    assert not (images / "x").exists()


def mmdebstraps_in(path: Path) -> list[int]:
    """Pids of processes whose command line mentions `path`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(path).encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def test_killed_build_leaves_old_image(forkd: Path, built: subprocess.CompletedProcess[str], images: Path, agent: Path) -> None:
    before = (images / NAME / "manifest.json").read_bytes()
    p = subprocess.Popen(
        [str(forkd), "image", "build", NAME, "--force", "--images-dir", str(images), "--agent", str(agent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        scratch: list[Path] = []
        while time.monotonic() < deadline and not scratch:
            scratch = [d for d in images.glob(".building-*") if (d / "work" / "tree").exists() or mmdebstraps_in(d)]
            time.sleep(0.2)
        assert scratch, "the build never reached mmdebstrap"
        time.sleep(3)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # The image is untouched, the scratch dir is left for the next build.
    assert (images / NAME / "manifest.json").read_bytes() == before
    assert list(images.glob(".building-*"))
    # mmdebstrap got SIGTERM (parent-death signal) and goes away.
    deadline = time.monotonic() + 120
    while mmdebstraps_in(scratch[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not mmdebstraps_in(scratch[0])
    res = image(forkd, "build", NAME, "--images-dir", str(images), "--agent", str(agent))
    assert res.returncode == 0, res.stderr
    assert f"image {NAME} is up to date" in res.stdout
    assert "stale" in res.stderr
    assert not list(images.glob(".building-*")) and not list(images.glob(".old-*"))


def test_rm(forkd: Path, built: subprocess.CompletedProcess[str], images: Path) -> None:
    res = image(forkd, "rm", NAME, "--images-dir", str(images))
    assert res.returncode == 0, res.stderr
    assert not (images / NAME).exists()
    assert not [e for e in os.listdir(images) if e.startswith(".old-")]
    res = image(forkd, "rm", NAME, "--images-dir", str(images))
    assert res.returncode == 1 and "not found" in res.stderr, res
    res = image(forkd, "ls", "--images-dir", str(images), "--json")
    assert json.loads(res.stdout) == []
