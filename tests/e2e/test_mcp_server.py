"""The MCP server (`clients/mcp`, package `forkd_mcp`) over stdio against a
real daemon: the server runs as a subprocess (`python -m forkd_mcp`), driven
by the `mcp` client session (`stdio_client` + `ClientSession`). Every result
is checked against the daemon itself through the Python client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult

import forkd

REPO = Path(__file__).resolve().parents[2]
# The sources under test, whether or not the packages are installed.
PYTHONPATH = os.pathsep.join(str(REPO / "clients" / p / "src") for p in ("mcp", "python"))

MEM = 64  # MiB per sandbox
TOOLS = {
    "spawn_sandboxes",
    "branch_sandbox",
    "get_snapshot",
    "watch_snapshot",
    "list_snapshots",
    "delete_snapshot",
    "list_sandboxes",
    "exec",
    "kill_sandbox",
    "read_console",
    "set_sandbox_ttl",
    "write_file",
    "read_file",
    "list_dir",
    "stat_file",
    "remove_file",
}
SCENARIO_TIMEOUT_S = 180  # a hang fails the test instead of the whole suite


def server_params(target: str, *args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "forkd_mcp", "--target", target, *args],
        env={"PYTHONPATH": PYTHONPATH, **(env or {})},
    )


@asynccontextmanager
async def mcp_session(params: StdioServerParameters) -> AsyncIterator[ClientSession]:
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=120) as session:
            init = await session.initialize()
            assert init.server_info.name == "forkd"
            yield session


def run(params: StdioServerParameters, scenario: Callable[[ClientSession], Awaitable[None]]) -> None:
    """Runs ``scenario`` against a fresh server, failing after a deadline."""

    async def main() -> None:
        with anyio.fail_after(SCENARIO_TIMEOUT_S):
            async with mcp_session(params) as session:
                await scenario(session)

    anyio.run(main)


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Calls a tool that must succeed; returns its structured result."""
    res = await session.call_tool(tool, arguments)
    assert not res.is_error, f"{tool}({arguments}) failed: {text_of(res)}"
    assert isinstance(res.structured_content, dict), res
    # The text content is the same result, for clients that only read text.
    assert json.loads(text_of(res)) == res.structured_content
    return res.structured_content


async def call_error(session: ClientSession, tool: str, **arguments: Any) -> str:
    """Calls a tool that must fail; returns the error text."""
    res = await session.call_tool(tool, arguments)
    assert res.is_error, f"{tool}({arguments}) should have failed: {res}"
    return text_of(res)


def text_of(res: CallToolResult) -> str:
    return "".join(c.text for c in res.content if c.type == "text")


@pytest.fixture
def ctl(daemon) -> Iterator[forkd.Controller]:
    with forkd.Controller(daemon.listen, timeout=60) as c:
        yield c


# ---- the tool list ------------------------------------------------------------


def test_lists_the_tools_with_argument_docs(daemon) -> None:
    async def scenario(session: ClientSession) -> None:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert TOOLS <= set(listed), f"missing tools: {TOOLS - set(listed)}"
        docs = {name: listed[name].description or "" for name in TOOLS}
        for name in TOOLS:
            assert len(docs[name]) > 80, (name, docs[name])
            assert listed[name].output_schema is not None, name
            # The docstring says when each argument applies: every argument is named in it.
            for arg in listed[name].input_schema.get("properties", {}):
                assert f"{arg}:" in docs[name], f"{name}: argument {arg} is not documented"
        branch = listed["branch_sandbox"].input_schema["properties"]
        assert branch["mode"]["enum"] == ["full", "diff", "live"]
        assert "live mode only" in docs["branch_sandbox"]
        assert "cold boots only" in docs["spawn_sandboxes"]
        assert listed["get_snapshot"].annotations and listed["get_snapshot"].annotations.read_only_hint
        assert listed["kill_sandbox"].annotations and listed["kill_sandbox"].annotations.destructive_hint

    run(server_params(daemon.listen), scenario)


# ---- the whole flow -------------------------------------------------------------


