"""Calibration of DiffCAP's stop threshold τ on clean images, and the profile that stores it.

Rule: a clean image should be purified with little noise. Given the noise budget a clean image
may use (``target_steps``) and the share of clean images that must stop within it
(``quantile``), τ is the largest threshold that lets that share stop in time: image i stops by
``target_steps`` iff some check k ≤ target_steps has cos_k ≥ τ, i.e. iff m_i ≥ τ where m_i is
its best similarity up to ``target_steps``; so τ is the ⌈quantile·n⌉-th largest m_i.
With a noise floor k_min (``PurifySettings.t_min``) only checks at k ≥ k_min count, and the
budget is counted on top of it: target_steps ≥ k_min.
Optionally the drift rule's threshold too (signal="denoised"): following each clean image's
checks up to where τ stops it, m_i is its lowest cos(φ(x̂_0(x_k)), φ(x)); drift_tau is the
⌊drift_quantile·n⌋-th smallest m_i (0-based), so at most that share of clean images escalates.
Optionally the threshold of the look that confirms a stop (``confirm_steps``): each clean image
that τ stops at check j (and the drift rule lets through) has the drift at check
j + confirm_steps/check_every, read from its trace, which runs on past k_max for this; the rest
count as +∞. confirm_tau is the ⌊confirm_quantile·n⌋-th smallest (0-based): at most that share
of clean images escalates on top of the drift rule's.
The clean t* distribution under these thresholds becomes the reference for the adversarial score,
z = (t* − mean) / max(std, check_every): how many clean spreads more noise an image needed.

A profile belongs to one purifier (diffusion model, encoder, noise schedule and check spacing):
loading it for another one is refused, since its τ would mean nothing there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guard.config import ConfigError
from guard.defenses import profiles
from guard.defenses.diffcap.purifier import Purifier, Trace

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
    drift_tau: float | None = None  # the drift rule's threshold; None: the rule is off
    drift_quantile: float | None = None  # the share of clean images it may escalate
    confirm_steps: int = 0  # how far the look confirming a stop goes (0: no look calibrated)
    confirm_tau: float | None = None
    confirm_quantile: float | None = None  # the share of clean images the look may escalate

    def score(self, steps: int) -> float:
        """How far beyond clean images this t* is, in clean standard deviations."""
        return (steps - self.clean_mean) / max(self.clean_std, float(self.check_every))

    def check_matches(self, identity: Mapping[str, Any]) -> None:
        profiles.check_identity(self.identity, identity, stage="purify", made_for="purifier")

    def save(self, path: Path) -> None:
        profiles.save(self, path)

    @classmethod
    def load(cls, path: Path) -> PurifyProfile:
        data = profiles.read(path, stage="purify", version=VERSION)
        try:
            return cls(**data)
        except TypeError:
            raise ConfigError(f"purify profile {path}: unexpected fields") from None


def stop_step(
    trace: Sequence[float],
    tau: float,
    check_every: int,
    k_max: int,
    k_min: int = 0,
    *,
    drifts: Sequence[float] = (),
    drift_tau: float | None = None,
    k_escalate: int | None = None,
    confirm_steps: int = 0,
    confirm_tau: float | None = None,
) -> int:
    """t* of a noise-only trace (check j at step (j + 1)·check_every) under τ and, given the
    check's drifts, the drift rule and the look confirming a stop; as ``Purifier`` does,
    drift is tested before τ."""
    escalate = k_max if k_escalate is None else k_escalate
    j = _tau_stop(trace, tau, check_every, k_max, k_min, drifts, drift_tau)
    if j is None:
        return escalate
    if confirm_tau is not None and _look(drifts, j, check_every, confirm_steps) < confirm_tau:
        return escalate
    return (j + 1) * check_every


def _look(drifts: Sequence[float], j: int, check_every: int, confirm_steps: int) -> float:
    """The drift at the look that confirms a stop at check j."""
    look = j + confirm_steps // check_every
    if look >= len(drifts):
        raise ValueError(
            f"the trace ends before the look at step {(look + 1) * check_every} "
            "(calibration traces must run on to k_max + confirm_steps)"
        )
    return drifts[look]


def _tau_stop(
    trace: Sequence[float],
    tau: float,
    check_every: int,
    k_max: int,
    k_min: int,
    drifts: Sequence[float],
    drift_tau: float | None,
) -> int | None:
    """The check at which τ stops the trace, or None where the drift rule or the cap sends
    it on."""
    for j, similarity in enumerate(trace):
        step = (j + 1) * check_every
        if step > k_max:
            break
        if step < k_min:
            continue
        if drift_tau is not None and j < len(drifts) and drifts[j] < drift_tau:
            return None
        if similarity >= tau:
            return j
    return None


def calibrate_purifier(
    purifier: Purifier,
    traces: Sequence[Trace],
    *,
    target_steps: int,
    quantile: float,
    identity: Mapping[str, Any],
    drift_quantile: float | None = None,
    confirm_quantile: float | None = None,
) -> PurifyProfile:
    """:func:`calibrate` with the bounds ``purifier`` noises with (traces from its ``traces``)."""
    return calibrate(
        [t.similarities for t in traces],
        check_every=purifier.settings.check_every,
        k_max=purifier.k_max,
        target_steps=target_steps,
        quantile=quantile,
        identity=identity,
        k_min=purifier.k_min,
        drifts=[t.drifts for t in traces],
        drift_quantile=drift_quantile,
        k_escalate=purifier.k_escalate,
        confirm_steps=purifier.settings.confirm_steps,
        confirm_quantile=confirm_quantile,
    )


def calibrate(
    traces: Sequence[Sequence[float]],
    *,
    check_every: int,
    k_max: int,
    target_steps: int,
    quantile: float,
    identity: Mapping[str, Any],
    k_min: int = 0,
    drifts: Sequence[Sequence[float]] | None = None,
    drift_quantile: float | None = None,
    k_escalate: int | None = None,
    confirm_steps: int = 0,
    confirm_quantile: float | None = None,
) -> PurifyProfile:
    """Pick τ (and drift_tau, confirm_tau) from clean images' full traces (noised to ``k_max``
    and ``confirm_steps`` on, no stop)."""
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
    drift_tau = None
    if drift_quantile is not None:
        if drifts is None or len(drifts) != len(traces) or any(not d for d in drifts):
            raise ValueError("the drift rule needs every image's drifts (signal='denoised')")
        drift_tau = _drift_threshold(traces, drifts, tau, check_every, k_max, k_min, drift_quantile)
    confirm_tau = None
    if confirm_quantile is not None:
        if confirm_steps <= 0 or confirm_steps % check_every:
            raise ValueError(
                f"confirm_quantile needs confirm_steps, a positive multiple of check_every="
                f"{check_every}, got {confirm_steps}"
            )
        if drifts is None or len(drifts) != len(traces):
            raise ValueError("the look confirming a stop needs every image's drifts")
        confirm_tau = _confirm_threshold(
            traces,
            drifts,
            tau,
            drift_tau,
            check_every,
            k_max,
            k_min,
            confirm_steps,
            confirm_quantile,
        )
    steps = np.array(
        [
            stop_step(
                t,
                tau,
                check_every,
                k_max,
                k_min,
                drifts=d,
                drift_tau=drift_tau,
                k_escalate=k_escalate,
                confirm_steps=confirm_steps,
                confirm_tau=confirm_tau,
            )
            for t, d in zip(traces, drifts or [()] * len(traces), strict=True)
        ],
        dtype=np.float64,
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
        drift_tau=drift_tau,
        drift_quantile=drift_quantile,
        confirm_steps=confirm_steps if confirm_tau is not None else 0,
        confirm_tau=confirm_tau,
        confirm_quantile=confirm_quantile,
    )


def _drift_threshold(
    traces: Sequence[Sequence[float]],
    drifts: Sequence[Sequence[float]],
    tau: float,
    check_every: int,
    k_max: int,
    k_min: int,
    quantile: float,
) -> float:
    """The ⌊quantile·n⌋-th smallest of each image's lowest drift on its way to t* under τ."""
    if not 0 <= quantile < 1:
        raise ValueError(f"drift_quantile must be in [0, 1), got {quantile}")
    lowest = []
    for t, d in zip(traces, drifts, strict=True):
        stop = stop_step(t, tau, check_every, k_max, k_min)  # without the drift rule
        seen = [d[j] for j in range(len(d)) if k_min <= (j + 1) * check_every <= stop]
        lowest.append(min(seen) if seen else math.inf)
    # Images whose lowest drift is below the threshold escalate: at most ⌊q·n⌋ of them.
    return float(sorted(lowest)[math.floor(quantile * len(lowest) + 1e-9)])


def _confirm_threshold(
    traces: Sequence[Sequence[float]],
    drifts: Sequence[Sequence[float]],
    tau: float,
    drift_tau: float | None,
    check_every: int,
    k_max: int,
    k_min: int,
    confirm_steps: int,
    quantile: float,
) -> float:
    """The ⌊quantile·n⌋-th smallest drift at the look after each clean image's stop by τ
    (+∞ for images that τ does not stop)."""
    if not 0 <= quantile < 1:
        raise ValueError(f"confirm_quantile must be in [0, 1), got {quantile}")
    looks = []
    for t, d in zip(traces, drifts, strict=True):
        j = _tau_stop(t, tau, check_every, k_max, k_min, d, drift_tau)
        looks.append(math.inf if j is None else _look(d, j, check_every, confirm_steps))
    return float(sorted(looks)[math.floor(quantile * len(looks) + 1e-9)])
