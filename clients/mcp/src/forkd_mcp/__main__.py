"""``forkd-mcp``: the forkd MCP server on stdin/stdout.

The bearer token comes from ``--token-file`` or the ``FORKD_TOKEN``
environment variable, never from an argument (which ``ps`` would show).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import forkd
from forkd_mcp.server import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_OUTPUT_LIMIT,
    VERSION,
    ForkdTools,
    build_server,
)

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the environment's defaults."""
    parser = argparse.ArgumentParser(
        prog="forkd-mcp",
        description="MCP server (stdio) for the forkd microVM sandbox runtime.",
        epilog="Environment: FORKD_TARGET (default target), FORKD_TOKEN (bearer token).",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("FORKD_TARGET") or forkd.DEFAULT_TARGET,
        help="forkd daemon, host:port or unix:/path (default: $FORKD_TARGET or %(default)s)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file holding the daemon's bearer token (default: $FORKD_TOKEN, else no token)",
    )
    parser.add_argument(
        "--call-timeout",
        type=_seconds,
        default=DEFAULT_CALL_TIMEOUT_S,
        metavar="SECONDS",
        help="deadline for each forkd call; 0 for none (default: %(default)s)",
    )
    parser.add_argument(
        "--max-output-bytes",
        type=_positive_int,
        default=DEFAULT_OUTPUT_LIMIT,
        metavar="N",
        help="bytes of stdout, and of stderr, that exec returns (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        default="WARNING",
        help="server log level; logs go to stderr (default: %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    args = parser.parse_args(argv)
    if args.token_file is not None:
        try:
            args.token = args.token_file.read_text().strip()
        except OSError as e:
            parser.error(f"cannot read --token-file: {e}")
        if not args.token:
            parser.error(f"--token-file {args.token_file} is empty")
    else:
        args.token = os.environ.get("FORKD_TOKEN") or None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Serves MCP on stdio until the client closes stdin."""
    args = parse_args(argv)
    tools = ForkdTools(
        args.target,
        args.token,
        call_timeout=args.call_timeout or None,
        output_limit=args.max_output_bytes,
    )
    server = build_server(tools, log_level=cast(LogLevel, args.log_level))
    try:
        server.run("stdio")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
