"""Calibration of DiffCAP's stop threshold τ on clean images, and the profile that stores it.

Rule: a clean image should be purified with little noise. Given the noise budget a clean image
may use (``target_steps``) and the share of clean images that must stop within it
(``quantile``), τ is the largest threshold that lets that share stop in time: image i stops by
``target_steps`` iff some check k ≤ target_steps has cos_k ≥ τ, i.e. iff m_i ≥ τ where m_i is
its best similarity up to ``target_steps``; so τ is the ⌈quantile·n⌉-th largest m_i.
With a noise floor k_min (``PurifySettings.t_min``) only checks at k ≥ k_min count, and the
budget is counted on top of it: target_steps ≥ k_min.
The clean t* distribution under that τ becomes the reference for the adversarial score,
z = (t* − mean) / max(std, check_every): how many clean spreads more noise an image needed.

A profile belongs to one purifier (diffusion model, encoder, noise schedule and check spacing):
loading it for another one is refused, since its τ would mean nothing there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guard.config import ConfigError

VERSION = 1


@dataclass(frozen=True)
class PurifyProfile:
    tau: float
    check_every: int
    target_steps: int
    quantile: float
    clean_mean: float  # clean t* under tau
    clean_std: float
    clean_quantiles: Mapping[str, float]  # "p50", "p90", "p99"
    images: int
    identity: Mapping[str, Any]  # the purifier it was made for (Purifier.identity without tau)
    version: int = VERSION
    k_min: int = 0  # the noise floor it was calibrated with (also in identity, as t_min)

    def score(self, steps: int) -> float:
        """How far beyond clean images this t* is, in clean standard deviations."""
        return (steps - self.clean_mean) / max(self.clean_std, float(self.check_every))

    def check_matches(self, identity: Mapping[str, Any]) -> None:
        mine, theirs = dict(self.identity), dict(identity)
        if _jsonable(mine) != _jsonable(theirs):
            differ = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
            raise ConfigError(
                "purify.profile was calibrated for a different purifier "
                f"(differs in: {', '.join(differ)}); run vlm-guard purify calibrate again"
            )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(_jsonable(asdict(self)), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> PurifyProfile:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION:
                raise ConfigError(
                    f"purify profile {path}: version {data.get('version')!r}, expected {VERSION}"
                )
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read purify profile {path}: {type(e).__name__}") from None


def stop_step(
    trace: Sequence[float], tau: float, check_every: int, k_max: int, k_min: int = 0
) -> int:
    """t* of a noise-only similarity trace (check j at step (j + 1)·check_every) under τ."""
    for j, similarity in enumerate(trace):
        step = (j + 1) * check_every
        if step > k_max:
            break
        if step >= k_min and similarity >= tau:
            return step
    return k_max


def calibrate(
    traces: Sequence[Sequence[float]],
    *,
    check_every: int,
    k_max: int,
    target_steps: int,
    quantile: float,
    identity: Mapping[str, Any],
    k_min: int = 0,
) -> PurifyProfile:
    """Pick τ from clean images' full similarity traces (noised to ``k_max``, no stop)."""
    if not traces:
        raise ValueError("calibration needs at least one image")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    # The first check allowed to stop an image, and the last one within the budget.
    first = max(1, math.ceil(k_min / check_every))
    checks = target_steps // check_every
    if not (first <= checks and target_steps <= k_max):
        low = first * check_every
        raise ValueError(f"target_steps must be in [{low}, {k_max}], got {target_steps}")
    if any(len(t) < checks for t in traces):
        raise ValueError(f"every trace needs at least {checks} checks up to target_steps")
    # m_i, largest first
    best = sorted((max(t[first - 1 : checks]) for t in traces), reverse=True)
    # The largest τ that at least ceil(quantile · n) images reach: the ceil(q·n)-th largest m_i.
    must_stop = max(1, math.ceil(quantile * len(best) - 1e-9))
    tau = float(best[must_stop - 1])
    steps = np.array(
        [stop_step(t, tau, check_every, k_max, k_min) for t in traces], dtype=np.float64
    )
    return PurifyProfile(
        tau=tau,
        check_every=check_every,
        target_steps=target_steps,
        quantile=quantile,
        clean_mean=float(steps.mean()),
        clean_std=float(steps.std()),
        clean_quantiles={f"p{q}": float(np.percentile(steps, q)) for q in (50, 90, 99)},
        images=len(traces),
        identity=dict(identity),
        k_min=k_min,
    )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