def test_spawn_exec_branch_watch_and_clean_up(daemon, ctl: forkd.Controller) -> None:
    async def scenario(session: ClientSession) -> None:
        # spawn_sandboxes: a cold boot, live_fork, labels.
        spawned = await call(session, "spawn_sandboxes", live_fork=True, memory_mib=MEM, labels={"suite": "mcp"})
        assert spawned["failures"] == [] and len(spawned["sandboxes"]) == 1
        sb = spawned["sandboxes"][0]
        real = ctl.get_sandbox(sb["id"])
        assert (real.live_fork, real.memory_mib, dict(real.labels)) == (True, MEM, {"suite": "mcp"})
        assert sb["state"] == "RUNNING" == forkd.SandboxState.Name(real.state).removeprefix("SANDBOX_STATE_")
        assert (sb["live_fork"], sb["memory_mib"], sb["labels"]) == (True, MEM, {"suite": "mcp"})
        assert sb["vmm_pid"] == real.vmm_pid > 0 and sb["snapshot_tag"] == ""

        # exec: text output, and a non-zero exit is a result, not an error.
        out = await call(session, "exec", sandbox_id=sb["id"], argv=["echo", "hello", "mcp"])
        assert out["stdout"] == "hello mcp\n" and out["stderr"] == "" and out["exit_code"] == 0
        assert out["truncated"] is False
        assert (await call(session, "exec", sandbox_id=sb["id"], argv=["exit", "3"]))["exit_code"] == 3
        assert (await call(session, "exec", sandbox_id=sb["id"], argv=["fill", "16", "42"]))["exit_code"] == 0
        digest = (await call(session, "exec", sandbox_id=sb["id"], argv=["checksum"]))["stdout"].strip()
        assert digest == ctl.exec(sb["id"], ["checksum"]).text.strip() and digest

        # branch_sandbox live, wait=false: back at once, still WRITING ...
        live = await call(session, "branch_sandbox", sandbox_id=sb["id"], mode="live", wait=False)
        live_tag = live["snapshot"]["tag"]
        assert live["snapshot"]["status"] == "WRITING" and live["snapshot"]["mode"] == "LIVE"
        assert live["snapshot"]["source_sandbox_id"] == sb["id"]
        # ... then watch_snapshot follows it to READY.
        watched = await call(session, "watch_snapshot", tag=live_tag, timeout_s=60)
        assert watched["tag"] == live_tag
        assert (watched["status"], watched["done"], watched["failure_reason"]) == ("READY", True, "")
        assert watched["updates_seen"] == len(watched["updates"]) >= 1
        final = watched["updates"][-1]
        assert final["status"] == "READY" and final["bytes_copied"] == final["bytes_total"] > 0
        assert ctl.get_snapshot(live_tag).status == forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_READY")
        # Watching a finished snapshot returns at once.
        again = await call(session, "watch_snapshot", tag=live_tag)
        assert (again["status"], again["done"], again["updates_seen"]) == ("READY", True, 1)

        # branch_sandbox full (waits): READY at once.
        full = await call(session, "branch_sandbox", sandbox_id=sb["id"], tag="mcp-full", mode="full")
        snap = full["snapshot"]
        assert (snap["tag"], snap["status"], snap["mode"]) == ("mcp-full", "READY", "FULL")
        assert full["bytes_written"] > 0 and full["pause_ms"] > 0
        real_snap = ctl.get_snapshot("mcp-full")
        assert snap["memory_bytes"] == real_snap.memory_bytes and snap["chain"] == ["mcp-full"]

        # Fork a child from it: same memory, so the same checksum.
        child = (await call(session, "spawn_sandboxes", tag="mcp-full"))["sandboxes"][0]
        assert child["snapshot_tag"] == "mcp-full" and child["memory_mib"] == MEM
        child_sum = (await call(session, "exec", sandbox_id=child["id"], argv=["checksum"]))["stdout"].strip()
        assert child_sum == digest

        # get_snapshot / list_snapshots / list_sandboxes agree with the daemon.
        got = await call(session, "get_snapshot", tag="mcp-full")
        assert got["children"] == [child["id"]] == list(ctl.get_snapshot("mcp-full").children)
        ready = await call(session, "list_snapshots", status="READY")
        assert [s["tag"] for s in ready["snapshots"]] == [s.tag for s in ctl.list_snapshots("ready")]
        assert {live_tag, "mcp-full"} <= {s["tag"] for s in ready["snapshots"]}
        assert (await call(session, "list_snapshots", status="WRITING"))["snapshots"] == []
        labelled = await call(session, "list_sandboxes", labels={"suite": "mcp"})
        assert [s["id"] for s in labelled["sandboxes"]] == [sb["id"]]
        everyone = await call(session, "list_sandboxes")
        assert [s["id"] for s in everyone["sandboxes"]] == [s.id for s in ctl.list_sandboxes()]
        assert {sb["id"], child["id"]} <= {s["id"] for s in everyone["sandboxes"]}

        # delete_snapshot is refused while a child runs from it.
        refused = await call_error(session, "delete_snapshot", tag="mcp-full")
        assert "FAILED_PRECONDITION" in refused and child["id"] in refused

        # kill_sandbox, then the delete goes through.
        killed = await call(session, "kill_sandbox", sandbox_id=child["id"])
        assert killed["sandbox"]["id"] == child["id"]
        assert child["id"] not in {s.id for s in ctl.list_sandboxes()}
        deleted = await call(session, "delete_snapshot", tag="mcp-full")
        assert deleted["deleted_tags"] == ["mcp-full"]
        with pytest.raises(forkd.NotFoundError):
            ctl.get_snapshot("mcp-full")
        assert (await call(session, "delete_snapshot", tag=live_tag))["deleted_tags"] == [live_tag]

        killed = await call(session, "kill_sandbox", sandbox_id=sb["id"])
        assert killed["sandbox"]["id"] == sb["id"] and killed["sandbox"]["labels"] == {"suite": "mcp"}
        assert ctl.list_sandboxes() == []
        assert ctl.list_snapshots() == []

    run(server_params(daemon.listen), scenario)


