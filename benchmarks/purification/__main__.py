"""``python -m benchmarks.purification``: the command line, and the run in order (what each
step measures is in its module; the package docstring says what the benchmark is for)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

import benchmarks.purification
from benchmarks.purification import summary, tables
from benchmarks.purification.adaptive import run_adaptive
from benchmarks.purification.attacks import make_attacks
from benchmarks.purification.batching import measure_batching_apart
from benchmarks.purification.calibration import calibrate_encoders
from benchmarks.purification.common import (
    FIXED_T,
    RESULTS,
    SAMPLERS,
    Condition,
    Timer,
    progress_bar,
)
from benchmarks.purification.defenses import build_defenses, evaluate_all
from benchmarks.purification.plot import plot
from benchmarks.purification.report import build_report, write_json
from guard.defenses.diffcap import Encoder, NoiseSchedule, load_diffusion, load_encoder
from guard.toy.build import default_home
from guard.toy.data import eval_images, load_splits
from guard.toy.vlm import load_vlm
from guard.toy.vlm_parts import answer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.purification",
        description=(benchmarks.purification.__doc__ or "").split("\n")[0],
    )
    parser.add_argument("--world", type=Path, help="toy world (default: $VLM_GUARD_HOME/toy)")
    parser.add_argument("--images", type=int, help="test images (default 200, --quick 16)")
    parser.add_argument("--quick", action="store_true", help="small and fast; no adaptive attack")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pgd-steps", type=int, help="default 20 (--quick 5); step = eps/4")
    parser.add_argument("--attack-batch", type=int, default=50, help="images per PGD call")
    parser.add_argument(
        "--batch", type=int, default=0, help="images per purify_batch call (0: all at once)"
    )
    parser.add_argument(
        "--calibration-images", type=int, help="clean validation images (default 200, --quick 16)"
    )
    parser.add_argument(
        "--target-steps", type=int, help="noise steps a clean image may use (default: floor + 20)"
    )
    parser.add_argument(
        "--t-min", type=float, default=0.0, help="DiffCAP's noise floor, fraction of T"
    )
    parser.add_argument(
        "--t-escalate",
        type=float,
        help="DiffCAP: depth (fraction of T) for images still moving at --t-max",
    )
    parser.add_argument(
        "--drift-quantile",
        type=float,
        help="DiffCAP (--signal denoised): calibrate the drift rule to escalate this share "
        "of clean images",
    )
    parser.add_argument(
        "--confirm-steps",
        type=int,
        default=0,
        help="DiffCAP (--signal denoised): look this many noise steps past a stop by τ, and "
        "escalate if the x0 estimate there drifted (a multiple of --check-every; 0: no look)",
    )
    parser.add_argument(
        "--confirm-quantile",
        type=float,
        help="DiffCAP with --confirm-steps: calibrate the look to escalate this share of clean "
        "images on top of the drift rule's",
    )
    parser.add_argument(
        "--signal",
        choices=("noisy", "denoised"),
        default="noisy",
        help="what DiffCAP embeds at a check: x_k, or the UNet's x0 estimate",
    )
    parser.add_argument(
        "--fixed-t",
        default=",".join(str(t) for t in FIXED_T),
        help="DiffPure rows: fixed t* (fractions of T), comma-separated",
    )
    parser.add_argument(
        "--samplers",
        default="ddpm,ddim",
        help="reverse samplers to compare, comma-separated (DDPM costs t* UNet calls per image)",
    )
    parser.add_argument(
        "--quantile", type=float, default=0.9, help="share of clean images that stop in time"
    )
    parser.add_argument(
        "--encoders",
        default="hf,open_clip",
        help="DiffCAP rows' encoders, comma-separated: hf (the VLM's tower, always needed: "
        "DiffPure and the batching run use it) and open_clip (the toy CLIP)",
    )
    parser.add_argument(
        "--hf-features",
        choices=("pooled", "patches"),
        default="pooled",
        help="what the VLM's tower embeds for DiffCAP: its pooled CLS, or the patch tokens "
        "the VLM reads",
    )
    parser.add_argument("--check-every", type=int, default=5)
    parser.add_argument("--t-max", type=float, default=0.3, help="DiffCAP's cap, fraction of T")
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--adaptive-images", type=int, default=20)
    parser.add_argument("--adaptive-steps", type=int, default=10)
    parser.add_argument("--eot-draws", type=int, default=4)
    parser.add_argument("--adaptive-ddim-steps", type=int, default=5)
    parser.add_argument(
        "--evasion-steps",
        type=int,
        default=50,
        help="PGD steps of the attack on the drift rule (with --signal denoised, --adaptive)",
    )
    parser.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        help="run the adaptive attack (default: yes, no with --quick)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.images is None:
        args.images = 16 if args.quick else 200
    if args.pgd_steps is None:
        args.pgd_steps = 5 if args.quick else 20
    if args.calibration_images is None:
        args.calibration_images = 16 if args.quick else 200
    if args.adaptive is None:
        args.adaptive = not args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.fixed_t = tuple(float(t) for t in args.fixed_t.split(",") if t.strip())
    except ValueError:
        args.fixed_t = ()
    if not args.fixed_t or not all(0 < t <= 1 for t in args.fixed_t):
        Console(stderr=True).print("[red]--fixed-t: fractions of T in (0, 1], e.g. 0.1,0.2[/red]")
        return 2
    args.samplers = tuple(s.strip() for s in args.samplers.split(",") if s.strip())
    if not args.samplers or not set(args.samplers) <= set(SAMPLERS):
        Console(stderr=True).print(f"[red]--samplers: choose from {', '.join(SAMPLERS)}[/red]")
        return 2
    args.encoders = tuple(dict.fromkeys(e.strip() for e in args.encoders.split(",") if e.strip()))
    if "hf" not in args.encoders or not set(args.encoders) <= {"hf", "open_clip"}:
        Console(stderr=True).print("[red]--encoders: hf, optionally with open_clip[/red]")
        return 2
    world: Path = args.world or default_home() / "toy"
    # Redirected output gets a wide table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 180)
    manifest_path = world / "manifest.json"
    if not manifest_path.is_file():
        build = "vlm-guard toy build" + (f" --out {world}" if args.world else "")
        Console(stderr=True).print(
            f"[red]no toy world at {world}[/red] (no manifest.json): build it first with `{build}`"
        )
        return 2
    manifest = json.loads(manifest_path.read_text())
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    timer = Timer()
    wall = time.perf_counter()

    with timer.phase("load"):
        model, processor = load_vlm(world / "vlm")
        unet, scheduler = load_diffusion(world / "diffusion")
        schedule = NoiseSchedule.from_scheduler(scheduler)
        sources = {"hf": str(world / "vlm"), "open_clip": f"local-dir:{world / 'clip'}"}
        features = {"hf": args.hf_features, "open_clip": "pooled"}
        encoders: dict[str, Encoder] = {
            e: load_encoder(e, sources[e], features=features[e]) for e in args.encoders
        }
        splits = load_splits()
        test, val = splits["test"], splits["val"]
        n = min(args.images, len(test.labels))
        images, labels = eval_images(test)[:n], test.labels[:n]
        calibration = eval_images(val)[: min(args.calibration_images, len(val.labels))]
        truth = [answer(int(label)) for label in labels]
    T = schedule.num_train_timesteps
    k_max, k_min = round(args.t_max * T), round(args.t_min * T)
    if args.target_steps is None:
        args.target_steps = min(k_min + 20, k_max)
    if not (0 <= k_min <= k_max and max(args.check_every, k_min) <= args.target_steps <= k_max):
        console.print(
            f"[red]need 0 <= --t-min <= --t-max and --target-steps in "
            f"[{max(args.check_every, k_min)}, {k_max}][/red]"
        )
        return 2
    if args.drift_quantile is not None and args.signal != "denoised":
        console.print("[red]--drift-quantile needs --signal denoised[/red]")
        return 2
    if (args.confirm_quantile is not None) != (args.confirm_steps > 0) or (
        args.confirm_steps and args.signal != "denoised"
    ):
        console.print("[red]--confirm-steps and --confirm-quantile go together, with "
                      "--signal denoised[/red]")  # fmt: skip
        return 2
    console.print(
        f"toy world {world} ({manifest.get('mode')}, seed {manifest.get('seed')}): "
        f"{n} test images, {len(calibration)} validation images for τ, T={T}, "
        f"{torch.get_num_threads()} torch threads"
    )

    with progress_bar(console) as progress:
        # 1. Attacks on the undefended VLM.
        with timer.phase("attacks"):
            conditions = [
                Condition("clean", "clean", images),
                *make_attacks(model, processor, images, labels, args, progress),
            ]
        attack_keys = [c.key for c in conditions[1:]]

        # 2. τ for each DiffCAP encoder, on clean validation images.
        with timer.phase("calibration"):
            profiles = calibrate_encoders(unet, scheduler, encoders, calibration, args, progress)

        # 3. The defenses.
        defenses = build_defenses(unet, scheduler, encoders, profiles, args)
        with timer.phase("defenses"):
            results = evaluate_all(
                defenses, conditions, truth, model, processor, args.batch, progress
            )

        # 4. Serving through the stage on the 90/10 mix (the untargeted ε = 8 images as the
        # attacked tenth): DiffCAP with the VLM tower, DDIM if it ran.
        with timer.phase("batching"):
            staged = next(d for d in reversed(defenses) if d.encoder == "hf")
            assert staged.purifier is not None
            attacked = next(c for c in conditions if c.key == "untargeted_8")
            batching = measure_batching_apart(
                world,
                args.hf_features,
                staged.purifier.settings,
                images,
                attacked.images,
                progress,
                seed=args.seed,
                threads=args.threads,
            )
            batching["defense"] = staged.label

        # 5. Adaptive attack through the purifier.
        adaptive: dict[str, Any] | None = None
        if args.adaptive:
            with timer.phase("adaptive"):
                adaptive = run_adaptive(
                    model,
                    processor,
                    unet,
                    schedule,
                    images,
                    labels,
                    truth,
                    defenses,
                    results,
                    args,
                    progress,
                )

    # 6. Tables, then the files.
    rows = {d.key: summary.defense_row(d, results[d.key], attack_keys) for d in defenses}
    tables.print_defenses(console, defenses, results, rows, attack_keys, args.pgd_steps)
    pictures = {
        d.key: summary.diffcap_picture(results[d.key], attack_keys, k_max)
        for d in defenses
        if d.family == "diffcap"
    }
    same_t_star = summary.same_t_star(results, conditions, encoders)
    tables.print_t_star(console, profiles, pictures, same_t_star, attack_keys, k_max)
    mix = summary.traffic_mix(defenses, rows, encoders)
    tables.print_mix(console, mix, rows)
    tables.print_batching(console, batching)
    if adaptive is not None:
        tables.print_adaptive(console, adaptive, args)

    timer.phases["total"] = round(time.perf_counter() - wall, 1)
    report = build_report(
        args=args,
        world=world,
        manifest=manifest,
        images=n,
        num_train_timesteps=T,
        conditions=conditions,
        profiles=profiles,
        validation_images=len(calibration),
        rows=rows,
        pictures=pictures,
        same_t_star=same_t_star,
        mix=mix,
        batching=batching,
        adaptive=adaptive,
        phases=timer.phases,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "purification.json", report)
    plot(args.out / "purification.png", defenses, results, rows, conditions, truth)
    console.print(
        f"wrote {args.out / 'purification.json'} and purification.png "
        f"({timer.phases['total']:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timer.phases.items() if k != "total")
        + ")"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
