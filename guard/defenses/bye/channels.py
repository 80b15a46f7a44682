"""BYE's signals and which of them a profile watches (DESIGN.md §4.2).

A signal ("channel") is one layer's attention entropy over the image: of the head average
(BYE's), or of one head alone. The score of a sample is its mean entropy over the chosen
channels. The choice, in this order:

0. ``reference``, when trusted clean samples are given beside the suspect set: the channel
   whose low tail holds the most suspect samples beyond what clean samples put there, i.e.
   the share below the reference's REFERENCE_Q quantile, less REFERENCE_Q, if that excess
   reaches MIN_EXCESS. Why: clean entropies have heavy low tails of their own (content, not
   poison: on the toy VLMs up to 6% of clean samples sit more than 3σ low on several heads),
   which fool any statistic of the suspect set alone; a clean reference cancels them. On the
   toy VLM where layer 0, head 1 separates triggered samples at AUROC 0.997, its excess was
   4.9% (5% poison) against 3.0% for the next channel, while the suspect set's own tail shares
   ranked a heavy-tailed clean head first.
1. ``bye``: BYE's test on the head averages. Per layer, a 1-D two-component GMM over the
   calibration samples; the layer is sensitive when |μ1 − μ2| > 2(σ1 + σ2) and each component
   holds at least MIN_MODE samples (a small set can otherwise "find" a mode of one sample).
2. ``bye-heads``: the same test on every head alone, when no layer passes.
3. ``fallback``: nothing passes (calibration data may be all clean, or a poisoned minority
   overlaps the clean tail): the layer whose head average has the largest separation
   |μ1 − μ2| / (σ1 + σ2). BYE itself filters nothing in this case; ``fallback`` tells an
   operator that no poisoned mode was confirmed. Single heads are left out here on purpose:
   a GMM splits any clean head in two, and with many heads some split comes close to a
   poisoned head's separation (toy VLM: 1.22 against 1.37) or passes it (synthetic data in
   tests/test_backdoor.py), so without a reference the choice would be near chance.

Why heads at all: a trigger that fills one image token can be singled out by one head while the
average over heads blurs it (toy VLM, 8-px patches, 5% poison: layer 0, head 1 at AUROC 0.997,
the best head average at 0.92).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.mixture import GaussianMixture

MIN_MODE = 3  # samples a GMM component must hold for its layer to count as bimodal
REFERENCE_Q = 0.01  # the clean reference's low quantile that bounds a channel's low tail …
# … and the excess share of suspect samples below it that names a channel. Why 2%: the
# quantile of a few hundred reference samples is itself uncertain, so the largest of some tens
# of channels' excesses reaches 1-2% with little or no signal behind it (measured: 1.7% on
# synthetic clean data, 400 reference and 600 suspect samples, 10 channels; 2.0% on a toy VLM
# whose channels separate its trigger at AUROC 0.77 at best, 500 and 1,000 samples, 20
# channels; the 2.0% channel's AUROC was 0.68).
MIN_EXCESS = 0.02
Method = Literal["reference", "bye", "bye-heads", "fallback"]
Channel = tuple[int, int | None]  # (layer, head); head None: the average over heads


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
    if np.ptp(x) == 0:
        # One value everywhere (a head that attends the same way to every image): no second
        # component to find, and sklearn's k-means start would warn of duplicate points.
        v = float(x[0, 0])
        return Gaussian2(means=(v, v), stds=(0.0, 0.0), weights=(0.5, 0.5))
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
class Choice:
    method: Method
    channels: list[Channel]
    evidence: dict[str, Any]  # bimodal layers or heads, separation, reference excesses
    layer_fits: list[Gaussian2]  # per layer, of its head average


def choose(x: np.ndarray, reference: np.ndarray | None = None) -> Choice:
    """The channels for signals x (N, layers, 1 + heads), by the order in the module's
    docstring; ``reference``: the same measured on trusted clean samples."""
    fits = [fit_gmm(x[:, i, 0]) for i in range(x.shape[1])]  # the profile records them all
    excess: dict[str, Any] = {}
    if reference is not None:
        channel, excess = _by_reference(x, reference)
        excess["reference_samples"] = len(reference)
        if channel is not None:  # BYE's per-head fits (layers × heads of them) are not needed
            return Choice("reference", [channel], excess, fits)
    method, chosen, evidence = _by_bye(x, fits)
    return Choice(method, chosen, {**evidence, **excess}, fits)


def select(
    signals: np.ndarray, channels: Sequence[Channel], layers: Sequence[int] | None = None
) -> np.ndarray:
    """(N, len(channels)) entropies picked from signals (N, len(layers), 1 + heads)."""
    x = np.asarray(signals)
    if x.ndim == 2:
        x = x[:, :, None]
    where = {layer: i for i, layer in enumerate(range(x.shape[1]) if layers is None else layers)}
    columns = []
    for layer, head in channels:
        if layer not in where:
            raise ValueError(f"channel ({layer}, {head}): layer {layer} was not measured")
        column = 0 if head is None else head + 1
        if not 0 <= column < x.shape[2]:
            raise ValueError(f"channel ({layer}, {head}): the signals hold {x.shape[2] - 1} heads")
        columns.append(x[:, where[layer], column])
    return np.stack(columns, axis=1)


def as_signals(values: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or len(x) < 2 or x.shape[2] < 1:
        raise ValueError(f"{what} needs an (N >= 2, layers[, 1 + heads]) array of entropies")
    return x


def to_channels(raw: Sequence[Sequence[int | None]]) -> list[Channel]:
    return [(int(c[0]), None if c[1] is None else int(c[1])) for c in raw]  # type: ignore[arg-type]


def describe(channels: Sequence[Sequence[int | None]]) -> str:
    """Channels in words: "layer 2" (head average), "layer 0 head 1"."""
    return ", ".join(
        f"layer {c[0]}" if c[1] is None else f"layer {c[0]} head {c[1]}" for c in channels
    )


def _by_reference(x: np.ndarray, ref: np.ndarray) -> tuple[Channel | None, dict[str, Any]]:
    """The channel whose low tail holds the most suspect samples beyond the clean reference's
    share (see the module's docstring), or None where no channel reaches MIN_EXCESS; and the
    evidence."""
    excess = []
    for layer in range(x.shape[1]):
        for col in range(x.shape[2]):
            cut = np.quantile(ref[:, layer, col], REFERENCE_Q)
            share = float(np.mean(x[:, layer, col] < cut))
            # Rounded: 0.03 − 0.01 is 0.0199999… in floating point, and 30 of 1,000 must pass 2%.
            excess.append((round(share - REFERENCE_Q, 9), (layer, None if col == 0 else col - 1)))
    excess.sort(key=lambda e: -e[0])
    evidence = {"reference_q": REFERENCE_Q, "excess": [[*c, round(e, 4)] for e, c in excess[:5]]}
    best, channel = excess[0]
    if best >= MIN_EXCESS and (best + REFERENCE_Q) * len(x) >= MIN_MODE:
        return channel, evidence
    return None, evidence


def _by_bye(x: np.ndarray, fits: list[Gaussian2]) -> tuple[Method, list[Channel], dict[str, Any]]:
    """BYE's layers, else BYE's heads, else the most separated layer."""
    n = len(x)

    def real_mode(f: Gaussian2) -> bool:
        # A "mode" of one or two samples with a near-zero σ passes BYE's test by accident.
        return f.bimodal and min(f.weights) * n >= MIN_MODE

    layers = [i for i, f in enumerate(fits) if real_mode(f)]
    if layers:
        return "bye", [(i, None) for i in layers], {"bimodal_layers": layers}
    head_fits: list[tuple[Channel, Gaussian2]] = [
        ((layer, h), fit_gmm(x[:, layer, h + 1]))
        for layer in range(x.shape[1])
        for h in range(x.shape[2] - 1)
    ]
    bimodal_heads = [c for c, f in head_fits if real_mode(f)]
    if bimodal_heads:
        return "bye-heads", bimodal_heads, {"bimodal_heads": [list(c) for c in bimodal_heads]}
    best = int(np.argmax([separation(f) for f in fits]))
    return "fallback", [(best, None)], {"separation": round(separation(fits[best]), 4)}


def separation(fit: Gaussian2) -> float:
    """|μ1 − μ2| / (σ1 + σ2): BYE's test asks for more than 2."""
    return abs(fit.means[1] - fit.means[0]) / max(fit.stds[0] + fit.stds[1], 1e-12)
