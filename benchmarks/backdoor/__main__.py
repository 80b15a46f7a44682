"""Run the backdoor benchmark; see benchmarks/backdoor/__init__.py."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.backdoor.evaluate import evaluate
from benchmarks.backdoor.report import plot, table
from benchmarks.backdoor.sets import blend_vlm
from benchmarks.purification.common import progress_bar
from guard.toy.build import default_home
from guard.toy.triggers import Trigger

RESULTS = Path(__file__).parent.parent / "results" / "backdoor"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backdoor", description=__doc__)
    parser.add_argument("--world", type=Path, help="built toy world (default: the cached one)")
    parser.add_argument("--images", type=int, default=200, help="test (and validation) images")
    parser.add_argument("--train", type=int, default=1000, help="fine-tuning set size to audit")
    parser.add_argument("--poison-rate", type=float, help="default: the world's VLM setting")
    parser.add_argument(
        "--clean", type=int, default=500, help="trusted clean samples for the reference"
    )
    parser.add_argument("--views", type=int, default=4, help="cross-view: K masked views")
    parser.add_argument("--mask-fraction", type=float, default=0.2)
    parser.add_argument(
        "--answer-tokens", type=int, default=6, help="cross-view: answer positions compared"
    )
    parser.add_argument("--crossview-quantile", type=float, default=0.01)
    parser.add_argument("--k-sigma", type=float, default=3.0)
    parser.add_argument(
        "--combine", choices=("entropy", "crossview", "either", "both"), default="either"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    parser.add_argument("--blend", action="store_true", help="also a blended-trigger VLM")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:
        console.width = 200  # the table's eleven columns, unwrapped in a log
    world = args.world or default_home() / "toy"
    manifest_path = world / "manifest.json"
    if not manifest_path.exists():
        console.print(f"[red]no toy world at {world}: run vlm-guard toy build first[/red]")
        return 2
    manifest = json.loads(manifest_path.read_text())
    settings = manifest["components"]["vlm"]["settings"]
    if args.poison_rate is None:
        args.poison_rate = float(settings["poison_rate"])
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    with progress_bar(console) as progress, tempfile.TemporaryDirectory() as scratch:
        args.work = Path(scratch)
        trigger = Trigger(**manifest["trigger"])
        rows[trigger.kind] = evaluate(
            trigger.kind, world / "vlm", trigger, args, progress, purifier_world=world
        )
        if args.blend:
            blend = Trigger(kind="blend")
            # Trained once and cached beside the toy world, never in the results.
            model_dir = blend_vlm(default_home() / "toy-blend-vlm", progress)
            rows["blend"] = evaluate("blend", model_dir, blend, args, progress)
    table(console, rows, args)
    report = {
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "work"
        },
        "world": str(world),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "backdoor.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(args.out / "backdoor.png", rows)
    console.print(f"wrote {args.out}/backdoor.json and backdoor.png ({report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
