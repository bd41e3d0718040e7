"""The file calls (write_file, read_file, iter_file, stat_file, list_dir,
remove_file) of both controllers, against a fake SandboxService on
loopback: a real in-process ``grpc.server`` whose servicer keeps files in
memory, stores an upload only once its stream completed (as the guest
renames its temporary file only then), and can be told to fail an upload
after some chunks, or to cut, corrupt or truncate a download.

- uploads are chunked at ``chunk_size`` (1 MiB by default, at most 3 MiB)
  whatever the source: bytes, bytearray, memoryview, a local path (str or
  os.PathLike), a binary file object (read ``chunk_size`` at a time), an
  iterable (or, for the asyncio client, an async iterable) of chunks;
- sources are streamed: an endless generator is consumed only as far as
  the call got before the server stopped it, and a source that raises
  cancels the upload (nothing is stored) and re-raises;
- downloads are verified against the end message (SHA-256, size, and its
  presence: DataLossError otherwise), and a local destination is written
  atomically: a temporary file beside it, renamed only after the end, and
  removed on any error.

(tests/e2e exercises the same calls against a real Linux guest.)
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import io
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import forkd
from forkd import errors, wire
from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc

KIB = 1024
MIB = 1024 * KIB
READ_CHUNK = 64 * KIB  # what the guest sends per ReadFile data message


class FakeSandbox(sandbox_pb2_grpc.SandboxServiceServicer):
    """An in-memory Linux sandbox's file calls."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: list[sandbox_pb2.WriteFileHeader] = []
        self.chunk_sizes: list[int] = []  # data message sizes of the last upload
        self.cut_off = 0  # uploads the client cancelled
        self.data_messages = 0  # WriteFile data messages received, over all uploads
        self.cut_off_event = threading.Event()
        self.fail_write_after: int | None = None  # RESOURCE_EXHAUSTED after this many data messages
        self.read_mode = "ok"  # "ok", "bad_sha", "no_end", "short", "fail"
        self.read_fail_after = 2  # data messages before "fail" aborts
        self.requests: list[tuple[str, object]] = []

    # ---- uploads ------------------------------------------------------------

    def WriteFile(
        self, request_iterator: Iterator[sandbox_pb2.WriteFileRequest], context: grpc.ServicerContext
    ) -> sandbox_pb2.WriteFileResponse:
        requests = iter(request_iterator)
        try:
            first = next(requests, None)
        except grpc.RpcError:
            self.cut_off += 1
            self.cut_off_event.set()
            raise
        if first is None or first.WhichOneof("content") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a header")
        header = first.header
        self.headers.append(header)
        if not header.path.startswith("/"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"path {header.path!r} is not absolute")
        if header.no_overwrite and header.path in self.files:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{header.path} exists")
        data = bytearray()
        self.chunk_sizes = []
        try:
            for msg in requests:
                if msg.WhichOneof("content") != "data":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a second header")
                self.chunk_sizes.append(len(msg.data))
                self.data_messages += 1
                data += msg.data
                if self.fail_write_after is not None and len(self.chunk_sizes) >= self.fail_write_after:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "No space left on device (os error 28)")
        except grpc.RpcError:
            # The client cancelled: the guest drops its temporary file.
            self.cut_off += 1
            self.cut_off_event.set()
            raise
        # grpcio's server may end the request iterator normally when the
        # client cancelled (the cancellation is processed just after the
        # empty read): look again before storing, as the daemon (which sees
        # a reset stream as an error) would not store it either.
        deadline = time.monotonic() + 0.02
        while time.monotonic() < deadline:
            if not context.is_active():
                self.cut_off += 1
                self.cut_off_event.set()
                context.abort(grpc.StatusCode.CANCELLED, "the upload was cut off")
            time.sleep(0.002)
        self.files[header.path] = bytes(data)
        return sandbox_pb2.WriteFileResponse(
            path=header.path, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )

    # ---- downloads ----------------------------------------------------------

    def ReadFile(
        self, request: sandbox_pb2.ReadFileRequest, context: grpc.ServicerContext
    ) -> Iterator[sandbox_pb2.ReadFileResponse]:
        self.requests.append(("ReadFile", request))
        if request.path not in self.files:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.path}: No such file or directory")
        whole = self.files[request.path]
        end = len(whole) if request.length == 0 else request.offset + request.length
        sent = whole[request.offset : end]
        for i, start in enumerate(range(0, len(sent), READ_CHUNK)):
            if self.read_mode == "fail" and i >= self.read_fail_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the sandbox stopped")
            yield sandbox_pb2.ReadFileResponse(data=sent[start : start + READ_CHUNK])
        if self.read_mode == "no_end":
            return
        sha = hashlib.sha256(sent).hexdigest()
        if self.read_mode == "bad_sha":
            sha = hashlib.sha256(b"something else").hexdigest()
        size = len(sent) + (1 if self.read_mode == "short" else 0)
        yield sandbox_pb2.ReadFileResponse(
            end=sandbox_pb2.ReadFileEnd(size=size, sha256=sha, file_size=len(whole))
        )

    # ---- the rest -----------------------------------------------------------

    def StatFile(self, request: sandbox_pb2.StatFileRequest, context: grpc.ServicerContext) -> sandbox_pb2.StatFileResponse:
        self.requests.append(("StatFile", request))
        if request.path == "/missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "/missing: No such file or directory")
        return sandbox_pb2.StatFileResponse(
            info=sandbox_pb2.FileInfo(
                name=os.path.basename(request.path) or "/",
                size=4096,
                mode=0o755,
                type=sandbox_pb2.FILE_TYPE_DIRECTORY,
                modify_time=Timestamp(seconds=1_800_000_000, nanos=500_000_000),
            )
        )

    def ListDir(self, request: sandbox_pb2.ListDirRequest, context: grpc.ServicerContext) -> sandbox_pb2.ListDirResponse:
        self.requests.append(("ListDir", request))
        return sandbox_pb2.ListDirResponse(
            entries=[
                sandbox_pb2.FileInfo(name="bin", size=7, mode=0o777, type=sandbox_pb2.FILE_TYPE_SYMLINK),
                sandbox_pb2.FileInfo(
                    name="hello.txt",
                    size=6,
                    mode=0o644,
                    type=sandbox_pb2.FILE_TYPE_FILE,
                    modify_time=Timestamp(seconds=1_700_000_000),
                ),
                sandbox_pb2.FileInfo(name="null", mode=0o666, type=sandbox_pb2.FILE_TYPE_OTHER),
            ],
            truncated=True,
        )

    def RemoveFile(
        self, request: sandbox_pb2.RemoveFileRequest, context: grpc.ServicerContext
    ) -> sandbox_pb2.RemoveFileResponse:
        self.requests.append(("RemoveFile", request))
        if request.path == "/":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refusing to remove /")
        self.files.pop(request.path, None)
        return sandbox_pb2.RemoveFileResponse()

    def last(self, name: str) -> object:
        got = [req for method, req in self.requests if method == name]
        assert got, f"no {name} request was received"
        return got[-1]


