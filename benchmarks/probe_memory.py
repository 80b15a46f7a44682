"""Memory and time of the backdoor monitor's probe as prompts grow: eager attention's full maps
against the row attention (guard/defenses/bye/attention.py), beside an SDPA prefill (issue #5).

The toy world's prompts are ~85 tokens, too short to show what eager attention's
(B, heads, T, T) maps cost. Here a random LLaVA built in code (seeded; a 4-layer language
model of width 512 with 8 heads, a one-layer vision tower) reads images of 64 to 2,304 patch
tokens (LLaVA-1.5 has 576, LLaVA-NeXT up to 2,880). Each measurement runs in a fresh process:
its peak resident memory over the loaded model (ru_maxrss) during the first pass, then the
median time of the next passes. The probe watches every layer, as calibration does.

    python -m benchmarks.probe_memory [--tokens 64 256 576 1024 2304] [--batch 4] [--threads 2]

Prints a table, writes benchmarks/results/probe_memory.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
MODES = ("sdpa prefill", "probe, eager", "probe, row attention")
PATCH, TEXT = 4, 24  # pixels per patch token; prompt tokens after the image


def _save_model(path: Path, tokens: int) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    side = PATCH * math.isqrt(tokens)
    vision = CLIPVisionConfig(
        image_size=side,
        patch_size=PATCH,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=1,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=tokens,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)


def _measure(path: Path, mode: str, tokens: int, batch: int, repeats: int) -> dict[str, float]:
    """In this (fresh) process: peak memory of the first pass over the loaded model, then time."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from guard.defenses.bye import attention
    from guard.defenses.bye.probe import EntropyProbe, Prefill

    implementation = {"sdpa prefill": "sdpa", "probe, eager": "eager"}.get(
        mode, attention.implementation()
    )
    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=implementation
    ).eval()
    side = PATCH * math.isqrt(tokens)
    ids = torch.full((batch, tokens + TEXT), 5)
    ids[:, 1 : tokens + 1] = 1  # the image's tokens after one leading token
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(
            batch, 3, side, side, generator=torch.Generator().manual_seed(0)
        ),
    }
    if mode == "sdpa prefill":

        def run() -> None:
            with torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1)

    else:
        probe = EntropyProbe(model, None)  # no processor: the batch is built here
        prefill = Prefill(inputs, ids == 1)

        def run() -> None:
            probe.signals(prefill)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return {"peak_mib": peak / 1024, "seconds": float(np.median(seconds))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe_memory", description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 576, 1024, 2304])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one JSON job
    args = parser.parse_args(argv)
    if args.one:
        import torch

        job = json.loads(args.one)
        torch.set_num_threads(job["threads"])
        result = _measure(
            Path(job["path"]), job["mode"], job["tokens"], job["batch"], job["repeats"]
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    bad = [t for t in args.tokens if math.isqrt(t) ** 2 != t]
    if bad:
        parser.error(f"--tokens must be squares (a square grid of patches), got {bad}")
    console = Console()
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, Progress(console=console) as progress:
        task = progress.add_task("measuring", total=len(args.tokens) * len(MODES))
        for tokens in args.tokens:
            path = Path(scratch) / str(tokens)
            _save_model(path, tokens)
            for mode in MODES:
                job = {"path": str(path), "mode": mode, "tokens": tokens, "batch": args.batch}
                job |= {"repeats": args.repeats, "threads": args.threads}
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.probe_memory", "--one", json.dumps(job)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append({"tokens": tokens, "mode": mode, **json.loads(done.stdout)})
                progress.advance(task)
    table = Table(title=f"probe memory and time, batch {args.batch}, {args.threads} threads")
    for column in ("image tokens", "mode", "peak MiB over the model", "ms per batch", "× prefill"):
        table.add_column(column, justify="right")
    prefill = {r["tokens"]: r["seconds"] for r in rows if r["mode"] == MODES[0]}
    for r in rows:
        ratio = r["seconds"] / prefill[r["tokens"]]
        table.add_row(
            str(r["tokens"]),
            r["mode"],
            f"{r['peak_mib']:.0f}",
            f"{1e3 * r['seconds']:.0f}",
            f"{ratio:.2f}",
        )
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "probe_memory.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(args.out / "probe_memory.png", rows, args.batch)
    console.print(
        f"wrote {args.out}/probe_memory.json and probe_memory.png ({report['wall_seconds']} s)"
    )
    return 0


def _plot(path: Path, rows: list[dict[str, Any]], batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        tokens = [r["tokens"] for r in mine]
        mem.plot(tokens, [r["peak_mib"] for r in mine], marker="o", label=mode)
        sec.plot(tokens, [1e3 * r["seconds"] for r in mine], marker="o", label=mode)
    mem.set(xlabel="image tokens", ylabel="peak MiB over the loaded model", title="memory")
    sec.set(xlabel="image tokens", ylabel=f"ms per batch of {batch}", title="time")
    mem.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
