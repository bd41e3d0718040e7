"""Files in and out of a Linux sandbox (WriteFile, ReadFile, StatFile,
ListDir, RemoveFile) end to end on the SVM test host: grpcurl, the Python
client and the TypeScript client on this machine, the daemon, VMM and the
`debian-python` guest's agent inside the emulated AMD machine.

One daemon and one 1 GiB Linux sandbox (its root tmpfs then has room for
about 512 MiB) serve the module. The reference guest's refusal is checked
here too, on a reference-guest sandbox of the same daemon.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import REPO_ROOT
from files_env import (
    BIG,
    CHUNK,
    RSS_BOUND,
    SVC,
    Files,
    big_file,
    files,
    grpcurl_argv,
    grpcurl_download,
    sha256_of,
    write_chunks,
    write_request_file,
    write_small,
)
from forkd_daemon import wait_until

pytestmark = pytest.mark.svm
MOUNT_SMALL = (
    "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
    "rc = libc.mount(b'tmpfs', b'/root/small', b'tmpfs', 0, b'size=2m'); "
    "assert rc == 0, os.strerror(ctypes.get_errno())"
)
UMOUNT_SMALL = "import ctypes; ctypes.CDLL(None).umount(b'/root/small')"
__all__ = ["big_file", "files"]  # module-scoped fixtures, used by name


def test_reference_guest_has_no_files(files: Files) -> None:
    for method, req in [
        ("ReadFile", {"sandboxId": files.ref_sid, "path": "/x"}),
        ("StatFile", {"sandboxId": files.ref_sid, "path": "/x"}),
        ("ListDir", {"sandboxId": files.ref_sid, "path": "/"}),
        ("RemoveFile", {"sandboxId": files.ref_sid, "path": "/x"}),
    ]:
        res = files.client.expect_error("FAILED_PRECONDITION", SVC + method, req)
        assert "reference guest" in res.message and "Linux" in res.message, res.message
    res = files.client.run([SVC + "WriteFile"], {"header": {"sandboxId": files.ref_sid, "path": "/x"}})
    assert res.code == "FAILED_PRECONDITION" and "reference guest" in res.message, res.describe()


def test_200_mib_round_trip_through_grpcurl(files: Files, big_file: tuple[Path, str], tmp_path: Path) -> None:
    src, digest = big_file
    req = tmp_path / "write.json"
    write_request_file(req, {"sandboxId": files.sid, "path": "/root/up/big.bin", "makeParents": True, "mode": 0o600}, src)
    t0 = time.monotonic()
    with open(req, "rb") as stdin:
        p = subprocess.run(grpcurl_argv(files, "WriteFile"), stdin=stdin, capture_output=True, timeout=1800)
    up_s = time.monotonic() - t0
    req.unlink()
    assert p.returncode == 0, p.stderr.decode()
    reply = json.loads(p.stdout)
    assert reply == {"path": "/root/up/big.bin", "size": str(BIG), "sha256": digest}, reply
    assert files.run("sha256sum /root/up/big.bin; stat -c %a /root/up/big.bin").split() == [digest, "/root/up/big.bin", "600"]
    t0 = time.monotonic()
    got, size, end = grpcurl_download(files, "/root/up/big.bin", tmp_path / "down")
    down_s = time.monotonic() - t0
    assert (got, size) == (digest, BIG)
    assert end == {"size": str(BIG), "sha256": digest, "fileSize": str(BIG)}, end
    print(f"grpcurl: 200 MiB up in {up_s:.1f} s, down in {down_s:.1f} s (emulated)")
    # A range of it.
    got, size, end = grpcurl_download(files, "/root/up/big.bin", tmp_path / "range", offset=str(BIG - 1000), length="5000")
    with open(src, "rb") as fh:
        fh.seek(BIG - 1000)
        assert got == hashlib.sha256(fh.read()).hexdigest() and size == 1000
    files.run("rm -f /root/up/big.bin")


def test_200_mib_round_trip_through_typescript(files: Files, big_file: tuple[Path, str], tmp_path: Path) -> None:
    """The TypeScript client's example streams a local file up with
    fs.createReadStream and back down into a local file."""
    ts = REPO_ROOT / "clients" / "typescript"
    build = subprocess.run(["npm", "run", "build"], cwd=ts, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    src, digest = big_file
    t0 = time.monotonic()
    p = subprocess.run(
        ["node", "dist/examples/file_roundtrip.js", files.sid, str(src), "/root/ts/big.bin", str(tmp_path / "ts.bin")],
        cwd=ts,
        env={**os.environ, "FORKD_TARGET": files.target(), "FORKD_TOKEN": files.token},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"uploaded": {"size": BIG, "sha256": digest}, "downloaded": {"size": BIG, "sha256": digest}}, out
    assert sha256_of(tmp_path / "ts.bin") == digest
    print(f"typescript: {BIG >> 20} MiB round trip in {time.monotonic() - t0:.1f} s (emulated)")
    files.run("rm -rf /root/ts")


def test_slow_reader_does_not_grow_the_daemon(files: Files, big_file: tuple[Path, str]) -> None:
    """A client that sleeps between messages holds the guest up, not the
    daemon's memory: the RSS stays within the bound while it dawdles, and
    the bytes still arrive whole."""
    from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc

    src, digest = big_file
    files.run(f"head -c {64 << 20} /dev/urandom > /root/slow.bin")
    want = files.run("sha256sum /root/slow.bin").split()[0]
    base = files.daemon_rss()
    peak = base
    h, n = hashlib.sha256(), 0
    with grpc.insecure_channel(files.target()) as ch:
        stub = sandbox_pb2_grpc.SandboxServiceStub(ch)
        stream = stub.ReadFile(sandbox_pb2.ReadFileRequest(sandbox_id=files.sid, path="/root/slow.bin"), metadata=files.metadata(), timeout=1800)
        for i, msg in enumerate(stream):
            if msg.WhichOneof("event") == "data":
                h.update(msg.data)
                n += len(msg.data)
            if i < 40:
                time.sleep(0.25)
                if i % 10 == 0:
                    peak = max(peak, files.daemon_rss())
            elif i % 200 == 0:
                peak = max(peak, files.daemon_rss())
    assert (h.hexdigest(), n) == (want, 64 << 20)
    print(f"slow reader: daemon RSS {base >> 20} MiB before, peak {peak >> 20} MiB")
    assert peak - base < RSS_BOUND
    files.run("rm -f /root/slow.bin")


def test_killed_uploader_leaves_no_file(files: Files, big_file: tuple[Path, str], tmp_path: Path) -> None:
    """grpcurl is killed in the middle of an upload: nothing appears under
    the final name, and the guest's temporary file goes away."""
    src, _ = big_file
    p = subprocess.Popen(grpcurl_argv(files, "WriteFile"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    try:
        p.stdin.write((json.dumps({"header": {"sandboxId": files.sid, "path": "/root/cut/killed.bin", "makeParents": True}}) + "\n").encode())
        with open(src, "rb") as fh:
            for _ in range(8):
                p.stdin.write((json.dumps({"data": base64.b64encode(fh.read(CHUNK)).decode()}) + "\n").encode())
        p.stdin.flush()
        # The upload is under way once its temporary file holds data.
        assert wait_until(lambda: "forkd" in files.run("ls -a /root/cut 2>/dev/null || true"), timeout=600)
    finally:
        p.kill()
        p.wait()
    assert wait_until(lambda: files.run("ls -A /root/cut").strip() == "", timeout=300), files.run("ls -la /root/cut")
    res = files.client.expect_error("NOT_FOUND", SVC + "StatFile", {"sandboxId": files.sid, "path": "/root/cut/killed.bin"})
    assert "killed.bin" in res.message


def test_stat_list_and_remove(files: Files) -> None:
    files.run("mkdir -p /root/tree/sub && printf abc > /root/tree/a.txt && ln -s a.txt /root/tree/link && touch -d @1700000000 /root/tree/a.txt")
    info = files.client.call(SVC + "StatFile", {"sandboxId": files.sid, "path": "/root/tree/a.txt"})["info"]
    assert info == {"name": "a.txt", "size": "3", "mode": 0o644, "type": "FILE_TYPE_FILE", "modifyTime": "2023-11-14T22:13:20Z"}, info
    listing = files.client.call(SVC + "ListDir", {"sandboxId": files.sid, "path": "/root/tree"})
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("a.txt", "FILE_TYPE_FILE"),
        ("link", "FILE_TYPE_SYMLINK"),
        ("sub", "FILE_TYPE_DIRECTORY"),
    ], listing
    assert not listing.get("truncated")
    files.client.call(SVC + "RemoveFile", {"sandboxId": files.sid, "path": "/root/tree", "recursive": True})
    files.client.expect_error("NOT_FOUND", SVC + "StatFile", {"sandboxId": files.sid, "path": "/root/tree"})


def test_each_error_has_its_code(files: Files) -> None:
    sid = files.sid
    c = files.client
    files.run("mkdir -p /root/e/full && printf x > /root/e/file && touch /root/e/full/x")
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("NOT_FOUND", "ReadFile", {"path": "/root/e/missing"}, "missing"),
        ("NOT_FOUND", "StatFile", {"path": "/root/e/missing"}, "missing"),
        ("NOT_FOUND", "ListDir", {"path": "/root/e/missing"}, "missing"),
        ("NOT_FOUND", "RemoveFile", {"path": "/root/e/missing"}, "missing"),
        ("FAILED_PRECONDITION", "ReadFile", {"path": "/root/e"}, "directory"),
        ("FAILED_PRECONDITION", "ReadFile", {"path": "/dev/null"}, "regular file"),
        ("FAILED_PRECONDITION", "ListDir", {"path": "/root/e/file"}, "not a directory"),
        ("FAILED_PRECONDITION", "RemoveFile", {"path": "/root/e/full"}, "recursive"),
        ("INVALID_ARGUMENT", "ReadFile", {"path": ""}, "empty"),
        ("INVALID_ARGUMENT", "StatFile", {"path": "root/e"}, "not absolute"),
        ("INVALID_ARGUMENT", "ListDir", {"path": "/root/\u0000x"}, "NUL"),
        ("INVALID_ARGUMENT", "RemoveFile", {"path": "/"}, "root"),
    ]
    for code, method, req, words in cases:
        res = c.expect_error(code, SVC + method, {"sandboxId": sid, **req})
        assert words.lower() in res.message.lower(), (method, req, res.message)
    writes: list[tuple[str, dict[str, Any], str]] = [
        ("NOT_FOUND", {"path": "/root/e/no/such/dir/f"}, "no/such"),
        ("ALREADY_EXISTS", {"path": "/root/e/file", "noOverwrite": True}, "/root/e/file"),
        ("FAILED_PRECONDITION", {"path": "/root/e/file/under"}, "not a directory"),
        ("FAILED_PRECONDITION", {"path": "/root/e/full"}, "directory"),
        ("INVALID_ARGUMENT", {"path": ""}, "empty"),
        ("INVALID_ARGUMENT", {"path": "relative/f"}, "not absolute"),
        ("INVALID_ARGUMENT", {"path": "/root/e/\u0000"}, "NUL"),
    ]
    for code, header, words in writes:
        res = write_small(files, header, b"new")
        assert res.code == code, (header, res.describe())
        assert words.lower() in res.message.lower(), (header, res.message)
    # Nothing was replaced or left behind by the refused writes.
    assert files.run("cat /root/e/file; ls -A /root/e") == "xfile\nfull\n"
    # Data before the header.
    p = subprocess.run(grpcurl_argv(files, "WriteFile"), input=json.dumps({"data": "aGk="}).encode(), capture_output=True, timeout=600)
    res = c._result([], p.returncode, p.stdout.decode(), p.stderr.decode(), 0.0)
    assert res.code == "INVALID_ARGUMENT" and "header" in res.message, res.describe()
    files.run("rm -rf /root/e")


