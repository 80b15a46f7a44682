"""``vlm-guard reasoner eval``: score a safety reasoner on labelled (image, text) pairs.

Reads JSONL records ``{"image", "text", "label": "safe"|"unsafe", "category"}`` (image paths
relative to the file), asks the reasoner configured in the guard's config (or by flags) through
the same stage the guard runs — any OpenAI-compatible server — and reports precision, recall,
F1 and the benign false-positive rate for "unsafe", category accuracy on caught pairs, the
calls that gave no verdict (the guard would apply its fail mode to them) and latency
percentiles. Prints one JSON line; ``--out`` writes the full report with every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from guard.config import ConfigError, GuardConfig, load_config


def add_parser(sub: Any) -> None:
    reasoner = sub.add_parser("reasoner", help="safety reasoner tools")
    tools = reasoner.add_subparsers(dest="reasoner_command", required=True)
    ev = tools.add_parser("eval", help="precision, recall, F1 and latency on labelled pairs")
    ev.add_argument("--data", type=Path, required=True, help="JSONL: image, text, label, category")
    ev.add_argument("--config", type=Path, help="the guard's YAML config (reasoner section)")
    ev.add_argument("--url", help="the reasoner's base URL (…/v1)")
    ev.add_argument("--model", help="the reasoner's model name")
    ev.add_argument("--protocol", choices=("reasoning-json", "llama-guard"))
    ev.add_argument("--policy", type=Path, help="policy YAML")
    ev.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ev.add_argument("--limit", type=int, help="use at most this many records")
    ev.add_argument("--out", type=Path, help="full report JSON (every answer)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level="ERROR", format="%(levelname)s %(name)s: %(message)s")
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    flags = {"url": args.url, "model": args.model, "protocol": args.protocol, "policy": args.policy}
    given = {k: v for k, v in flags.items() if v is not None}
    # Every record is judged afresh: the verdict cache would hide repeated pairs' latency.
    cfg: GuardConfig = load_config(args.config, {"reasoner": {**given, "cache_bytes": 0}})
    records = _records(args.data)[: args.limit]
    if not records:
        raise ConfigError(f"{args.data}: no records")
    report = asyncio.run(_evaluate(cfg, records, args.data.parent, args.concurrency))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    sys.stdout.write(json.dumps(report["summary"]) + "\n")
    return 0


async def _evaluate(
    cfg: GuardConfig, records: list[dict[str, Any]], root: Path, concurrency: int
) -> dict[str, Any]:
    from rich.progress import Progress

    from guard.defenses.reasoner import ReasonerStage

    stage = ReasonerStage(cfg.reasoner)
    limit = asyncio.Semaphore(concurrency)
    rows: list[dict[str, Any]] = []
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("asking the reasoner", total=len(records))

            async def one(i: int, record: dict[str, Any]) -> None:
                async with limit:
                    rows.append(await _judge(stage, i, record, root, cfg.reasoner.timeout_s))
                progress.advance(task)

            await asyncio.gather(*(one(i, r) for i, r in enumerate(records)))
    finally:
        await stage.aclose()
    rows.sort(key=lambda r: r["index"])
    return {"summary": summarize(rows), "answers": rows}


async def _judge(
    stage: Any, i: int, record: dict[str, Any], root: Path, timeout_s: float
) -> dict[str, Any]:
    from guard.types import GuardRequest

    request = GuardRequest(f"eval-{i}", str(record["text"]), (_image(root / record["image"]),), {})
    start = time.perf_counter()
    row: dict[str, Any] = {"index": i, "label": record["label"], "category": record.get("category")}
    try:
        async with asyncio.timeout(timeout_s):
            decision = await stage.check(request)
    except Exception as e:  # the guard's fail mode would decide; here it is counted
        row.update(judged=None, error=type(e).__name__)
    else:
        row.update(judged="unsafe" if decision.action == "block" else "safe")
        row.update(judged_category=decision.category, reasoning=decision.details.get("reasoning"))
    row["seconds"] = round(time.perf_counter() - start, 4)
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Detection figures for 'unsafe' over the rows that got a verdict."""
    import numpy as np

    judged = [r for r in rows if r["judged"] is not None]
    tp = sum(r["label"] == "unsafe" and r["judged"] == "unsafe" for r in judged)
    fp = sum(r["label"] == "safe" and r["judged"] == "unsafe" for r in judged)
    fn = sum(r["label"] == "unsafe" and r["judged"] == "safe" for r in judged)
    benign = sum(r["label"] == "safe" for r in judged)
    caught = [r for r in judged if r["label"] == r["judged"] == "unsafe" and r["category"]]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    seconds = np.array([r["seconds"] for r in judged]) if judged else np.zeros(1)
    return {
        "records": len(rows),
        "no_verdict": len(rows) - len(judged),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "benign_fpr": round(fp / benign, 4) if benign else 0.0,
        "category_accuracy": round(
            sum(r["judged_category"] == r["category"] for r in caught) / len(caught), 4
        )
        if caught
        else None,
        "latency_s": {f"p{q}": round(float(np.percentile(seconds, q)), 4) for q in (50, 90, 99)},
    }


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{n}: not a JSON object") from None
        ok = isinstance(record, dict) and {"image", "text", "label"} <= record.keys()
        if not ok or record["label"] not in ("safe", "unsafe"):
            raise ConfigError(f"{path}:{n}: needs image, text and label 'safe' or 'unsafe'")
        records.append(record)
    return records


def _image(path: Path) -> Any:
    from PIL import Image

    from guard.intake.decode import image_digest
    from guard.types import ImageInput

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError:
        raise ConfigError(f"cannot read image {path}") from None
    return ImageInput(0, rgb, image_digest(rgb))
