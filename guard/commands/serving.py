"""The guard's own flags, shared by ``vlm-guard serve`` and ``vlm-guard launch``: one
definition, so both commands accept and mean the same thing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from guard.config import DEFENSES, ConfigError


def add_guard_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument("--host", help="address to listen on")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--grpc-port", type=int, help="0 picks a free port; -1 disables gRPC")
    parser.add_argument(
        "--defenses", help=f"comma-separated subset of {','.join(DEFENSES)}, or 'none'"
    )
    parser.add_argument("--mode", choices=("enforce", "monitor"))


def guard_overrides(args: argparse.Namespace, upstream: str | None) -> dict[str, Any]:
    """Only the flags given on the command line override file and environment."""
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.http_port is not None:
        server["http_port"] = args.http_port
    if args.grpc_port is not None:
        server["grpc_port"] = None if args.grpc_port < 0 else args.grpc_port
    pipeline: dict[str, Any] = {}
    if args.defenses is not None:
        names = [n.strip() for n in args.defenses.split(",") if n.strip()]
        names = [] if names == ["none"] else names
        unknown = [n for n in names if n not in DEFENSES]
        if unknown:
            raise ConfigError(
                f"unknown defense(s) {','.join(unknown)}; choose from {','.join(DEFENSES)} or none"
            )
        pipeline["defenses"] = names
    if args.mode is not None:
        pipeline["mode"] = args.mode
    out: dict[str, Any] = {}
    if server:
        out["server"] = server
    if pipeline:
        out["pipeline"] = pipeline
    if upstream is not None:
        out["upstream"] = {"url": upstream}
    return out
