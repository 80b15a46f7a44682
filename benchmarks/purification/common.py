"""Constants, the data model every step shares, and small helpers (progress, chunks, stats)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from guard.defenses.diffcap import Purifier, PurifySettings, Sampler

RESULTS = Path(__file__).parent.parent / "results"  # benchmarks/results
SAMPLERS: tuple[Sampler, ...] = ("ddpm", "ddim")
FIXED_T = (0.1, 0.2, 0.3)
EPSILONS = (8, 16)  # in grey levels: eps = e/255
TARGET_SHIFT = 3  # targeted attacks aim at the digit (label + 3) % 10
MIX_ATTACKED = 0.1  # the realistic-traffic mix: 90% clean, 10% attacked
BATCH_CONCURRENCY = 16


@dataclass(frozen=True)
class Condition:
    """One input set: clean test images or one attack on them."""

    key: str  # "clean", "untargeted_8", "targeted_16", ...
    label: str  # for tables
    images: np.ndarray  # (N, 32, 32, 3) uint8
    targets: list[str] | None = None  # the attacker's answers (targeted attacks)
    seconds: float = 0.0  # what making it cost


@dataclass(frozen=True)
class Defense:
    key: str  # "none", "jpeg75", "diffpure_t0.1_ddpm", "diffcap_hf_ddim", ...
    label: str
    family: str  # none | jpeg | diffpure | diffcap
    sampler: str | None = None
    encoder: str | None = None  # diffcap: "hf" | "open_clip"
    t_fixed: float | None = None  # diffpure
    purifier: Purifier | None = None


@dataclass
class Outcome:
    """One defense applied to one condition, per image."""

    images: np.ndarray  # (N, 32, 32, 3) uint8, what the VLM is shown
    answers: list[str]
    correct: np.ndarray  # (N,) bool
    hit_target: np.ndarray | None  # (N,) bool, targeted attacks only
    unet_evals: np.ndarray  # (N,) int
    encoder_evals: np.ndarray  # (N,) int
    t_star: np.ndarray | None  # (N,) int, diffusion defenses only
    seconds: float  # purification only (not the VLM's answers)


@dataclass
class Timer:
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - start, 2)


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def diffcap_settings(args: argparse.Namespace, **more: Any) -> PurifySettings:
    """DiffCAP's settings from the command line: one place, so that the calibration probe and
    the defense rows noise and embed alike (a τ found for one signal means nothing for another)."""
    return PurifySettings(
        check_every=args.check_every,
        t_max=args.t_max,
        t_min=args.t_min,
        signal=args.signal,
        t_escalate=args.t_escalate,
        confirm_steps=args.confirm_steps,
        seed=args.seed,
        **more,
    )


def chunks(n: int, size: int) -> list[slice]:
    size = n if size <= 0 else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "p10": float(np.percentile(v, 10)),
        "p50": float(np.percentile(v, 50)),
        "p90": float(np.percentile(v, 90)),
    }
