"""``vlm-guard backdoor calibrate`` and ``vlm-guard scan``: BYE offline (DESIGN.md §4.2).

``calibrate`` measures the served model's attention entropies (and, if asked, its cross-view
divergences) on a LLaVA-style data file and writes the profile the ``backdoor`` stage loads;
with ``--clean`` it also measures trusted clean samples, against which the suspect set's low
tails are judged (see guard/defenses/bye/channels.py).
``scan`` audits a fine-tuning set: flags the samples whose attention collapses, writes the
cleaned set, a JSON report and a histogram; interrupted, it resumes from its scores file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, get_args

from guard.config import ConfigError
from guard.config.stages import Dtype

log = logging.getLogger(__name__)


def add_parsers(sub: Any) -> None:
    backdoor = sub.add_parser("backdoor", help="BYE backdoor monitor tools")
    tools = backdoor.add_subparsers(dest="backdoor_command", required=True)
    cal = tools.add_parser("calibrate", help="choose sensitive layers and thresholds")
    _common(cal)
    cal.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    cal.add_argument("--k-sigma", type=float, default=3.0, help="flag below clean mean - k·σ")
    cal.add_argument("--rule", choices=("sigma", "posterior"), default="sigma")
    cal.add_argument(
        "--combine",
        choices=("entropy", "crossview", "either", "both"),
        default="entropy",
        help="how the entropy and cross-view rules make one verdict",
    )
    cal.add_argument("--views", type=int, default=4, help="cross-view: patch-masked views K")
    cal.add_argument("--mask-fraction", type=float, default=0.2, help="cross-view: patches masked")
    cal.add_argument("--answer-tokens", type=int, default=1, help="cross-view: answer positions")
    cal.add_argument(
        "--crossview-quantile",
        type=float,
        default=0.01,
        help="cross-view: flag divergences below this quantile of clean samples",
    )
    cal.add_argument(
        "--crossview-high-quantile",
        type=float,
        help="cross-view: also flag divergences above this quantile (off by default)",
    )
    cal.add_argument("--limit", type=int, help="use at most this many samples")
    cal.add_argument(
        "--clean",
        type=Path,
        help="trusted clean samples (LLaVA-style, images relative to the file), drawn like the "
        "data; the channel whose low tail holds more of the data than of these is chosen",
    )

    scan = sub.add_parser("scan", help="audit a fine-tuning set for poisoned samples (BYE)")
    _common(scan)
    scan.add_argument("--out", type=Path, required=True, help="the cleaned set (JSON or JSONL)")
    scan.add_argument("--report", type=Path, help="report JSON (default: OUT.report.json)")
    scan.add_argument("--profile", type=Path, help="decide with this profile instead of BYE's fit")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model: hub id or local directory")
    parser.add_argument("--data", type=Path, required=True, help="LLaVA-style JSON or JSONL")
    parser.add_argument("--image-root", type=Path, help="image paths are relative to this")
    parser.add_argument("--batch", type=int, default=16, help="samples per prefill")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=get_args(Dtype),
        default="auto",
        help="load the weights in this dtype (auto: the checkpoint's); serve with the same",
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    if args.batch < 1:
        raise ConfigError("--batch must be at least 1")
    if args.command == "scan":
        return _scan(args)
    return _calibrate(args)


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from guard.defenses.bye.monitor import load_model, model_identity
    from guard.defenses.bye.probe import EntropyProbe

    try:
        model, processor = load_model(args.model, args.device, args.dtype)
    except (OSError, ValueError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"cannot load --model {args.model!r}: {line}") from None
    try:
        return EntropyProbe(model, processor), model_identity(args.model, model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _calibrate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import numpy as np
    from rich.progress import Progress

    from guard.defenses.bye.audit import open_image, sample_signals
    from guard.defenses.bye.crossview import ViewSettings
    from guard.defenses.bye.dataset import read_samples
    from guard.defenses.bye.monitor import measure
    from guard.defenses.bye.profile import calibrate

    samples = read_samples(args.data, args.image_root)[: args.limit]
    if len(samples) < 2:
        raise ConfigError(f"{args.data}: calibration needs at least two samples")
    try:
        views = (
            None
            if args.combine == "entropy"
            else ViewSettings(args.views, args.mask_fraction, args.answer_tokens)
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    clean = [] if args.clean is None else read_samples(args.clean)[: args.limit]
    if args.clean is not None and len(clean) < 2:
        raise ConfigError(f"{args.clean}: a clean reference needs at least two samples")
    probe, identity = _load(args)
    rows, divs = [], []
    reference = None
    with Progress(transient=True) as progress:
        task = progress.add_task("measuring attention entropy", total=len(samples) + len(clean))
        for i in range(0, len(samples), args.batch):
            chunk = samples[i : i + args.batch]
            images, prompts = [open_image(s) for s in chunk], [s.prompt for s in chunk]
            ent, d = measure(probe, images, prompts, views)
            rows.append(ent)
            if d is not None:
                divs.append(d)
            progress.advance(task, len(chunk))
        if clean:
            advance = lambda n: progress.advance(task, n)  # noqa: E731
            reference = sample_signals(probe, clean, batch=args.batch, advance=advance)
    try:
        profile = calibrate(
            np.concatenate(rows),
            identity=identity,
            divergences=np.concatenate(divs) if divs else None,
            crossview=None if views is None else asdict(views),
            reference=reference,
            k_sigma=args.k_sigma,
            rule=args.rule,
            crossview_quantiles=(args.crossview_quantile, args.crossview_high_quantile),
            combine=args.combine,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    profile.save(args.out)
    summary = {
        "profile": str(args.out),
        "samples": profile.samples,
        "channels": profile.channels,
        "method": profile.method,
        "threshold": round(profile.threshold, 6),
        "flagged_in_calibration": len(profile.flagged_in_calibration),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from guard.defenses.bye.audit import decide, histogram, score_all
    from guard.defenses.bye.dataset import read_samples, write_records
    from guard.defenses.bye.profile import BackdoorProfile

    samples = read_samples(args.data, args.image_root)
    if not samples:
        raise ConfigError(f"{args.data}: no samples")
    profile = BackdoorProfile.load(args.profile) if args.profile else None
    report = args.report or args.out.with_name(args.out.name + ".report.json")
    scores_file = report.with_name(report.stem + ".scores.jsonl")
    probe, identity = _load(args)
    if profile is not None:
        profile.check_matches(identity)
    with Progress() as progress:
        task = progress.add_task("scanning", total=len(samples))
        entropies = score_all(
            probe,
            samples,
            scores_file,
            identity,
            batch=args.batch,
            advance=lambda n: progress.advance(task, n),
        )
    audit = decide(samples, entropies, identity, profile)
    flagged = set(audit.flagged)
    write_records(args.out, [s.record for s in samples if s.id not in flagged])
    picture = report.with_suffix(".png")
    drew = histogram(audit, picture)
    body = {
        "data": str(args.data),
        "samples": len(samples),
        "kept": len(samples) - len(flagged),
        "method": audit.method,
        "channels": audit.channels,
        "threshold": audit.profile.threshold,
        "layer_fits": audit.profile.layer_fits,
        "flagged": [{"id": i, "score": audit.scores[i]} for i in audit.flagged],
        "scores_file": str(scores_file),
        "histogram": str(picture) if drew else None,
        "identity": identity,
    }
    report.write_text(json.dumps(body, indent=2, default=str) + "\n")
    summary = {k: body[k] for k in ("samples", "kept", "method", "channels")}
    sys.stdout.write(json.dumps({**summary, "report": str(report)}) + "\n")
    return 0
