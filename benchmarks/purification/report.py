"""purification.json: everything the tables show, plus the run's settings and environment."""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.purification.common import MIX_ATTACKED, TARGET_SHIFT, Condition
from guard.defenses.diffcap.profile import PurifyProfile


def build_report(
    *,
    args: argparse.Namespace,
    world: Path,
    manifest: dict[str, Any],
    images: int,
    num_train_timesteps: int,
    conditions: list[Condition],
    profiles: dict[str, PurifyProfile],
    validation_images: int,
    rows: dict[str, dict[str, Any]],
    pictures: dict[str, dict[str, Any]],
    same_t_star: dict[str, bool],
    mix: dict[str, Any],
    batching: dict[str, Any],
    adaptive: dict[str, Any] | None,
    phases: dict[str, float],
) -> dict[str, Any]:
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "world": str(world),
        "manifest": {
            k: manifest.get(k)
            for k in ("mode", "seed", "seconds", "versions", "figures", "quality_ok")
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "images": images,
        "num_train_timesteps": num_train_timesteps,
        "attacks": {
            c.key: {
                "eps": f"{c.key.split('_')[1]}/255",
                "steps": args.pgd_steps,
                "step": "eps/4",
                "targeted": c.targets is not None,
                "target": f"(label + {TARGET_SHIFT}) % 10" if c.targets else None,
                "seconds": round(c.seconds, 1),
            }
            for c in conditions[1:]
        },
        "calibration": {
            name: {**asdict(p), "validation_images": validation_images}
            for name, p in profiles.items()
        },
        "defenses": rows,
        "diffcap_t_star": pictures,
        "diffcap_t_star_same_across_samplers": same_t_star,
        "mix": {"attacked_fraction": MIX_ATTACKED, **mix},
        "batching": batching,
        "adaptive": adaptive,
        "wall_seconds": phases,
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=_default))


def _default(value: Any) -> Any:
    """numpy scalars as Python numbers; anything else json cannot encode, as its str()."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
