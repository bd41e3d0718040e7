"""The MCP file tools (write_file, read_file, list_dir, stat_file,
remove_file) without a daemon.

The tools are called through the MCP server itself (``call_tool``: the
arguments are validated against the input schema and the results converted
to the output schema, as for a real client) against a stand-in gRPC
SandboxService on loopback that keeps files in memory:

- write_file sends text as UTF-8 or base64 as the decoded bytes, with the
  mode given as an octal string, and refuses more than 1 MiB or bad base64
  with a clear error before any call;
- read_file asks for max_bytes + 1 bytes to tell whether the file goes on,
  returns text when the bytes are UTF-8 (ending before a character cut in
  two) and base64 otherwise, with size, sha256, truncated and next_offset;
  a download whose SHA-256 does not match is a DATA_LOSS tool error;
- list_dir returns at most 200 entries, pages with offset, and says when
  there are more;
- stat_file and remove_file pass their arguments and report the path;
- errors carry the gRPC code name.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from forkd.v1 import sandbox_pb2, sandbox_pb2_grpc
from forkd_mcp import ForkdTools, build_server

MIB = 1 << 20


class FakeFiles(sandbox_pb2_grpc.SandboxServiceServicer):
    """A Linux sandbox's files, in memory."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: list[sandbox_pb2.WriteFileHeader] = []
        self.requests: list[tuple[str, Any]] = []
        self.entries = [
            sandbox_pb2.FileInfo(
                name=f"f{i:03}",
                size=i,
                mode=0o644,
                type=sandbox_pb2.FILE_TYPE_FILE,
                modify_time=Timestamp(seconds=1_800_000_000),
            )
            for i in range(250)
        ]
        self.bad_sha = False

    def WriteFile(self, request_iterator: Iterator[sandbox_pb2.WriteFileRequest], context: grpc.ServicerContext) -> sandbox_pb2.WriteFileResponse:
        requests = iter(request_iterator)
        header = next(requests).header
        self.headers.append(header)
        if header.no_overwrite and header.path in self.files:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{header.path} already exists")
        data = b"".join(msg.data for msg in requests)
        self.files[header.path] = data
        return sandbox_pb2.WriteFileResponse(path=header.path, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def ReadFile(self, request: sandbox_pb2.ReadFileRequest, context: grpc.ServicerContext) -> Iterator[sandbox_pb2.ReadFileResponse]:
        self.requests.append(("ReadFile", request))
        if request.path not in self.files:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.path}: No such file or directory")
        whole = self.files[request.path]
        sent = whole[request.offset : request.offset + request.length if request.length else None]
        for start in range(0, len(sent), 65536):
            yield sandbox_pb2.ReadFileResponse(data=sent[start : start + 65536])
        sha = hashlib.sha256(b"not it" if self.bad_sha else sent).hexdigest()
        yield sandbox_pb2.ReadFileResponse(end=sandbox_pb2.ReadFileEnd(size=len(sent), sha256=sha, file_size=len(whole)))

    def StatFile(self, request: sandbox_pb2.StatFileRequest, context: grpc.ServicerContext) -> sandbox_pb2.StatFileResponse:
        self.requests.append(("StatFile", request))
        if request.path == "/missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "/missing: No such file or directory")
        return sandbox_pb2.StatFileResponse(
            info=sandbox_pb2.FileInfo(name="python3", size=9, mode=0o777, type=sandbox_pb2.FILE_TYPE_SYMLINK)
        )

    def ListDir(self, request: sandbox_pb2.ListDirRequest, context: grpc.ServicerContext) -> sandbox_pb2.ListDirResponse:
        self.requests.append(("ListDir", request))
        return sandbox_pb2.ListDirResponse(entries=self.entries, truncated=False)

    def RemoveFile(self, request: sandbox_pb2.RemoveFileRequest, context: grpc.ServicerContext) -> sandbox_pb2.RemoveFileResponse:
        self.requests.append(("RemoveFile", request))
        if request.path == "/":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refusing to remove /")
        return sandbox_pb2.RemoveFileResponse()

    def last(self, name: str) -> Any:
        got = [req for method, req in self.requests if method == name]
        assert got, f"no {name} request was received"
        return got[-1]


