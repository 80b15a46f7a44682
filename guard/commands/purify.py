"""``vlm-guard purify calibrate|run``: calibrate DiffCAP's τ on clean images; purify files.

Both read the purifier from the same configuration the guard serves with (``--config`` file,
``VLM_GUARD_PURIFY__*`` variables), with flags for the model fields, so a profile is made for
exactly the purifier that will load it (the profile records that identity and the stage refuses
a profile made for another purifier).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from guard.config import ConfigError, GuardConfig, PurifyConfig, load_config

log = logging.getLogger(__name__)
SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}


def add_parser(sub: Any) -> None:
    purify = sub.add_parser("purify", help="DiffCAP purification tools")
    tools = purify.add_subparsers(dest="purify_command", required=True)
    calibrate = tools.add_parser("calibrate", help="choose tau from clean images")
    _model_flags(calibrate)
    calibrate.add_argument(
        "--data", type=Path, required=True, help="a directory of images, or a JSONL file"
    )
    calibrate.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    calibrate.add_argument(
        "--target-steps",
        type=int,
        help="noise steps a clean image may need (default: the floor t_min plus 2 checks)",
    )
    calibrate.add_argument(
        "--quantile", type=float, default=0.9, help="share of clean images that must stop in time"
    )
    calibrate.add_argument(
        "--drift-quantile",
        type=float,
        help="also calibrate the drift rule: the share of clean images it may escalate "
        "(needs signal: denoised in the config)",
    )
    calibrate.add_argument(
        "--confirm-quantile",
        type=float,
        help="also calibrate the look confirming a stop (purify.confirm_steps in the config): "
        "the share of clean images it may escalate on top of the drift rule's",
    )
    calibrate.add_argument("--limit", type=int, help="use at most this many images")
    calibrate.add_argument("--batch", type=int, default=32)
    run = tools.add_parser("run", help="purify image files")
    _model_flags(run)
    run.add_argument("images", nargs="+", type=Path)
    run.add_argument("--out", type=Path, required=True, help="directory for the purified PNGs")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="the guard's YAML config (purify section)")
    parser.add_argument("--diffusion", help="diffusers DDPM checkpoint: hub id or directory")
    parser.add_argument("--encoder", choices=("open_clip", "hf"))
    parser.add_argument("--encoder-model", help="open_clip name / local-dir:PATH, or HF id/dir")
    parser.add_argument("--encoder-pretrained", help="open_clip pretrained tag or file")
    parser.add_argument(
        "--encoder-features",
        choices=("pooled", "patches"),
        help="hf: the pooled CLS, or the patch tokens the VLM reads",
    )
    parser.add_argument("--profile", type=Path, help="calibration profile (run only)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    cfg = _purify_config(args)
    if args.purify_command == "calibrate":
        return _calibrate(args, cfg)
    return _run(args, cfg)


def _purify_config(args: argparse.Namespace) -> PurifyConfig:
    flags = {
        "diffusion": args.diffusion,
        "encoder": args.encoder,
        "encoder_model": args.encoder_model,
        "encoder_pretrained": args.encoder_pretrained,
        "encoder_features": args.encoder_features,
        "profile": args.profile,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    cfg: GuardConfig = load_config(args.config, {"purify": given} if given else None)
    return cfg.purify


def _calibrate(args: argparse.Namespace, cfg: PurifyConfig) -> int:
    from rich.progress import Progress

    from guard.defenses.diffcap import Trace
    from guard.defenses.diffcap.loading import load_purifier
    from guard.defenses.diffcap.profile import calibrate_purifier

    if args.profile is not None:
        raise ConfigError("calibrate makes a profile; --profile belongs to 'purify run'")
    if args.batch < 1:
        raise ConfigError("--batch must be at least 1")
    paths = _images(args.data)[: args.limit]
    if not paths:
        raise ConfigError(f"no images found in {args.data}")
    purifier, identity, _ = load_purifier(cfg, use_profile=False)
    target = args.target_steps or purifier.k_min + 2 * cfg.check_every
    if args.drift_quantile is not None and cfg.signal != "denoised":
        raise ConfigError("--drift-quantile needs purify.signal: denoised")
    if args.confirm_quantile is not None and not cfg.confirm_steps:
        raise ConfigError("--confirm-quantile needs purify.confirm_steps > 0 in the config")
    traces: list[Trace] = []
    with Progress(transient=True) as progress:
        task = progress.add_task("noising clean images", total=len(paths))
        for chunk in _chunks(paths, args.batch):
            traces.extend(purifier.traces([_tensor(p) for p in chunk]))
            progress.advance(task, len(chunk))
    try:
        profile = calibrate_purifier(
            purifier,
            traces,
            target_steps=target,
            quantile=args.quantile,
            identity=identity,
            drift_quantile=args.drift_quantile,
            confirm_quantile=args.confirm_quantile,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    profile.save(args.out)
    summary = {
        "profile": str(args.out),
        "images": profile.images,
        "tau": profile.tau,
        "drift_tau": profile.drift_tau,
        "confirm_tau": profile.confirm_tau,
        "clean_t_star_mean": round(profile.clean_mean, 2),
        "clean_t_star_std": round(profile.clean_std, 2),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _run(args: argparse.Namespace, cfg: PurifyConfig) -> int:
    from guard.defenses.diffcap import tensor_to_pil
    from guard.defenses.diffcap.loading import load_purifier

    purifier, _, profile = load_purifier(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        (result,) = purifier.purify_batch([_tensor(path)])
        target = args.out / f"{path.stem}.purified.png"
        tensor_to_pil(result.image).save(target)
        line: dict[str, Any] = {
            "image": str(path),
            "out": str(target),
            "t_star": result.t_star,
            "stopped": result.stopped,
            "similarity": [round(s, 6) for s in result.similarities],
            "drift": [round(d, 6) for d in result.drifts],
            "confirm_drift": result.confirm_drift,
            "unet_evals": result.unet_evals,
        }
        if profile is not None:
            line["score"] = round(profile.score(result.t_star), 3)
        sys.stdout.write(json.dumps(line) + "\n")
    return 0


def _images(data: Path) -> list[Path]:
    """Image files of a directory (sorted), or the ``image`` paths of a JSONL file."""
    if data.is_dir():
        return sorted(p for p in data.iterdir() if p.suffix.lower() in SUFFIXES)
    if not data.is_file():
        raise ConfigError(f"--data {data} is neither a directory nor a file")
    paths = []
    for number, line in enumerate(data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            paths.append(data.parent / record["image"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{data}:{number}: expected a JSON object with 'image'") from None
    return paths


def _tensor(path: Path) -> Any:
    """A file decoded under the guard's own image limits, as the purifier's input tensor."""
    from guard.config import ImagesConfig
    from guard.defenses.diffcap import pil_to_tensor
    from guard.errors import GuardError
    from guard.intake.decode import decode_image

    try:
        image = decode_image(path.read_bytes(), 0, ImagesConfig(), param=str(path)).image
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    except GuardError as e:
        raise ConfigError(f"{path}: {e}") from None
    return pil_to_tensor(image)


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