@pytest.fixture
def fake() -> Iterator[tuple[FakeSandbox, str]]:
    servicer = FakeSandbox()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture
def ctl(fake: tuple[FakeSandbox, str]) -> Iterator[forkd.Controller]:
    with forkd.Controller(fake[1], timeout=10) as c:
        yield c


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(n: int) -> bytes:
    """``n`` bytes that are not all alike (so a misplaced chunk shows)."""
    return bytes(i * 7 % 251 for i in range(n))


class RecordingReader(io.BytesIO):
    """A BytesIO that records the size of every read()."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int | None] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.sizes.append(size)
        return super().read(size)


def endless(counter: list[int], chunk: int = 64 * KIB) -> Iterator[bytes]:
    """An endless source that counts the chunks taken from it."""
    while True:
        counter[0] += 1
        yield b"z" * chunk


# ---- uploads --------------------------------------------------------------------


def test_bytes_are_sent_in_chunks_of_chunk_size(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    data = pattern(2500)
    res = ctl.write_file("sb-1", "/srv/data.bin", data, mode=0o600, make_parents=True, chunk_size=1000)
    assert isinstance(res, forkd.WriteFileResult)
    assert (res.path, res.size, res.sha256) == ("/srv/data.bin", 2500, sha(data))
    assert server.chunk_sizes == [1000, 1000, 500]
    assert server.files["/srv/data.bin"] == data
    h = server.headers[-1]
    assert (h.sandbox_id, h.path, h.mode, h.make_parents, h.no_overwrite) == ("sb-1", "/srv/data.bin", 0o600, True, False)

    # bytearray and memoryview (of any item format) are the data too.
    ctl.write_file("sb-1", "/ba", bytearray(b"abc"), chunk_size=2)
    assert server.files["/ba"] == b"abc" and server.chunk_sizes == [2, 1]
    ints = array.array("i", [1, 2, 3])
    ctl.write_file("sb-1", "/mv", memoryview(ints), chunk_size=5)
    assert server.files["/mv"] == ints.tobytes() and server.chunk_sizes == [5, 5, 2]

    # The default chunk is 1 MiB; an empty source is a header alone (an empty file).
    ctl.write_file("sb-1", "/big", pattern(2 * MIB + 3))
    assert server.chunk_sizes == [MIB, MIB, 3]
    res = ctl.write_file("sb-1", "/empty", b"")
    assert server.files["/empty"] == b"" and server.chunk_sizes == [] and res.size == 0


def test_a_str_or_pathlike_source_is_a_local_file(
    fake: tuple[FakeSandbox, str], ctl: forkd.Controller, tmp_path: Path
) -> None:
    server, _ = fake
    local = tmp_path / "upload.bin"
    data = pattern(10_000)
    local.write_bytes(data)
    ctl.write_file("sb-1", "/from-str", str(local), chunk_size=4096)
    assert server.files["/from-str"] == data and server.chunk_sizes == [4096, 4096, 1808]
    res = ctl.write_file("sb-1", "/from-path", local)
    assert server.files["/from-path"] == data and res.sha256 == sha(data)

    # A str is never uploaded as content: it names a local file, which must exist.
    uploads = len(server.headers)
    with pytest.raises(FileNotFoundError):
        ctl.write_file("sb-1", "/greeting", "hello world")
    assert len(server.headers) == uploads, "a missing local file fails before any call"
    with pytest.raises(IsADirectoryError):
        ctl.write_file("sb-1", "/dir", tmp_path)


def test_a_file_object_is_read_chunk_size_at_a_time(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    data = pattern(10_000)
    reader = RecordingReader(data)
    reader.seek(1000)  # uploaded from where it stands
    res = ctl.write_file("sb-1", "/obj", reader, chunk_size=4000)
    assert server.files["/obj"] == data[1000:] and res.size == 9000
    assert reader.sizes == [4000, 4000, 4000, 4000], "every read asks for chunk_size bytes, never the whole file"
    assert server.chunk_sizes == [4000, 4000, 1000]

    # A text-mode file is refused (and nothing is stored).
    with pytest.raises(TypeError, match="binary mode"):
        ctl.write_file("sb-1", "/text", io.StringIO("text"))  # type: ignore[arg-type]
    assert "/text" not in server.files


def test_an_iterable_of_chunks_is_passed_on_and_split(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    chunks = [b"ab", b"", bytearray(b"cdefg"), memoryview(b"h")]
    ctl.write_file("sb-1", "/it", iter(chunks), chunk_size=3)
    assert server.files["/it"] == b"abcdefgh"
    assert server.chunk_sizes == [2, 3, 2, 1], "empty chunks skipped, big ones split, small ones sent as they come"
    ctl.write_file("sb-1", "/list", [b"x", b"y"])
    assert server.files["/list"] == b"xy"
    with pytest.raises(TypeError, match="gave str, not bytes"):
        ctl.write_file("sb-1", "/strs", ["not", "bytes"])  # type: ignore[list-item]
    assert "/strs" not in server.files
    with pytest.raises(TypeError, match="source must be bytes"):
        ctl.write_file("sb-1", "/n", 42)  # type: ignore[arg-type]


def test_a_generator_is_consumed_only_as_far_as_the_call_got(
    fake: tuple[FakeSandbox, str], ctl: forkd.Controller
) -> None:
    """An endless generator: the guest's disk fills after three chunks, the
    call fails, and the generator was read only a few chunks further (what
    HTTP/2 flow control let through), not until memory ran out."""
    server, _ = fake
    server.fail_write_after = 3
    taken = [0]
    with pytest.raises(forkd.ResourceExhaustedError, match="No space left"):
        ctl.write_file("sb-1", "/endless", endless(taken), chunk_size=64 * KIB)
    assert 3 <= taken[0] < 200, taken[0]
    assert "/endless" not in server.files


def test_a_source_that_fails_cancels_the_upload(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    boom = OSError("the source disk went away")

    def failing() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000
        raise boom

    with pytest.raises(OSError) as caught:
        ctl.write_file("sb-1", "/half", failing(), chunk_size=1000)
    assert caught.value is boom, "the source's own exception propagates"
    assert server.cut_off_event.wait(5), "the server saw the upload cancelled, not completed"
    assert "/half" not in server.files


def test_upload_arguments_are_checked(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    for bad in (0, -1, 3 * MIB + 1, True, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            ctl.write_file("sb-1", "/x", b"x", chunk_size=bad)  # type: ignore[arg-type]
    for bad_mode in (-1, 0o10000, True):
        with pytest.raises(ValueError, match="mode"):
            ctl.write_file("sb-1", "/x", b"x", mode=bad_mode)
    with pytest.raises(TypeError, match="path must be a string"):
        ctl.write_file("sb-1", b"/x", b"x")  # type: ignore[arg-type]
    assert server.headers == [], "nothing was sent"

    # The largest chunk fits in a gRPC message.
    ctl.write_file("sb-1", "/max", pattern(3 * MIB + 1), chunk_size=3 * MIB)
    assert server.chunk_sizes == [3 * MIB, 1]


def test_upload_errors_carry_the_code(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    ctl.write_file("sb-1", "/taken", b"1")
    with pytest.raises(forkd.AlreadyExistsError, match="/taken exists") as caught:
        ctl.write_file("sb-1", "/taken", b"2", no_overwrite=True)
    assert caught.value.method == "WriteFile"
    assert server.files["/taken"] == b"1"
    with pytest.raises(forkd.InvalidArgumentError, match="not absolute"):
        ctl.write_file("sb-1", "relative", pattern(10 * MIB))


# ---- downloads ------------------------------------------------------------------


def test_read_file_returns_bytes_and_iter_file_streams(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    data = pattern(200 * KIB + 5)
    server.files["/data"] = data
    assert ctl.read_file("sb-1", "/data") == data
    assert ctl.read_file("sb-1", "/data", offset=10, length=100) == data[10:110]
    req = server.last("ReadFile")
    assert isinstance(req, sandbox_pb2.ReadFileRequest)
    assert (req.sandbox_id, req.path, req.offset, req.length) == ("sb-1", "/data", 10, 100)
    chunks = list(ctl.iter_file("sb-1", "/data"))
    assert [len(c) for c in chunks] == [READ_CHUNK] * 3 + [8 * KIB + 5]
    assert b"".join(chunks) == data
    assert ctl.read_file("sb-1", "/data", offset=len(data) + 10) == b""
    server.files["/empty"] = b""
    assert ctl.read_file("sb-1", "/empty") == b""
    with pytest.raises(forkd.NotFoundError, match="No such file"):
        ctl.read_file("sb-1", "/nope")
    with pytest.raises(ValueError, match="offset"):
        ctl.read_file("sb-1", "/data", offset=-1)


def test_read_file_into_a_local_path_is_atomic(
    fake: tuple[FakeSandbox, str], ctl: forkd.Controller, tmp_path: Path
) -> None:
    server, _ = fake
    data = pattern(300 * KIB)
    server.files["/data"] = data
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old contents")

    res = ctl.read_file("sb-1", "/data", dest)
    assert isinstance(res, forkd.ReadFileResult)
    assert (res.size, res.sha256, res.file_size) == (len(data), sha(data), len(data))
    assert dest.read_bytes() == data and os.listdir(tmp_path) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask, "created as open() would"

    # A part: file_size is the whole file's.
    res = ctl.read_file("sb-1", "/data", str(tmp_path / "part.bin"), offset=100, length=50)
    assert (res.size, res.file_size) == (50, len(data))
    assert (tmp_path / "part.bin").read_bytes() == data[100:150]

    # Every failure leaves the destination as it was and no temporary file.
    dest.write_bytes(b"old contents")
    for mode, error in (
        ("fail", forkd.UnavailableError),
        ("bad_sha", forkd.DataLossError),
        ("no_end", forkd.DataLossError),
        ("short", forkd.DataLossError),
    ):
        server.read_mode = mode
        with pytest.raises(error):
            ctl.read_file("sb-1", "/data", dest)
        assert dest.read_bytes() == b"old contents", mode
        assert sorted(os.listdir(tmp_path)) == ["out.bin", "part.bin"], mode
    server.read_mode = "ok"
    with pytest.raises(forkd.NotFoundError):
        ctl.read_file("sb-1", "/nope", tmp_path / "new.bin")
    assert not (tmp_path / "new.bin").exists()


def test_a_mid_stream_failure_removes_the_temporary_file_it_had_written(
    fake: tuple[FakeSandbox, str], ctl: forkd.Controller, tmp_path: Path
) -> None:
    """The temporary file exists (with the first chunks in it) while the
    download runs, and is gone after the stream fails."""
    server, _ = fake
    server.files["/data"] = pattern(1 * MIB)
    server.read_mode, server.read_fail_after = "fail", 8
    dest = tmp_path / "out.bin"
    seen: list[list[str]] = []

    original = forkd.files.AtomicFile.write

    def spying_write(self: forkd.files.AtomicFile, data: bytes) -> None:
        original(self, data)
        seen.append(os.listdir(tmp_path))

    forkd.files.AtomicFile.write = spying_write  # type: ignore[method-assign]
    try:
        with pytest.raises(forkd.UnavailableError, match="the sandbox stopped"):
            ctl.read_file("sb-1", "/data", dest)
    finally:
        forkd.files.AtomicFile.write = original  # type: ignore[method-assign]
    assert len(seen) == 8
    temp = seen[0]
    assert len(temp) == 1 and temp[0].startswith(".out.bin.") and temp[0].endswith(".forkd-part")
    assert os.listdir(tmp_path) == []


def test_read_file_into_a_file_object(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    data = pattern(100 * KIB)
    server.files["/data"] = data
    out = io.BytesIO()
    res = ctl.read_file("sb-1", "/data", out)
    assert out.getvalue() == data and res == forkd.ReadFileResult(len(data), sha(data), len(data))


def test_downloads_are_verified(fake: tuple[FakeSandbox, str], ctl: forkd.Controller, tmp_path: Path) -> None:
    server, _ = fake
    data = pattern(150 * KIB)
    server.files["/data"] = data

    server.read_mode = "bad_sha"
    with pytest.raises(forkd.DataLossError, match="SHA-256 mismatch") as caught:
        ctl.read_file("sb-1", "/data")
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and caught.value.method == "ReadFile"
    assert "/data" in str(caught.value)
    # iter_file hands out every chunk, then raises at the end.
    got: list[bytes] = []
    with pytest.raises(forkd.DataLossError, match="SHA-256 mismatch"):
        for chunk in ctl.iter_file("sb-1", "/data"):
            got.append(chunk)
    assert b"".join(got) == data

    server.read_mode = "no_end"
    with pytest.raises(forkd.DataLossError, match="without its end message"):
        ctl.read_file("sb-1", "/data", io.BytesIO())
    with pytest.raises(forkd.DataLossError, match="without its end message"):
        list(ctl.iter_file("sb-1", "/data"))

    server.read_mode = "short"
    with pytest.raises(forkd.DataLossError, match="incomplete"):
        ctl.read_file("sb-1", "/data")


def test_read_file_destinations_are_checked(fake: tuple[FakeSandbox, str], ctl: forkd.Controller, tmp_path: Path) -> None:
    server, _ = fake
    server.files["/data"] = b"x"
    with pytest.raises(IsADirectoryError):
        ctl.read_file("sb-1", "/data", tmp_path)
    with pytest.raises(TypeError, match="dest must be None"):
        ctl.read_file("sb-1", "/data", 3)  # type: ignore[call-overload]
    with pytest.raises(FileNotFoundError):
        ctl.read_file("sb-1", "/data", tmp_path / "no-such-dir" / "out")


# ---- stat, list, remove -----------------------------------------------------------


def test_stat_list_and_remove(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    info = ctl.stat_file("sb-1", "/etc")
    assert isinstance(info, forkd.FileInfo)
    assert (info.name, info.size, info.mode, info.type) == ("etc", 4096, 0o755, "directory")
    assert info.is_dir and not info.is_file and not info.is_symlink
    assert info.modify_time == datetime(2027, 1, 15, 8, 0, 0, 500_000, tzinfo=timezone.utc)
    with pytest.raises(forkd.NotFoundError):
        ctl.stat_file("sb-1", "/missing")

    listing = ctl.list_dir("sb-1", "/")
    assert isinstance(listing, forkd.ListDirResult) and listing.truncated
    assert listing.names == ["bin", "hello.txt", "null"] and len(listing) == 3
    assert [e.type for e in listing] == ["symlink", "file", "other"]
    assert listing.entries[0].is_symlink and listing.entries[0].modify_time is None
    assert listing.entries[1].modify_time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    req = server.last("ListDir")
    assert isinstance(req, sandbox_pb2.ListDirRequest) and (req.sandbox_id, req.path) == ("sb-1", "/")

    server.files["/tmp/x"] = b"x"
    assert ctl.remove_file("sb-1", "/tmp/x") is None
    assert "/tmp/x" not in server.files
    ctl.remove_file("sb-1", "/tmp", recursive=True)
    req = server.last("RemoveFile")
    assert isinstance(req, sandbox_pb2.RemoveFileRequest) and (req.path, req.recursive) == ("/tmp", True)
    with pytest.raises(forkd.InvalidArgumentError):
        ctl.remove_file("sb-1", "/")


def test_file_types_and_data_loss_code() -> None:
    assert [wire.file_type_name(v) for v in range(6)] == [
        "unspecified",
        "file",
        "directory",
        "symlink",
        "other",
        "unspecified",
    ]
    assert isinstance(errors.error_for(grpc.StatusCode.DATA_LOSS, "x"), forkd.DataLossError)


# ---- the asyncio controller ---------------------------------------------------------


def test_async_uploads(fake: tuple[FakeSandbox, str], tmp_path: Path) -> None:
    server, target = fake
    local = tmp_path / "up.bin"
    data = pattern(9000)
    local.write_bytes(data)

    async def agen(parts: list[bytes]) -> AsyncIterator[bytes]:
        for p in parts:
            await asyncio.sleep(0)
            yield p

    async def main() -> list[forkd.WriteFileResult]:
        async with forkd.AsyncController(target, timeout=10) as actl:
            return [
                await actl.write_file("sb-1", "/bytes", data, chunk_size=4000, mode=0o700),
                await actl.write_file("sb-1", "/path", local, chunk_size=4000),
                await actl.write_file("sb-1", "/str", str(local)),
                await actl.write_file("sb-1", "/obj", RecordingReader(data), chunk_size=5000),
                await actl.write_file("sb-1", "/agen", agen([b"ab", b"", b"cdef"]), chunk_size=3),
                await actl.write_file("sb-1", "/iter", iter([b"x", b"yz"])),
            ]

    results = asyncio.run(main())
    assert [r.path for r in results] == ["/bytes", "/path", "/str", "/obj", "/agen", "/iter"]
    assert results[0].sha256 == sha(data) and server.headers[0].mode == 0o700
    for name in ("/bytes", "/path", "/str", "/obj"):
        assert server.files[name] == data, name
    assert server.files["/agen"] == b"abcdef" and server.files["/iter"] == b"xyz"
    assert server.chunk_sizes == [1, 2]


def test_async_uploads_stream_and_cancel(fake: tuple[FakeSandbox, str]) -> None:
    server, target = fake
    taken = [0]
    boom = OSError("source failed")

    async def endless_async() -> AsyncIterator[bytes]:
        while True:
            taken[0] += 1
            yield b"q" * (64 * KIB)

    async def failing() -> AsyncIterator[bytes]:
        seen = server.data_messages
        yield b"a" * 100
        while server.data_messages == seen:  # the server is reading the upload
            await asyncio.sleep(0.01)
        raise boom

    async def main() -> None:
        async with forkd.AsyncController(target, timeout=10) as actl:
            server.fail_write_after = 3
            with pytest.raises(forkd.ResourceExhaustedError):
                await actl.write_file("sb-1", "/endless", endless_async(), chunk_size=64 * KIB)
            assert 3 <= taken[0] < 200, taken[0]
            taken[0] = 0
            with pytest.raises(forkd.ResourceExhaustedError):
                await actl.write_file("sb-1", "/endless", endless(taken), chunk_size=64 * KIB)
            assert 3 <= taken[0] < 200, taken[0]
            server.fail_write_after = None
            with pytest.raises(OSError) as caught:
                await actl.write_file("sb-1", "/half", failing())
            assert caught.value is boom
            with pytest.raises(ValueError, match="chunk_size"):
                await actl.write_file("sb-1", "/x", b"x", chunk_size=4 * MIB)
            with pytest.raises(forkd.AlreadyExistsError):
                server.files["/taken"] = b"1"
                await actl.write_file("sb-1", "/taken", b"2", no_overwrite=True)

    asyncio.run(main())
    assert server.cut_off_event.wait(5)
    assert "/endless" not in server.files and "/half" not in server.files


def test_async_downloads(fake: tuple[FakeSandbox, str], tmp_path: Path) -> None:
    server, target = fake
    data = pattern(200 * KIB)
    server.files["/data"] = data
    dest = tmp_path / "out.bin"

    async def main() -> None:
        async with forkd.AsyncController(target, timeout=10) as actl:
            assert await actl.read_file("sb-1", "/data") == data
            assert await actl.read_file("sb-1", "/data", offset=5, length=10) == data[5:15]
            chunks = [c async for c in actl.iter_file("sb-1", "/data")]
            assert b"".join(chunks) == data and max(len(c) for c in chunks) <= READ_CHUNK

            res = await actl.read_file("sb-1", "/data", dest)
            assert res == forkd.ReadFileResult(len(data), sha(data), len(data))
            assert dest.read_bytes() == data
            out = io.BytesIO()
            await actl.read_file("sb-1", "/data", out, offset=len(data) - 3)
            assert out.getvalue() == data[-3:]

            dest.write_bytes(b"old")
            for mode, error in (("fail", forkd.UnavailableError), ("bad_sha", forkd.DataLossError)):
                server.read_mode = mode
                with pytest.raises(error):
                    await actl.read_file("sb-1", "/data", str(dest))
                assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"], mode
            server.read_mode = "no_end"
            with pytest.raises(forkd.DataLossError, match="without its end message"):
                [c async for c in actl.iter_file("sb-1", "/data")]
            server.read_mode = "ok"

            info = await actl.stat_file("sb-1", "/etc")
            assert info.is_dir and info.mode == 0o755
            listing = await actl.list_dir("sb-1", "/")
            assert listing.truncated and listing.names == ["bin", "hello.txt", "null"]
            await actl.remove_file("sb-1", "/data", recursive=True)
            assert "/data" not in server.files

    asyncio.run(main())


def test_leaving_iter_file_early_cancels_the_download(fake: tuple[FakeSandbox, str], ctl: forkd.Controller) -> None:
    server, _ = fake
    server.files["/big"] = pattern(4 * MIB)
    start = time.monotonic()
    for chunk in ctl.iter_file("sb-1", "/big"):
        assert len(chunk) == READ_CHUNK
        break
    assert time.monotonic() - start < 5
    # The channel is still usable.
    assert ctl.read_file("sb-1", "/big", length=3) == server.files["/big"][:3]
