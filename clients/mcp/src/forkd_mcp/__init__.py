"""MCP server for forkd: microVM sandboxes and snapshots as tools for a model.

Run ``forkd-mcp`` (stdio) from an MCP host, or build the server yourself::

    from forkd_mcp import ForkdTools, build_server

    build_server(ForkdTools("127.0.0.1:50051")).run("stdio")
"""

from forkd_mcp.server import VERSION, ForkdTools, build_server

__version__ = VERSION

__all__ = ["ForkdTools", "build_server", "__version__"]
