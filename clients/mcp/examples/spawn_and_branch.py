"""Drive forkd through its MCP server, the way an MCP host does.

Starts ``forkd-mcp`` as a stdio subprocess and, through an ``mcp`` client
session: spawns a sandbox, runs a command in it, branches it live without
waiting, follows the snapshot to READY, forks a child from the snapshot,
and cleans up.

    python clients/mcp/examples/spawn_and_branch.py [TARGET]

TARGET defaults to $FORKD_TARGET, else 127.0.0.1:50051; $FORKD_TOKEN is
passed on to the server when set.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Calls a tool; exits with the tool's error text if it fails."""
    result = await session.call_tool(tool, arguments)
    if result.is_error or not isinstance(result.structured_content, dict):
        sys.exit(f"{tool} failed: {''.join(c.text for c in result.content if c.type == 'text')}")
    return result.structured_content


async def main(target: str) -> None:
    env = {"FORKD_TOKEN": os.environ["FORKD_TOKEN"]} if "FORKD_TOKEN" in os.environ else {}
    server = StdioServerParameters(command=sys.executable, args=["-m", "forkd_mcp", "--target", target], env=env)
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        tools = [t.name for t in (await session.list_tools()).tools]
        print(f"connected to {init.server_info.name} {init.server_info.version}: {len(tools)} tools")

        sb = (await call(session, "spawn_sandboxes", memory_mib=64, live_fork=True))["sandboxes"][0]
        print(f"spawned {sb['id']} ({sb['state']}, {sb['memory_mib']} MiB, booted in {sb['boot_ms']:.1f} ms)")
        out = await call(session, "exec", sandbox_id=sb["id"], argv=["echo", "hello", "from", "forkd"])
        print(f"exec echo -> {out['stdout']!r} exit {out['exit_code']}")
        await call(session, "exec", sandbox_id=sb["id"], argv=["fill", "32", "7"])
        digest = (await call(session, "exec", sandbox_id=sb["id"], argv=["checksum"]))["stdout"].strip()

        branch = await call(session, "branch_sandbox", sandbox_id=sb["id"], mode="live", wait=False)
        snap = branch["snapshot"]
        print(f"branched {snap['tag']}: {snap['mode']} {snap['status']}, guest paused {branch['pause_ms']:.2f} ms")
        watched = await call(session, "watch_snapshot", tag=snap["tag"])
        last = watched["updates"][-1]
        print(f"watched it to {watched['status']} ({last['bytes_copied'] >> 20} MiB copied)")

        child = (await call(session, "spawn_sandboxes", tag=snap["tag"]))["sandboxes"][0]
        child_digest = (await call(session, "exec", sandbox_id=child["id"], argv=["checksum"]))["stdout"].strip()
        same = "same" if child_digest == digest else "DIFFERENT"
        print(f"forked {child['id']} from it: checksum {child_digest} ({same} as the parent)")

        for sandbox_id in (child["id"], sb["id"]):
            await call(session, "kill_sandbox", sandbox_id=sandbox_id)
        deleted = await call(session, "delete_snapshot", tag=snap["tag"])
        print(f"cleaned up: killed 2 sandboxes, deleted {deleted['deleted_tags']}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FORKD_TARGET", "127.0.0.1:50051"))