def test_full_disk_is_resource_exhausted_and_leaves_nothing(files: Files) -> None:
    """A 4 MiB upload into a full 2 MiB tmpfs of the guest fails with
    RESOURCE_EXHAUSTED; the old file under that name is intact and no
    temporary file is left."""
    # The image has no mount(8): mount(2) through Python's ctypes.
    files.run(f"mkdir -p /root/small && python3 -c {MOUNT_SMALL!r} && printf old > /root/small/keep.txt")
    try:
        res = write_chunks(files, {"path": "/root/small/keep.txt"}, [os.urandom(1 << 20) for _ in range(4)])
        assert res.code == "RESOURCE_EXHAUSTED", res.describe()
        assert "full" in res.message and "keep.txt" in res.message, res.message
        assert files.run("cat /root/small/keep.txt; ls -A /root/small") == "oldkeep.txt\n"
    finally:
        files.run(f"python3 -c {UMOUNT_SMALL!r}; rmdir /root/small")


def test_oversized_message_is_invalid_argument(files: Files) -> None:
    """A data message over gRPC's 4 MiB limit says how to chunk."""
    res = write_chunks(files, {"path": "/root/huge.bin"}, [os.urandom((4 << 20) + 1)])
    assert res.code == "INVALID_ARGUMENT" and "chunks under 4 MiB" in res.message, res.describe()
    files.client.expect_error("NOT_FOUND", SVC + "StatFile", {"sandboxId": files.sid, "path": "/root/huge.bin"})


