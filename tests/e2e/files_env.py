"""The file tests' shared set-up (`test_files.py`, `test_files_python.py`):
one daemon in the SVM test host per module, with a 1 GiB `debian-python`
sandbox (its root tmpfs then has room for about 512 MiB) and a
reference-guest one; a 200 MiB random file on this machine; grpcurl helpers.
The two modules run in two emulated machines at once in `tests/run`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from forkd_daemon import Daemon
from grpcurl_client import decode_exec
from machine import Machine
from test_linux_guest import IMAGE, linux_daemon

SVC = "forkd.v1.SandboxService/"
BIG = 200 << 20
CHUNK = 1 << 20
# The daemon's RSS may grow by less than this while a file goes through.
RSS_BOUND = 32 << 20


class Files:
    """The module's daemon, its Linux sandbox and a reference-guest one."""

    def __init__(self, machine: Machine, daemon: Daemon, sid: str, ref_sid: str, token: str):
        self.machine = machine
        self.daemon = daemon
        self.sid = sid
        self.ref_sid = ref_sid
        self.token = token
        self.client = daemon.client

    def run(self, script: str) -> Any:
        r = decode_exec(self.client.stream(SVC + "Exec", {"sandboxId": self.sid, "argv": ["sh", "-c", script]}))
        assert r.exit_code == 0, r
        return r.stdout.decode()

    def daemon_rss(self) -> int:
        """The daemon's VmRSS, read by the machine's agent (no process is
        started: sampling must not take the emulated CPU from the transfer)."""
        status = self.machine.path(f"/proc/{self.daemon.pid}/status").read_text()
        [line] = [l for l in status.splitlines() if l.startswith("VmRSS:")]
        return int(line.split()[1]) << 10

    def target(self) -> str:
        return f"127.0.0.1:{self.daemon.client_port}"

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]


@pytest.fixture(scope="module")
def files(machine: Machine, forkd_bin: Path) -> Iterator[Files]:
    with linux_daemon(machine, forkd_bin, "files") as d:
        resp = d.client.call(SVC + "SpawnSandboxes", {"image": IMAGE, "n": 1, "vcpus": 1, "memoryMib": 1024})
        assert not resp.get("failures"), resp
        [sb] = resp["sandboxes"]
        ref = d.client.call(SVC + "SpawnSandboxes", {"n": 1})["sandboxes"][0]
        d.client = d.client.with_options(timeout=900)
        yield Files(machine, d, sb["id"], ref["id"], machine.host.token)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """200 MiB of random bytes on this machine, and their SHA-256."""
    path = tmp_path_factory.mktemp("files") / "big.bin"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG // CHUNK):
            block = os.urandom(CHUNK)
            h.update(block)
            f.write(block)
    return path, h.hexdigest()


def grpcurl_argv(f: Files, method: str) -> list[str]:
    return f.client._argv([SVC + method], data=True, token=f.token, max_time=None, reflection=None)


def write_request_file(dest: Path, header: dict[str, Any], source: Path) -> None:
    """grpcurl's input for a WriteFile: the header message, then one
    message per MiB of `source` with its bytes in base64."""
    with open(dest, "w") as out, open(source, "rb") as src:
        out.write(json.dumps({"header": header}) + "\n")
        while block := src.read(CHUNK):
            out.write(json.dumps({"data": base64.b64encode(block).decode()}) + "\n")


def iter_json_messages(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON messages grpcurl printed into `path`, one at a time."""
    decoder = json.JSONDecoder()
    text = path.read_text()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return
        msg, pos = decoder.raw_decode(text, pos)
        yield msg


def grpcurl_download(f: Files, guest_path: str, out: Path, **fields: Any) -> tuple[str, int, dict[str, Any]]:
    """ReadFile through grpcurl: the SHA-256 and size of the decoded data
    messages, and the `end` message."""
    raw = out.with_suffix(".json")
    with open(raw, "w") as stdout:
        p = subprocess.run(
            grpcurl_argv(f, "ReadFile"),
            input=json.dumps({"sandboxId": f.sid, "path": guest_path, **fields}).encode(),
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=1800,
        )
    assert p.returncode == 0, p.stderr.decode()
    h, size, end = hashlib.sha256(), 0, None
    for msg in iter_json_messages(raw):
        assert end is None, "a message came after the end"
        if "data" in msg:
            data = base64.b64decode(msg["data"])
            assert len(data) <= 64 << 10
            h.update(data)
            size += len(data)
        else:
            end = msg["end"]
    raw.unlink()
    assert end is not None, "the stream had no end message"
    return h.hexdigest(), size, end


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def write_small(f: Files, header: dict[str, Any], data: bytes) -> Any:
    return write_chunks(f, header, [data])


def write_chunks(f: Files, header: dict[str, Any], chunks: list[bytes]) -> Any:
    """WriteFile through grpcurl: the header, then one message per chunk."""
    msgs = [{"header": {"sandboxId": f.sid, **header}}] + [{"data": base64.b64encode(c).decode()} for c in chunks]
    p = subprocess.run(grpcurl_argv(f, "WriteFile"), input="\n".join(json.dumps(m) for m in msgs).encode(), capture_output=True, timeout=600)
    return f.client._result([], p.returncode, p.stdout.decode(), p.stderr.decode(), 0.0)