def test_watch_snapshot_timeout_then_progress(daemon_factory) -> None:
    # A slow live copy (32 MiB at 40 MiB/s) keeps the snapshot WRITING for ~0.8 s.
    d = daemon_factory(extra_args=["--live-copy-rate-mibps", "40"])

    async def scenario(session: ClientSession) -> None:
        sb = (await call(session, "spawn_sandboxes", memory_mib=MEM))["sandboxes"][0]
        assert (await call(session, "exec", sandbox_id=sb["id"], argv=["fill", "32", "9"]))["exit_code"] == 0
        live = await call(session, "branch_sandbox", sandbox_id=sb["id"], mode="live", wait=False)
        tag = live["snapshot"]["tag"]
        # The watch gives up before the copy ends: not done, still WRITING.
        early = await call(session, "watch_snapshot", tag=tag, timeout_s=0.2)
        assert (early["status"], early["done"]) == ("WRITING", False)
        assert early["updates_seen"] >= 1 and all(u["status"] == "WRITING" for u in early["updates"])

        # Watching again follows it to READY, with MCP progress notifications.
        reported: list[tuple[float, float | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            reported.append((progress, total))

        res = await session.call_tool("watch_snapshot", {"tag": tag}, progress_callback=on_progress)
        assert not res.is_error, text_of(res)
        watched = res.structured_content
        assert watched is not None and (watched["status"], watched["done"]) == ("READY", True)
        total = watched["updates"][-1]["bytes_total"]
        assert total == watched["updates"][-1]["bytes_copied"] >= 32 << 20
        # Progress came while it copied, ending at the total.
        assert len(reported) >= 2 and reported[-1] == (total, total)
        assert all(t == total and 0 <= done <= total for done, t in reported)
        assert [done for done, _ in reported] == sorted(done for done, _ in reported)
        with forkd.Controller(d.listen, timeout=60) as ctl:
            assert ctl.get_snapshot(tag).status == forkd.SnapshotStatus.Value("SNAPSHOT_STATUS_READY")

        await call(session, "kill_sandbox", sandbox_id=sb["id"])
        assert (await call(session, "delete_snapshot", tag=tag))["deleted_tags"] == [tag]

    run(server_params(d.listen), scenario)


# ---- errors ---------------------------------------------------------------------


def test_forkd_errors_are_tool_errors_with_the_code(daemon, ctl: forkd.Controller) -> None:
    async def scenario(session: ClientSession) -> None:
        missing = "sb-doesnotexist"
        calls: list[tuple[str, dict[str, Any]]] = [
            ("kill_sandbox", {"sandbox_id": missing}),
            ("exec", {"sandbox_id": missing, "argv": ["echo", "x"]}),
            ("branch_sandbox", {"sandbox_id": missing}),
        ]
        for tool, args in calls:
            text = await call_error(session, tool, **args)
            assert "NOT_FOUND" in text and missing in text, (tool, text)
        text = await call_error(session, "get_snapshot", tag="no-such-snapshot")
        assert "NOT_FOUND" in text and "no-such-snapshot" in text
        text = await call_error(session, "watch_snapshot", tag="no-such-snapshot")
        assert "NOT_FOUND" in text

        sb = (await call(session, "spawn_sandboxes", memory_mib=MEM))["sandboxes"][0]
        # wait=false is for live branches only: the daemon says so.
        text = await call_error(session, "branch_sandbox", sandbox_id=sb["id"], mode="full", wait=False)
        assert "INVALID_ARGUMENT" in text and "LIVE" in text
        text = await call_error(session, "exec", sandbox_id=sb["id"], argv=[])
        assert "INVALID_ARGUMENT" in text
        # An exec timeout stops the command; the sandbox stays usable.
        text = await call_error(session, "exec", sandbox_id=sb["id"], argv=["sleep", "5000"], timeout_s=0.3)
        assert "DEADLINE_EXCEEDED" in text
        assert (await call(session, "exec", sandbox_id=sb["id"], argv=["echo", "still", "here"]))["stdout"] == (
            "still here\n"
        )
        # Arguments that do not fit the schema never reach the daemon.
        text = await call_error(session, "branch_sandbox", sandbox_id=sb["id"], mode="sideways")
        assert "mode" in text
        assert len(ctl.list_snapshots()) == 0
        await call(session, "kill_sandbox", sandbox_id=sb["id"])

    run(server_params(daemon.listen), scenario)


def test_exec_output_is_capped(daemon) -> None:
    async def scenario(session: ClientSession) -> None:
        sb = (await call(session, "spawn_sandboxes", memory_mib=MEM))["sandboxes"][0]
        small = await call(session, "exec", sandbox_id=sb["id"], argv=["emit", "1000"])
        assert len(small["stdout"]) == 1000 and small["truncated"] is False
        big = await call(session, "exec", sandbox_id=sb["id"], argv=["emit", str(8 << 20)])
        assert big["exit_code"] == 0 and big["truncated"] is True
        assert len(big["stdout"]) == 4096 and big["stdout"][:1000] == small["stdout"]
        await call(session, "kill_sandbox", sandbox_id=sb["id"])

    run(server_params(daemon.listen, "--max-output-bytes", "4096"), scenario)


def test_ttl_on_spawn_and_set_sandbox_ttl(daemon_factory) -> None:
    d = daemon_factory(extra_args=["--max-ttl", "600"])

    async def scenario(session: ClientSession) -> None:
        sb = (await call(session, "spawn_sandboxes", memory_mib=MEM, ttl_seconds=600))["sandboxes"][0]
        assert sb["expire_time"], sb
        kept = (await call(session, "spawn_sandboxes", memory_mib=MEM))["sandboxes"][0]
        assert kept["expire_time"] is None, kept
        over = await call_error(session, "set_sandbox_ttl", sandbox_id=sb["id"], ttl_seconds=601)
        assert "INVALID_ARGUMENT" in over and "--max-ttl 600" in over, over
        short = await call(session, "set_sandbox_ttl", sandbox_id=sb["id"], ttl_seconds=1)
        assert short["sandbox"]["expire_time"] < sb["expire_time"], (short, sb)

        async def listed() -> set[str]:
            return {s["id"] for s in (await call(session, "list_sandboxes"))["sandboxes"]}

        with anyio.fail_after(60):
            while sb["id"] in await listed():
                await anyio.sleep(0.2)
        assert kept["id"] in await listed()
        missing = await call_error(session, "set_sandbox_ttl", sandbox_id=sb["id"], ttl_seconds=5)
        assert "NOT_FOUND" in missing, missing
        await call(session, "kill_sandbox", sandbox_id=kept["id"])

    run(server_params(d.listen), scenario)


def test_unreachable_daemon_is_unavailable() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"

    async def scenario(session: ClientSession) -> None:
        text = await call_error(session, "list_sandboxes")
        assert "UNAVAILABLE" in text and target in text

    run(server_params(target), scenario)


def test_bearer_token_from_env_or_file(daemon_factory) -> None:
    d = daemon_factory(token="mcp-secret")
    token_file = d.workdir / "token"  # "mcp-secret\n", written for the daemon
    assert token_file.read_text().strip() == "mcp-secret"

    async def authorized(session: ClientSession) -> None:
        assert (await call(session, "list_sandboxes"))["sandboxes"] == []

    async def refused(session: ClientSession) -> None:
        text = await call_error(session, "list_snapshots")
        assert "UNAUTHENTICATED" in text and "FORKD_TOKEN" in text

    run(server_params(d.listen, env={"FORKD_TOKEN": "mcp-secret"}), authorized)
    run(server_params(d.listen, "--token-file", str(token_file)), authorized)
    run(server_params(d.listen), refused)
    run(server_params(d.listen, env={"FORKD_TOKEN": "wrong"}), refused)


def test_server_exits_when_stdin_closes(daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "forkd_mcp", "--target", daemon.listen],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )
    try:
        out, err = proc.communicate(input=b"", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out == b"" and b"Traceback" not in err