def test_python_files_example_runs(files: Files) -> None:
    """clients/python/examples/files.py, whose output the client's README shows."""
    p = subprocess.run(
        [sys.executable, str(REPO_ROOT / "clients" / "python" / "examples" / "files.py"), files.sid, files.target()],
        env={**os.environ, "FORKD_TOKEN": files.token},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    print(p.stdout)
    out = p.stdout
    assert f"hello from {files.sid}" in out
    assert "same sha256 as here: True" in out and "identical: True" in out
    assert "expected error: ALREADY_EXISTS" in out and "after remove_file: NOT_FOUND" in out


def test_mcp_file_tools(files: Files) -> None:
    """The MCP server's file tools against the Linux sandbox: write, list,
    stat, read (capped), remove."""
    from mcp import ClientSession
    from test_mcp_server import call, call_error, run, server_params

    async def scenario(s: ClientSession) -> None:
        wrote = await call(s, "write_file", sandbox_id=files.sid, path="/root/mcp/notes.txt", content="line one\nline two\n", make_parents=True)
        assert wrote["size"] == 18, wrote
        listing = await call(s, "list_dir", sandbox_id=files.sid, path="/root/mcp")
        assert [e["name"] for e in listing["entries"]] == ["notes.txt"], listing
        info = await call(s, "stat_file", sandbox_id=files.sid, path="/root/mcp/notes.txt")
        assert info["size"] == 18, info
        read = await call(s, "read_file", sandbox_id=files.sid, path="/root/mcp/notes.txt", max_bytes=9)
        assert read["content"] == "line one\n" and read["truncated"], read
        print("MCP read_file:", json.dumps(read))
        err = await call_error(s, "read_file", sandbox_id=files.sid, path="/root/mcp/missing")
        assert "NOT_FOUND" in err, err
        await call(s, "remove_file", sandbox_id=files.sid, path="/root/mcp", recursive=True)

    run(server_params(files.target(), env={"FORKD_TOKEN": files.token}), scenario)
