"""The toy reasoner, SFT only vs SFT + preference step, judged through the real HTTP path
(issue #6, item 4).

Trains the toy SRPO-style reasoner (guard/toy/reasoner.py; its tower from the built toy
world's VLM), writes an SSUI-like test set from the test glyphs (guard/toy/ssui.py), serves each
checkpoint with the stand-in upstream (`vlm-guard toy upstream --model DIR`) and scores it with
`vlm-guard reasoner eval`, exactly as a user would score any OpenAI-compatible reasoner.

    python benchmarks/reasoner.py [--out DIR] [--reuse] [--pairs 200]

--reuse skips training when DIR already holds both checkpoints. Writes
benchmarks/results/reasoner.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from guard.toy.build import default_home
from guard.toy.data import load_splits
from guard.toy.processes import GUARD, free_port, running
from guard.toy.reasoner import ReasonerSettings, train_reasoner
from guard.toy.ssui import write_eval_set

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=default_home() / "toy-reasoner")
    parser.add_argument("--reuse", action="store_true", help="keep checkpoints already in --out")
    parser.add_argument("--pairs", type=int, default=200, help="test pairs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    console = Console()
    torch.set_num_threads(args.threads)
    figures: dict[str, Any] = {}
    if not (args.reuse and (args.out / "sft").exists() and (args.out / "final").exists()):
        from transformers import LlavaForConditionalGeneration

        world = default_home() / "toy" / "vlm"
        tower = LlavaForConditionalGeneration.from_pretrained(world).model.vision_tower
        with console.status("training the toy reasoner (SFT, then the preference step) …"):
            figures = train_reasoner(args.out, seed=0, settings=ReasonerSettings(), tower=tower)
    data = write_eval_set(
        args.out / "eval", load_splits()["test"], args.pairs, np.random.default_rng(5)
    )
    rows: dict[str, Any] = {}
    for name in ("sft", "final"):
        port = free_port()
        serve = [*GUARD, "toy", "upstream", "--port", str(port), "--model", str(args.out / name)]
        with running([*serve, "--name", "judge"], f"http://127.0.0.1:{port}/v1/models"):
            done = subprocess.run(
                [*GUARD, "reasoner", "eval", "--data", str(data), "--model", "judge",
                 "--url", f"http://127.0.0.1:{port}/v1"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        rows[name] = json.loads(done.stdout)
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
    report = {"out": str(args.out), "training": figures, "rows": rows}
    (RESULTS / "reasoner.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
