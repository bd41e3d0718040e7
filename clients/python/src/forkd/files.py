"""Streaming helpers for the file calls, shared by both controllers.

* Upload sources (``write_file``) become chunks of at most ``chunk_size``
  bytes, read lazily: a file, local path or iterable is never read whole.
* :class:`RequestPipe` hands the blocking controller's chunks to grpcio's
  request-sending thread one at a time, so the caller's thread reads the
  source only as fast as the call sends it.
* :class:`DownloadCheck` counts and hashes a ReadFile stream and checks it
  against its ``end`` message.
* :class:`AtomicFile` is a temporary file beside a download's local
  destination, renamed over it only once the download is verified.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import IO, Protocol, TypeGuard, Union

import grpc

from forkd.errors import DataLossError, ForkdError
from forkd.results import ReadFileResult
from forkd.v1 import sandbox_pb2


class BinaryReader(Protocol):
    """A binary file object to upload from: anything with ``read(n) -> bytes``
    (``open(p, "rb")``, ``io.BytesIO``, a socket's ``makefile("rb")``, ...)."""

    def read(self, size: int, /) -> bytes: ...


class BinaryWriter(Protocol):
    """A binary file object to download into: anything with ``write(bytes)``
    (``open(p, "wb")``, ``io.BytesIO``, ``sys.stdout.buffer``, ...)."""

    def write(self, data: bytes, /) -> object: ...


StrPath = Union[str, "os.PathLike[str]"]
"""A local path: a ``str`` or a ``pathlib.Path`` (any ``os.PathLike[str]``)."""

Buffer = Union[bytes, bytearray, memoryview]
"""Bytes held in memory."""

UploadSource = Union[Buffer, StrPath, BinaryReader, Iterable[Buffer]]
"""What ``Controller.write_file`` uploads: the bytes themselves, a local
path (``str`` or ``os.PathLike``: the file at that path is uploaded), a
binary file object, or an iterable of bytes chunks."""

AsyncUploadSource = Union[UploadSource, AsyncIterable[Buffer]]
"""What ``AsyncController.write_file`` uploads: an :data:`UploadSource`, or
an async iterable of bytes chunks."""


def is_path(obj: object) -> TypeGuard[StrPath]:
    """True for a local path: a ``str`` or an ``os.PathLike``."""
    return isinstance(obj, (str, os.PathLike))


def is_reader(obj: object) -> TypeGuard[BinaryReader]:
    """True for a file object to read from (it has ``read``)."""
    return callable(getattr(obj, "read", None))


def is_writer(obj: object) -> TypeGuard[BinaryWriter]:
    """True for a file object to write to (it has ``write``)."""
    return callable(getattr(obj, "write", None))


def _source_type_error(source: object, *, aio: bool) -> TypeError:
    iterables = "an iterable or async iterable" if aio else "an iterable"
    return TypeError(
        "source must be bytes, bytearray or memoryview (the data), a str or os.PathLike (a local file"
        f" to upload), a binary file object, or {iterables} of bytes chunks; not {type(source).__name__}"
    )


def _as_bytes(chunk: object, what: str) -> bytes:
    """A chunk from a source as bytes; TypeError for anything else."""
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    if isinstance(chunk, str):
        raise TypeError(f"{what} gave str, not bytes: open the file in binary mode ('rb'), or encode the text")
    raise TypeError(f"{what} gave {type(chunk).__name__}, not bytes")


def _split(data: bytes, chunk_size: int) -> Iterator[bytes]:
    """``data`` in pieces of at most ``chunk_size`` bytes (nothing for empty data)."""
    if len(data) <= chunk_size:
        if data:
            yield data
        return
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        yield bytes(view[start : start + chunk_size])


def _buffer_chunks(data: Buffer, chunk_size: int) -> Iterator[bytes]:
    if isinstance(data, bytes):
        yield from _split(data, chunk_size)
        return
    view = memoryview(data).cast("B")  # bytes of any buffer format
    for start in range(0, len(view), chunk_size):
        yield bytes(view[start : start + chunk_size])


def _reader_chunks(reader: BinaryReader, chunk_size: int) -> Iterator[bytes]:
    while True:
        chunk = reader.read(chunk_size)
        if chunk is None:
            raise TypeError("the source file object's read() returned None (a non-blocking file with no data?)")
        chunk = _as_bytes(chunk, "the source file object's read()")
        if not chunk:
            return
        yield from _split(chunk, chunk_size)


def _iterable_chunks(chunks: Iterable[Buffer], chunk_size: int) -> Iterator[bytes]:
    for chunk in chunks:
        yield from _split(_as_bytes(chunk, "the source iterable"), chunk_size)


@contextmanager
def upload_chunks(source: UploadSource, chunk_size: int) -> Iterator[Iterator[bytes]]:
    """The source's bytes as non-empty chunks of at most ``chunk_size``,
    read as they are iterated. A local path is opened now (so a missing
    file fails before any call) and closed on leaving."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield _buffer_chunks(source, chunk_size)
    elif is_path(source):
        with open(source, "rb") as f:
            yield _reader_chunks(f, chunk_size)
    elif is_reader(source):
        yield _reader_chunks(source, chunk_size)
    elif isinstance(source, Iterable) and not isinstance(source, str):
        yield _iterable_chunks(source, chunk_size)
    else:
        raise _source_type_error(source, aio=False)


async def _async_buffer_chunks(data: Buffer, chunk_size: int) -> AsyncIterator[bytes]:
    for chunk in _buffer_chunks(data, chunk_size):
        yield chunk


def _open_for_reading(path: StrPath) -> IO[bytes]:
    return open(path, "rb")


async def _async_file_chunks(f: IO[bytes], chunk_size: int) -> AsyncIterator[bytes]:
    """A local file's chunks, each read in a worker thread."""
    while True:
        chunk = await asyncio.to_thread(f.read, chunk_size)
        if not chunk:
            return
        yield chunk


async def _async_reader_chunks(reader: BinaryReader, chunk_size: int) -> AsyncIterator[bytes]:
    for chunk in _reader_chunks(reader, chunk_size):
        yield chunk


async def _async_iterable_chunks(chunks: AsyncIterable[Buffer], chunk_size: int) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        for piece in _split(_as_bytes(chunk, "the source async iterable"), chunk_size):
            yield piece


async def _async_sync_iterable_chunks(chunks: Iterable[Buffer], chunk_size: int) -> AsyncIterator[bytes]:
    for chunk in _iterable_chunks(chunks, chunk_size):
        yield chunk


@asynccontextmanager
async def async_upload_chunks(source: AsyncUploadSource, chunk_size: int) -> AsyncIterator[AsyncIterator[bytes]]:
    """:func:`upload_chunks` for the asyncio controller, which also takes
    async iterables. A local path is opened, read and closed in a worker
    thread; file objects and iterables the caller passes are consumed in
    the event loop's thread, as they are."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield _async_buffer_chunks(source, chunk_size)
    elif is_path(source):
        f = await asyncio.to_thread(_open_for_reading, source)
        try:
            yield _async_file_chunks(f, chunk_size)
        finally:
            await asyncio.to_thread(f.close)
    elif is_reader(source):
        yield _async_reader_chunks(source, chunk_size)
    elif isinstance(source, AsyncIterable):
        yield _async_iterable_chunks(source, chunk_size)
    elif isinstance(source, Iterable) and not isinstance(source, str):
        yield _async_sync_iterable_chunks(source, chunk_size)
    else:
        raise _source_type_error(source, aio=True)


class RequestPipe:
    """The request iterator of a blocking client-streaming call.

    grpcio sends a client stream from its own thread, pulling requests from
    an iterator. This one yields ``first``, then what the caller
    :meth:`put`\\s, holding at most one request waiting: the caller's thread
    (which reads the source) blocks until the call has taken the previous
    one. :meth:`finish` ends the stream normally (grpcio then half-closes
    the call); :meth:`abort` ends it at once and makes :meth:`put` return
    False (call it when the call is done, and after cancelling the call,
    so that grpcio never half-closes a stream that was cut short).
    """

    def __init__(self, first: sandbox_pb2.WriteFileRequest) -> None:
        self._cond = threading.Condition()
        self._items: deque[sandbox_pb2.WriteFileRequest] = deque([first])
        self._finished = False
        self._aborted = False

    def put(self, item: sandbox_pb2.WriteFileRequest) -> bool:
        """Queues ``item`` once the previous one is taken; False when aborted."""
        with self._cond:
            self._cond.wait_for(lambda: self._aborted or not self._items)
            if self._aborted:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def finish(self) -> None:
        """No more items: the stream ends after the queued one."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Ends the stream now and drops what is queued."""
        with self._cond:
            self._aborted = True
            self._items.clear()
            self._cond.notify_all()

    def __iter__(self) -> RequestPipe:
        return self

    def __next__(self) -> sandbox_pb2.WriteFileRequest:
        with self._cond:
            self._cond.wait_for(lambda: self._aborted or self._finished or bool(self._items))
            if self._aborted or not self._items:
                raise StopIteration
            item = self._items.popleft()
            self._cond.notify_all()
            return item


class DownloadCheck:
    """Follows one ReadFile stream: hands out its data, counts and hashes
    it, and checks it against the ``end`` message (DataLossError when they
    differ, or when the stream ends without one)."""

    def __init__(self, path: str, method: str = "ReadFile") -> None:
        self._path = path
        self._method = method
        self._sha = hashlib.sha256()
        self._size = 0
        self._end: sandbox_pb2.ReadFileEnd | None = None

    def _loss(self, what: str) -> DataLossError:
        return DataLossError(grpc.StatusCode.DATA_LOSS, f"{self._path}: {what}", method=self._method)

    def add(self, msg: sandbox_pb2.ReadFileResponse) -> bytes:
        """The data one message carries (b"" for the end, which is checked)."""
        which = msg.WhichOneof("event")
        if self._end is not None:
            raise self._loss("the download carried a message after its end")
        if which == "data":
            self._sha.update(msg.data)
            self._size += len(msg.data)
            return msg.data
        if which == "end":
            self._end = msg.end
            if msg.end.size != self._size:
                raise self._loss(
                    f"received {self._size} bytes but the sandbox sent {msg.end.size}: the download is incomplete"
                )
            got = self._sha.hexdigest()
            if msg.end.sha256.lower() != got:
                raise self._loss(
                    f"SHA-256 mismatch: the received bytes hash to {got}, the sandbox sent {msg.end.sha256 or '(none)'}"
                )
            return b""
        raise ForkdError(grpc.StatusCode.UNKNOWN, f"ReadFileResponse carries no event: {msg!r}", method=self._method)

    def result(self) -> ReadFileResult:
        """The verified result; DataLossError when the stream carried no end."""
        if self._end is None:
            raise self._loss(
                f"the download ended after {self._size} bytes without its end message (size and SHA-256):"
                " the data may be incomplete"
            )
        return ReadFileResult.from_message(self._end)


class AtomicFile:
    """A new temporary file beside ``dest`` (same directory, so the final
    rename is atomic), created with the usual permissions (0666 less the
    umask). :meth:`commit` flushes it to disk and renames it over ``dest``;
    :meth:`discard` removes it. Blocking calls: the asyncio controller runs
    each in a worker thread."""

    def __init__(self, dest: StrPath) -> None:
        self.dest = os.fspath(dest)
        if os.path.isdir(self.dest):
            raise IsADirectoryError(f"read_file destination {self.dest!r} is a directory; name the file to write")
        directory, name = os.path.split(os.path.abspath(self.dest))
        while True:
            self.tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.forkd-part")
            try:
                fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            break
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        """Appends ``data``."""
        self._file.write(data)

    def commit(self) -> None:
        """Flushes, fsyncs and closes the file, then renames it over ``dest``."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.dest)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Closes and removes the temporary file (``dest`` is untouched)."""
        try:
            self._file.close()
        finally:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def dest_type_error(dest: object) -> TypeError:
    """The error for a ``read_file`` destination of the wrong type."""
    return TypeError(
        "dest must be None (return the bytes), a str or os.PathLike (a local file to write), or a"
        f" binary file object with write(); not {type(dest).__name__}"
    )
