"""The toy reasoner, SFT only vs SFT + preference step, judged through the real HTTP path
(issue #6, item 4).

Takes the toy world's SRPO-style reasoner (trained by `vlm-guard toy build`: its `reasoner/sft`
and `reasoner/final` checkpoints, see guard/toy/reasoner.py), writes an SSUI-like test set from
the test glyphs (guard/toy/ssui.py), serves each checkpoint with the stand-in upstream
(`vlm-guard toy upstream --model DIR`) and scores it with `vlm-guard reasoner eval`, exactly as
a user would score any OpenAI-compatible reasoner.

    python benchmarks/reasoner.py [--world DIR] [--pairs 400]

Writes benchmarks/results/reasoner.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from guard.toy.build import BuildOptions, build_world, default_home
from guard.toy.data import load_splits
from guard.toy.processes import GUARD, free_port, running
from guard.toy.ssui import write_eval_set

RESULTS = Path(__file__).parent / "results"
EVAL_SEED = 11  # a draw of its own: the build scores its reasoner on pairs drawn with seed 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, default=default_home() / "toy")
    parser.add_argument("--pairs", type=int, default=400, help="test pairs")
    args = parser.parse_args()
    console = Console()
    world = build_world(BuildOptions(out=args.world), console)  # cached: only checks it
    trained = args.world / "reasoner"
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = write_eval_set(
            Path(scratch), load_splits()["test"], args.pairs, np.random.default_rng(EVAL_SEED)
        )
        for name in ("sft", "final"):
            rows[name] = _score(trained / name, data)
    table = Table(title=f"Toy reasoner on {args.pairs} SSUI-like test pairs (via HTTP)")
    for col in ("model", "precision", "recall", "F1", "benign FPR", "no verdict", "p50 s"):
        table.add_column(col)
    for name, r in rows.items():
        label = "SFT" if name == "sft" else "SFT + preference"
        table.add_row(
            label,
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['f1']:.3f}",
            f"{100 * r['benign_fpr']:.1f}%",
            str(r["no_verdict"]),
            f"{r['latency_s']['p50']:.2f}",
        )
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    report = {"world": str(args.world), "training": world["figures"]["reasoner"], "rows": rows}
    (RESULTS / "reasoner.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _score(checkpoint: Path, data: Path) -> dict[str, Any]:
    """``vlm-guard reasoner eval`` against the stand-in upstream serving ``checkpoint``."""
    port = free_port()
    serve = [*GUARD, "toy", "upstream", "--port", str(port), "--model", str(checkpoint)]
    with running([*serve, "--name", "judge"], f"http://127.0.0.1:{port}/v1/models"):
        done = subprocess.run(
            [*GUARD, "reasoner", "eval", "--data", str(data), "--model", "judge",
             "--url", f"http://127.0.0.1:{port}/v1"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
