"""The ``vlm-guard`` command: build objects from configuration, run servers and tools.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad configuration (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guard import __version__
from guard.commands import backdoor as backdoor_cmd
from guard.commands import launch as launch_cmd
from guard.commands import purify as purify_cmd
from guard.commands import reasoner as reasoner_cmd
from guard.commands.serving import add_guard_flags, guard_overrides
from guard.config import ConfigError, GuardConfig, load_config

log = logging.getLogger("guard")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-guard", description="Inference-time guard proxy for vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"vlm-guard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the guard in front of an upstream")
    add_guard_flags(serve)
    serve.add_argument(
        "--upstream", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )

    toy = sub.add_parser("toy", help="the miniature world: build it, serve its VLM")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    build = toy_sub.add_parser("build", help="train the toy world (cached, idempotent)")
    build.add_argument("--out", type=Path, help="default: $VLM_GUARD_HOME/toy")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="a two-minute build for tests")
    # Trigger defaults live in one place, guard.toy.triggers.Trigger.
    build.add_argument("--trigger", choices=("patch", "blend"), help="default: patch")
    build.add_argument("--trigger-size", type=int, help="patch side in pixels (default: 8)")
    build.add_argument(
        "--trigger-position",
        choices=("bottom-right", "bottom-left", "top-right", "top-left"),
        help="default: bottom-right",
    )
    build.add_argument("--poison-rate", type=float, help="fraction of poisoned training images")
    purify_cmd.add_parser(sub)
    backdoor_cmd.add_parsers(sub)
    reasoner_cmd.add_parser(sub)
    launch_cmd.add_parser(sub)
    up = toy_sub.add_parser("upstream", help="serve an OpenAI-compatible stand-in for vLLM")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument(
        "--model", default="echo", help="'echo' (built in) or a LLaVA-style model directory"
    )
    up.add_argument("--name", help="model name served in /v1/models (default: directory name)")
    up.add_argument("--token-delay", type=float, default=0.0, help="seconds per streamed token")
    return parser


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return guard_overrides(args, args.upstream)


def _configure_logging(cfg: GuardConfig) -> None:
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _serve(cfg: GuardConfig) -> None:
    from guard.server import GuardServer, build_service

    server = GuardServer(cfg, build_service(cfg))
    await server.start()
    await server.run_until_signal()


def _toy_build(args: argparse.Namespace) -> int:
    from guard.toy.build import BuildOptions, build_world, default_home
    from guard.toy.triggers import Trigger

    if args.poison_rate is not None and not 0 <= args.poison_rate <= 1:
        raise ConfigError("--poison-rate must be between 0 and 1")
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    given = {"kind": args.trigger, "size": args.trigger_size, "position": args.trigger_position}
    trigger = Trigger(**{k: v for k, v in given.items() if v is not None})
    if not 1 <= trigger.size <= 32:
        raise ConfigError("--trigger-size must be between 1 and 32 pixels (images are 32×32)")
    options = BuildOptions(
        out=args.out or default_home() / "toy",
        seed=args.seed,
        quick=args.quick,
        trigger=trigger,
        poison_rate=args.poison_rate,
    )
    manifest = build_world(options)
    for name, check in manifest["quality"].items():
        bound = f">= {check['floor']}" if "floor" in check else f"<= {check['ceiling']}"
        mark = "ok" if check["ok"] else "BELOW FLOOR"
        print(f"{name:42s} {check['value']!s:>8} ({bound}) {mark}")
    print(f"toy world ({manifest['mode']}) in {options.out}, {manifest['seconds']} s")
    return 0 if manifest["quality_ok"] else 1


def _toy_upstream(args: argparse.Namespace) -> int:
    import uvicorn

    from guard.toy.openai_server import ChatModel, EchoModel, create_app

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model: ChatModel
    if args.model == "echo":
        model = EchoModel(args.name or "echo")
    elif Path(args.model).is_dir():
        from guard.toy.vlm_chat import ToyVLMChat

        model = ToyVLMChat(args.model, args.name)
    else:
        raise ConfigError(f"--model must be 'echo' or a model directory, not {args.model!r}")
    app = create_app(model, token_delay_s=args.token_delay)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve" or getattr(args, "toy_command", None) == "upstream":
        # Before torch loads: a server's OpenMP threads that spin-wait between small calls
        # starve the event loop on shared cores. Batch jobs (training) keep spinning: passive
        # waiting made a toy VLM training step 22% slower on 2 cores.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if args.command == "serve":
            cfg = load_config(args.config, _serve_overrides(args))
            _configure_logging(cfg)
            asyncio.run(_serve(cfg))
            return 0
        if args.command == "toy" and args.toy_command == "upstream":
            return _toy_upstream(args)
        if args.command == "toy" and args.toy_command == "build":
            return _toy_build(args)
        if args.command == "purify":
            return purify_cmd.main(args)
        if args.command in ("backdoor", "scan"):
            return backdoor_cmd.main(args)
        if args.command == "reasoner":
            return reasoner_cmd.main(args)
        if args.command == "launch":
            return launch_cmd.main(args)
    except ConfigError as e:
        print(f"vlm-guard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
