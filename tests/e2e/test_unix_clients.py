"""`unix:` targets through the real clients against a daemon started with
`--listen-unix`: the Python client (blocking and asyncio) and the MCP
server. grpcio would send the socket path as the HTTP/2 :authority, which
the h2 crate under tonic rejects (every call failed INTERNAL "Stream
removed"); the clients send `localhost` for Unix targets instead.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
from test_mcp_server import call, mcp_session, server_params

import forkd

MEM = 64  # MiB per sandbox


@pytest.fixture
def unix_daemon(daemon_factory, short_tmp):
    sock = short_tmp / "forkd.sock"
    d = daemon_factory(listen_unix=sock)
    assert sock.is_socket(), f"{sock} is not a socket"
    return d, f"unix:{sock}"


def test_python_client_over_unix_socket(unix_daemon) -> None:
    d, target = unix_daemon
    with forkd.Controller(target, timeout=60) as ctl:
        resp = ctl.spawn_sandboxes(n=1, memory_mib=MEM, labels={"via": "unix-sync"})
        [sb] = resp.sandboxes
        d.record_sandboxes([{"vmmPid": sb.vmm_pid}])
        r = ctl.exec(sb.id, ["echo", "over", "unix"])
        assert (r.stdout, r.exit_code) == (b"over unix\n", 0)
        events = list(ctl.exec_stream(sb.id, ["echo", "streamed"]))
        assert b"".join(e.data for e in events if e.kind == "stdout") == b"streamed\n"
        assert (events[-1].kind, events[-1].exit_code) == ("exit", 0)
        assert [s.id for s in ctl.list_sandboxes({"via": "unix-sync"})] == [sb.id]
        # Errors keep their codes over the socket too.
        with pytest.raises(forkd.NotFoundError):
            ctl.get_sandbox("sb-missing")
        ctl.delete_sandbox(sb.id)
    # The same daemon answers on TCP: the sandbox is gone there too.
    assert d.list({"via": "unix-sync"}) == []


def test_async_client_over_unix_socket(unix_daemon) -> None:
    d, target = unix_daemon

    async def main() -> None:
        async with forkd.AsyncController(target, timeout=60) as ctl:
            resp = await ctl.spawn_sandboxes(n=1, memory_mib=MEM, labels={"via": "unix-aio"})
            [sb] = resp.sandboxes
            d.record_sandboxes([{"vmmPid": sb.vmm_pid}])
            r = await ctl.exec(sb.id, ["echo", "async", "unix"])
            assert (r.stdout, r.exit_code) == (b"async unix\n", 0)
            chunks = [e.data async for e in ctl.exec_stream(sb.id, ["echo", "s"]) if e.kind == "stdout"]
            assert b"".join(chunks) == b"s\n"
            with pytest.raises(forkd.NotFoundError):
                await ctl.get_snapshot("no-such-tag")
            await ctl.delete_sandbox(sb.id)

    asyncio.run(main())
    assert d.list({"via": "unix-aio"}) == []


def test_mcp_server_over_unix_socket(unix_daemon) -> None:
    d, target = unix_daemon

    async def main() -> None:
        with anyio.fail_after(180):
            async with mcp_session(server_params(target)) as session:
                spawned = await call(
                    session, "spawn_sandboxes", n=1, memory_mib=MEM, labels={"via": "unix-mcp"}
                )
                [sb] = spawned["sandboxes"]
                d.record_sandboxes([{"vmmPid": sb["vmm_pid"]}])
                out = await call(session, "exec", sandbox_id=sb["id"], argv=["echo", "mcp"])
                assert (out["stdout"], out["exit_code"]) == ("mcp\n", 0), out
                listed = await call(session, "list_sandboxes", labels={"via": "unix-mcp"})
                assert [s["id"] for s in listed["sandboxes"]] == [sb["id"]], listed
                await call(session, "kill_sandbox", sandbox_id=sb["id"])

    anyio.run(main)
    assert d.list({"via": "unix-mcp"}) == []
