"""BYE calibration: which signals are sensitive (guard/defenses/bye/channels.py), what clean
traffic looks like, and the profile that stores it (DESIGN.md §4.2).

The clean component: with a bimodal choice, the higher-mean component of a two-component GMM
over the scores; otherwise a robust estimate (median, 1.4826·MAD) over the clean reference if
given, else over the whole set, so that a poisoned minority cannot widen it.

Runtime rules: ``sigma`` flags score < clean mean − k·σ; ``posterior`` (needs a bimodal fit)
flags when the low component's posterior exceeds 0.5. Cross-view divergences of the clean
samples give the tail thresholds (low: abnormally invariant; high: optional).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from guard.config import ConfigError
from guard.defenses import profiles
from guard.defenses.bye.channels import (
    Gaussian2,
    Method,
    as_signals,
    choose,
    fit_gmm,
    select,
    separation,
    to_channels,
)

VERSION = 2  # 2: channels (layer, head) instead of layers
MAD_SIGMA = 1.4826  # σ of a normal from its median absolute deviation
Rule = Literal["sigma", "posterior"]
Combine = Literal["entropy", "crossview", "either", "both"]


@dataclass(frozen=True)
class BackdoorProfile:
    channels: list[list[int | None]]  # [layer, head or None]: the score averages these
    layer_fits: list[dict[str, Any]]  # per layer (head average): means, stds, weights, bimodal
    method: Method  # how the channels were chosen (see guard/defenses/bye/channels.py)
    selection: dict[str, Any]  # the evidence for the choice (bimodal layers or heads, separations)
    clean_mean: float  # score (mean entropy over ``channels``) of the clean component
    clean_std: float
    k_sigma: float
    rule: Rule
    score_fit: dict[str, Any] | None  # the two-component fit of the scores (None: not bimodal)
    crossview_low: float | None  # flag divergence below this (abnormally invariant)
    crossview_high: float | None  # flag divergence above this (None: off)
    crossview: dict[str, Any]  # the view settings the divergences were measured with
    combine: Combine
    samples: int
    identity: Mapping[str, Any]  # the monitored model it was made for
    version: int = VERSION
    flagged_in_calibration: list[int] = field(default_factory=list)  # indices

    @property
    def layers(self) -> list[int]:
        """The layers the probe must watch (the deepest one ends the forward)."""
        return sorted({int(c[0]) for c in self.channels})  # type: ignore[arg-type]

    @property
    def fallback(self) -> bool:
        """No layer or head passed BYE's test: the channel is the most separated one."""
        return self.method == "fallback"

    @property
    def threshold(self) -> float:
        return self.clean_mean - self.k_sigma * self.clean_std

    def pick(self, signals: np.ndarray, layers: Sequence[int] | None = None) -> np.ndarray:
        """(N, channels) entropies from signals (N, len(layers), 1 + heads) as the probe
        returns them, ``layers`` naming their axis 1 (default: every layer from 0)."""
        return select(signals, to_channels(self.channels), layers)

    def scores(self, signals: np.ndarray, layers: Sequence[int] | None = None) -> np.ndarray:
        """(N,) scores: the mean over the profile's channels (see :meth:`pick`)."""
        out: np.ndarray = self.pick(signals, layers).mean(1)
        return out

    def entropy_flags(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: the entropy rule on scores (N,)."""
        if self.rule == "posterior":
            if self.score_fit is None:
                raise ConfigError("backdoor rule 'posterior' needs a bimodal calibration")
            fit = Gaussian2(**{k: tuple(v) for k, v in self.score_fit.items() if k != "bimodal"})
            flags: np.ndarray = fit.low_posterior(scores) > 0.5
            return flags
        below: np.ndarray = scores < self.threshold
        return below

    def crossview_flags(self, divergences: np.ndarray) -> np.ndarray:
        flags = np.zeros(len(divergences), dtype=bool)
        if self.crossview_low is not None:
            flags |= divergences < self.crossview_low
        if self.crossview_high is not None:
            flags |= divergences > self.crossview_high
        return flags

    def check_matches(self, identity: Mapping[str, Any]) -> None:
        profiles.check_identity(self.identity, identity, stage="backdoor", made_for="model")

    def save(self, path: Path) -> None:
        profiles.save(self, path)

    @classmethod
    def load(cls, path: Path) -> BackdoorProfile:
        data = profiles.read(path, stage="backdoor", version=VERSION)
        try:
            return cls(**data)
        except TypeError:
            raise ConfigError(f"backdoor profile {path}: unexpected fields") from None


def calibrate(
    entropies: np.ndarray,
    *,
    identity: Mapping[str, Any],
    divergences: np.ndarray | None = None,
    crossview: Mapping[str, Any] | None = None,
    reference: np.ndarray | None = None,
    k_sigma: float = 3.0,
    rule: Rule = "sigma",
    crossview_quantiles: tuple[float | None, float | None] = (0.01, None),
    combine: Combine = "entropy",
) -> BackdoorProfile:
    """A profile from calibration signals and, optionally, divergences (N,).

    ``entropies``: (N, layers, 1 + heads) as :meth:`EntropyProbe.signals` returns them for every
    layer, or (N, layers) head averages alone (then no single head is considered).
    ``reference``: the same measured on trusted clean samples, if there are any.
    """
    x = as_signals(entropies, "calibration")
    if not (math.isfinite(k_sigma) and k_sigma > 0):
        raise ValueError(f"k_sigma must be positive, got {k_sigma}")
    ref = None if reference is None else as_signals(reference, "the clean reference")
    if ref is not None and ref.shape[1:] != x.shape[1:]:
        raise ValueError(f"the clean reference's signals {ref.shape[1:]} differ from {x.shape[1:]}")
    choice = choose(x, ref)
    chosen = choice.channels
    scores = select(x, chosen).mean(1)  # (N,)
    score_fit = None
    if choice.method in ("bye", "bye-heads"):
        fit = fit_gmm(scores)
        score_fit = profiles.jsonable({**asdict(fit), "bimodal": fit.bimodal})
        clean = fit.low_posterior(scores) <= 0.5
        mean, std = fit.means[1], fit.stds[1]
    else:
        if rule == "posterior":
            raise ValueError("rule 'posterior' needs a bimodal layer or head; none was found")
        mean, std = _robust(scores if ref is None else select(ref, chosen).mean(1))
        clean = scores >= mean - k_sigma * std
    low = high = None
    if divergences is not None:
        d = np.asarray(divergences, dtype=np.float64)
        if d.shape != scores.shape:
            raise ValueError(f"{len(d)} divergences for {len(scores)} samples")
        q_low, q_high = crossview_quantiles
        low = None if q_low is None else float(np.quantile(d[clean], q_low))
        high = None if q_high is None else float(np.quantile(d[clean], q_high))
    elif combine != "entropy":
        raise ValueError(f"combine={combine!r} needs cross-view divergences")
    profile = BackdoorProfile(
        channels=[[layer, head] for layer, head in chosen],
        layer_fits=profiles.jsonable(
            [
                {**asdict(f), "bimodal": f.bimodal, "separation": separation(f)}
                for f in choice.layer_fits
            ]
        ),
        method=choice.method,
        selection=profiles.jsonable(choice.evidence),
        clean_mean=mean,
        clean_std=std,
        k_sigma=k_sigma,
        rule=rule,
        score_fit=score_fit,
        crossview_low=low,
        crossview_high=high,
        crossview=dict(crossview or {}),
        combine=combine,
        samples=len(x),
        identity=dict(identity),
    )
    flagged = np.flatnonzero(profile.entropy_flags(scores))
    return replace(profile, flagged_in_calibration=[int(i) for i in flagged])


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826·MAD: the mean and σ of a normal majority, whatever its low tail."""
    median = float(np.median(values))
    return median, float(MAD_SIGMA * np.median(np.abs(values - median)))


def combined(
    profile: BackdoorProfile, scores: np.ndarray, divergences: np.ndarray | None
) -> np.ndarray:
    """(N,) bool: the profile's combination of the entropy and cross-view rules."""
    by_entropy = profile.entropy_flags(scores)
    if profile.combine == "entropy":
        return by_entropy
    if divergences is None:
        raise ValueError(f"combine={profile.combine!r} needs cross-view divergences")
    by_view = profile.crossview_flags(divergences)
    if profile.combine == "crossview":
        return by_view
    out: np.ndarray = by_entropy | by_view if profile.combine == "either" else by_entropy & by_view
    return out
