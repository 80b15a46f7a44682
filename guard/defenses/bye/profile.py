"""BYE calibration: which layers are sensitive, what clean traffic looks like, and the profile
that stores it (DESIGN.md §4.2).

Per layer, a 1-D two-component GMM over the calibration samples' entropies; the layer is
sensitive when the components are well apart, |μ1 − μ2| > 2(σ1 + σ2) (BYE's test), and each
holds at least MIN_MODE samples (a small set can otherwise "find" a mode of one sample). The
score of a sample is its mean entropy over the sensitive layers, and the clean component is
the higher-mean component of a two-component GMM over the scores.

Fallback, when no layer is bimodal (calibration data that is all clean, or a poisoned minority
whose spread overlaps the clean tail: on the quick toy world the trigger's layer separates
clean from poisoned at AUROC 0.998, yet its GMM fails the test, 0.19 apart against
2(σ1 + σ2) = 0.28): the one layer with the largest separation |μ1 − μ2| / (σ1 + σ2) is used, and
the clean component is estimated robustly over the whole set (median, 1.4826·MAD), so that
a poisoned minority cannot widen it. BYE itself filters nothing in this case; the profile says
``fallback: true`` so an operator knows that no poisoned mode was confirmed.

Runtime rules: ``sigma`` flags score < clean mean − k·σ; ``posterior`` (needs a bimodal fit)
flags when the low component's posterior exceeds 0.5. Cross-view divergences of the clean
samples give the tail thresholds (low: abnormally invariant; high: optional).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.mixture import GaussianMixture

from guard.config import ConfigError
from guard.defenses import profiles

VERSION = 1
MIN_MODE = 3  # samples a GMM component must hold for its layer to count as bimodal
Rule = Literal["sigma", "posterior"]
Combine = Literal["entropy", "crossview", "either", "both"]


@dataclass(frozen=True)
class Gaussian2:
    """A fitted two-component 1-D GMM, components ordered by mean (low first)."""

    means: tuple[float, float]
    stds: tuple[float, float]
    weights: tuple[float, float]

    @property
    def bimodal(self) -> bool:
        return abs(self.means[1] - self.means[0]) > 2 * (self.stds[0] + self.stds[1])

    def low_posterior(self, x: np.ndarray) -> np.ndarray:
        """P(low component | x) for values x (N,)."""
        dens = [
            w * np.exp(-0.5 * ((x - m) / s) ** 2) / s
            for m, s, w in zip(self.means, self.stds, self.weights, strict=True)
        ]
        total = np.maximum(dens[0] + dens[1], np.finfo(np.float64).tiny)
        out: np.ndarray = dens[0] / total
        return out


def fit_gmm(values: np.ndarray) -> Gaussian2:
    """BYE's per-layer fit: ``GaussianMixture(2, random_state=0)`` on 1-D values."""
    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    if len(x) < 2:
        raise ValueError("a two-component fit needs at least two samples")
    gmm = GaussianMixture(n_components=2, random_state=0).fit(x)
    means = gmm.means_.ravel()
    stds = np.sqrt(gmm.covariances_.ravel())
    order = np.argsort(means)
    return Gaussian2(
        means=(float(means[order[0]]), float(means[order[1]])),
        stds=(float(stds[order[0]]), float(stds[order[1]])),
        weights=(float(gmm.weights_[order[0]]), float(gmm.weights_[order[1]])),
    )


@dataclass(frozen=True)
class BackdoorProfile:
    layers: list[int]  # sensitive layers (all, in the fallback)
    layer_fits: list[dict[str, Any]]  # per layer: means, stds, weights, bimodal
    fallback: bool  # no layer was bimodal
    clean_mean: float  # score (mean entropy over ``layers``) of the clean component
    clean_std: float
    k_sigma: float
    rule: Rule
    score_fit: dict[str, Any] | None  # the two-component fit of the scores (None: fallback)
    crossview_low: float | None  # flag divergence below this (abnormally invariant)
    crossview_high: float | None  # flag divergence above this (None: off)
    crossview: dict[str, Any]  # the view settings the divergences were measured with
    combine: Combine
    samples: int
    identity: Mapping[str, Any]  # the monitored model it was made for
    version: int = VERSION
    flagged_in_calibration: list[int] = field(default_factory=list)  # indices

    @property
    def threshold(self) -> float:
        return self.clean_mean - self.k_sigma * self.clean_std

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
    k_sigma: float = 3.0,
    rule: Rule = "sigma",
    crossview_quantiles: tuple[float | None, float | None] = (0.01, None),
    combine: Combine = "entropy",
) -> BackdoorProfile:
    """A profile from calibration entropies (N, layers) and, optionally, divergences (N,)."""
    x = np.asarray(entropies, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError("calibration needs an (N >= 2, layers) array of entropies")
    if not (math.isfinite(k_sigma) and k_sigma > 0):
        raise ValueError(f"k_sigma must be positive, got {k_sigma}")
    fits = [fit_gmm(x[:, i]) for i in range(x.shape[1])]
    # A "mode" of one or two samples with a near-zero σ passes BYE's test by accident.
    layers = [i for i, f in enumerate(fits) if f.bimodal and min(f.weights) * len(x) >= MIN_MODE]
    fallback = not layers
    if fallback:
        layers = [int(np.argmax([_separation(f) for f in fits]))]
    scores = x[:, layers].mean(1)  # (N,)
    score_fit = None
    if fallback:
        if rule == "posterior":
            raise ValueError("rule 'posterior' needs a bimodal layer; none was found")
        mean = float(np.median(scores))
        std = float(1.4826 * np.median(np.abs(scores - mean)))  # σ of a normal, robustly
        clean = scores >= mean - k_sigma * std
    else:
        fit = fit_gmm(scores)
        score_fit = profiles.jsonable({**asdict(fit), "bimodal": fit.bimodal})
        clean = fit.low_posterior(scores) <= 0.5
        mean, std = fit.means[1], fit.stds[1]
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
        layers=layers,
        layer_fits=profiles.jsonable(
            [{**asdict(f), "bimodal": f.bimodal, "separation": _separation(f)} for f in fits]
        ),
        fallback=fallback,
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


def _separation(fit: Gaussian2) -> float:
    """|μ1 − μ2| / (σ1 + σ2): BYE's test asks for more than 2."""
    return abs(fit.means[1] - fit.means[0]) / max(fit.stds[0] + fit.stds[1], 1e-12)