@pytest.fixture
def fake() -> Iterator[tuple[FakeFiles, str]]:
    servicer = FakeFiles()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


Call = Callable[..., Awaitable[dict[str, Any]]]


def run(target: str, scenario: Callable[[Call], Awaitable[None]]) -> None:
    """Runs ``scenario`` with ``call(tool, **arguments)``, which calls a tool
    through the MCP server and returns its structured result (a failed call
    raises ToolError)."""

    async def main() -> None:
        tools = ForkdTools(target, call_timeout=10)
        server = build_server(tools)

        async def call(tool: str, **arguments: Any) -> dict[str, Any]:
            res = await server.call_tool(tool, arguments)
            assert not getattr(res, "is_error", False), res
            structured = getattr(res, "structured_content", None)
            assert isinstance(structured, dict), res
            return structured

        try:
            await scenario(call)
        finally:
            await tools.aclose()

    anyio.run(main)


def test_write_file_text_base64_and_mode(fake: tuple[FakeFiles, str]) -> None:
    server, target = fake

    async def scenario(call: Call) -> None:
        text = "print('héllo')\n"
        res = await call("write_file", sandbox_id="sb-1", path="/root/main.py", content=text)
        data = text.encode()
        assert res == {"path": "/root/main.py", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert server.files["/root/main.py"] == data
        h = server.headers[-1]
        assert (h.sandbox_id, h.mode, h.make_parents, h.no_overwrite) == ("sb-1", 0, False, False)

        blob = bytes(range(256)) * 3
        encoded = base64.b64encode(blob).decode()
        wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
        await call(
            "write_file",
            sandbox_id="sb-1",
            path="/opt/tool/bin",
            content=wrapped,
            encoding="base64",
            mode="755",
            make_parents=True,
        )
        assert server.files["/opt/tool/bin"] == blob
        h = server.headers[-1]
        assert (h.mode, h.make_parents) == (0o755, True)
        for mode, bits in (("0600", 0o600), ("0o4755", 0o4755), ("7", 0o7)):
            await call("write_file", sandbox_id="sb-1", path="/m", content="", mode=mode)
            assert server.headers[-1].mode == bits, mode

        await call("write_file", sandbox_id="sb-1", path="/max", content="x" * MIB)
        assert len(server.files["/max"]) == MIB

    run(target, scenario)


def test_write_file_refuses_bad_content_before_any_call(fake: tuple[FakeFiles, str]) -> None:
    server, target = fake

    async def scenario(call: Call) -> None:
        for arguments, message in (
            ({"content": "x" * (MIB + 1)}, "1048577 bytes, more than the 1048576"),
            ({"content": "é" * (MIB // 2 + 1)}, "more than the 1048576"),
            ({"content": "not base64!", "encoding": "base64"}, "not valid base64"),
            ({"content": "QUJ", "encoding": "base64"}, "not valid base64"),
            ({"content": "QUJD" * (MIB // 3 + 2), "encoding": "base64"}, "base64 characters, more than"),
            ({"content": "\ud800"}, "not valid Unicode text"),
            ({"content": "x", "encoding": "latin-1"}, "encoding"),
            ({"content": "x", "mode": "9"}, "mode"),
            ({"content": "x", "mode": 755}, "mode"),
        ):
            with pytest.raises(ToolError, match=message):
                await call("write_file", sandbox_id="sb-1", path="/f", **arguments)
        assert server.headers == [], "nothing reached the daemon"

        await call("write_file", sandbox_id="sb-1", path="/taken", content="1")
        with pytest.raises(ToolError, match="ALREADY_EXISTS: /taken already exists"):
            await call("write_file", sandbox_id="sb-1", path="/taken", content="2", no_overwrite=True)

    run(target, scenario)


def test_read_file_text_binary_and_truncation(fake: tuple[FakeFiles, str]) -> None:
    server, target = fake
    server.files["/etc/os-release"] = b'PRETTY_NAME="Debian GNU/Linux 12"\n'
    server.files["/bin/true"] = b"\x7fELF\x02\x01\x01\x00\xff\xfe"
    server.files["/accents"] = "aé€".encode()  # 1 + 2 + 3 bytes
    server.files["/big"] = b"0123456789" * 20_000

    async def scenario(call: Call) -> None:
        res = await call("read_file", sandbox_id="sb-1", path="/etc/os-release")
        text = server.files["/etc/os-release"]
        assert res == {
            "path": "/etc/os-release",
            "offset": 0,
            "encoding": "utf-8",
            "content": text.decode(),
            "size": len(text),
            "sha256": hashlib.sha256(text).hexdigest(),
            "truncated": False,
            "next_offset": None,
            "file_size": len(text),
        }
        req = server.last("ReadFile")
        assert (req.offset, req.length) == (0, 65536 + 1), "one byte more than max_bytes, to see whether the file goes on"

        res = await call("read_file", sandbox_id="sb-1", path="/bin/true")
        assert res["encoding"] == "base64" and base64.b64decode(res["content"]) == server.files["/bin/true"]
        assert res["size"] == 10 and not res["truncated"]

        # Cut inside "€": the text ends before it, and the rest starts there.
        res = await call("read_file", sandbox_id="sb-1", path="/accents", max_bytes=4)
        assert (res["encoding"], res["content"], res["size"], res["truncated"], res["next_offset"]) == (
            "utf-8",
            "aé",
            3,
            True,
            3,
        )
        assert res["sha256"] == hashlib.sha256("aé".encode()).hexdigest() and res["file_size"] == 6
        res = await call("read_file", sandbox_id="sb-1", path="/accents", offset=3, max_bytes=3)
        assert (res["content"], res["truncated"], res["next_offset"]) == ("€", False, None)
        # A cut that leaves no whole character is given as base64.
        res = await call("read_file", sandbox_id="sb-1", path="/accents", offset=3, max_bytes=2)
        assert (res["encoding"], base64.b64decode(res["content"]), res["truncated"]) == ("base64", "€".encode()[:2], True)

        res = await call("read_file", sandbox_id="sb-1", path="/big", offset=100, max_bytes=MIB)
        assert (res["size"], res["truncated"], res["file_size"]) == (200_000 - 100, False, 200_000)
        res = await call("read_file", sandbox_id="sb-1", path="/big", offset=5, max_bytes=10)
        assert (res["content"], res["truncated"], res["next_offset"]) == ("5678901234", True, 15)
        res = await call("read_file", sandbox_id="sb-1", path="/big", offset=199_990, max_bytes=10)
        assert (res["size"], res["truncated"], res["next_offset"]) == (10, False, None), "exactly to the end"
        res = await call("read_file", sandbox_id="sb-1", path="/big", offset=300_000)
        assert (res["content"], res["size"], res["truncated"]) == ("", 0, False)

        for bad in ({"max_bytes": MIB + 1}, {"max_bytes": 0}, {"offset": -1}):
            with pytest.raises(ToolError):
                await call("read_file", sandbox_id="sb-1", path="/big", **bad)
        with pytest.raises(ToolError, match="NOT_FOUND: /nope: No such file"):
            await call("read_file", sandbox_id="sb-1", path="/nope")
        server.bad_sha = True
        with pytest.raises(ToolError, match="DATA_LOSS: .*SHA-256 mismatch"):
            await call("read_file", sandbox_id="sb-1", path="/etc/os-release")

    run(target, scenario)


def test_list_dir_pages_by_200(fake: tuple[FakeFiles, str]) -> None:
    server, target = fake

    async def scenario(call: Call) -> None:
        res = await call("list_dir", sandbox_id="sb-1", path="/data")
        assert res["path"] == "/data" and len(res["entries"]) == 200
        assert res["truncated"] and res["entries_listed"] == 250
        assert res["entries"][0] == {
            "name": "f000",
            "type": "FILE",
            "size": 0,
            "mode": "0644",
            "modify_time": "2027-01-15T08:00:00Z",
        }
        req = server.last("ListDir")
        assert (req.sandbox_id, req.path) == ("sb-1", "/data")

        res = await call("list_dir", sandbox_id="sb-1", path="/data", offset=200)
        assert [e["name"] for e in res["entries"]] == [f"f{i:03}" for i in range(200, 250)]
        assert not res["truncated"]

        # The daemon's own cut (4096 entries) shows as truncated too.
        server.entries = server.entries[:3]
        server.entries[0].type = sandbox_pb2.FILE_TYPE_DIRECTORY
        server.entries[0].mode = 0o1777
        server.entries[0].ClearField("modify_time")
        res = await call("list_dir", sandbox_id="sb-1", path="/")
        assert not res["truncated"] and len(res["entries"]) == 3
        assert res["entries"][0]["type"] == "DIRECTORY" and res["entries"][0]["mode"] == "1777"
        assert res["entries"][0]["modify_time"] is None

    run(target, scenario)


def test_stat_and_remove(fake: tuple[FakeFiles, str]) -> None:
    server, target = fake

    async def scenario(call: Call) -> None:
        res = await call("stat_file", sandbox_id="sb-1", path="/usr/bin/python3")
        assert res == {
            "path": "/usr/bin/python3",
            "name": "python3",
            "type": "SYMLINK",
            "size": 9,
            "mode": "0777",
            "modify_time": None,
        }
        with pytest.raises(ToolError, match="NOT_FOUND"):
            await call("stat_file", sandbox_id="sb-1", path="/missing")

        assert await call("remove_file", sandbox_id="sb-1", path="/tmp/build", recursive=True) == {
            "path": "/tmp/build",
            "recursive": True,
        }
        req = server.last("RemoveFile")
        assert (req.sandbox_id, req.path, req.recursive) == ("sb-1", "/tmp/build", True)
        await call("remove_file", sandbox_id="sb-1", path="/tmp/x")
        assert server.last("RemoveFile").recursive is False
        with pytest.raises(ToolError, match="INVALID_ARGUMENT: refusing to remove /"):
            await call("remove_file", sandbox_id="sb-1", path="/")

    run(target, scenario)


def test_the_file_tools_are_listed_and_documented() -> None:
    async def listed() -> dict[str, Any]:
        server: MCPServer[None] = build_server(ForkdTools("127.0.0.1:1"))
        return {t.name: t for t in await server.list_tools()}

    tools = anyio.run(listed)
    assert len(tools) == 16
    for name in ("write_file", "read_file", "list_dir", "stat_file", "remove_file"):
        tool = tools[name]
        description = tool.description or ""
        assert "Linux sandbox" in description, name
        for arg in tool.input_schema["properties"]:
            assert f"{arg}:" in description, f"{name}: argument {arg} is not documented"
        assert tool.output_schema is not None, name
        json.dumps(tool.output_schema)
    for name in ("read_file", "list_dir", "stat_file"):
        annotations = tools[name].annotations
        assert annotations is not None and annotations.read_only_hint, name
    for name in ("write_file", "remove_file"):
        annotations = tools[name].annotations
        assert annotations is not None and annotations.destructive_hint and not annotations.read_only_hint, name
    props = tools["read_file"].input_schema["properties"]
    assert props["max_bytes"]["maximum"] == MIB and props["max_bytes"]["default"] == 65536
    write = tools["write_file"].input_schema
    assert set(write["required"]) == {"sandbox_id", "path", "content"}
    assert write["properties"]["encoding"]["enum"] == ["utf-8", "base64"]
    assert "next_offset" in tools["read_file"].output_schema["properties"]
    assert "entries_listed" in tools["list_dir"].output_schema["properties"]
