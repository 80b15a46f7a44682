"""What the benchmark measures on one model: entropies, cross-view divergences, answers,
ROC figures, and the monitor's cost against a full prefill."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from guard.defenses.bye.crossview import CrossView
from guard.defenses.bye.monitor import measure as bye_measure
from guard.defenses.bye.probe import EntropyProbe
from guard.toy.vlm import answer_images


@dataclass(frozen=True)
class Measured:
    signals: np.ndarray  # (N, layers, 1 + heads): every layer, head average then each head
    divergences: np.ndarray | None  # (N,)
    answers: list[str]


def measure(
    probe: EntropyProbe,
    views: CrossView | None,
    images: Sequence[Image.Image],
    prompt: str,
    batch: int,
    advance: Callable[[int], None],
) -> Measured:
    rows, divs = [], []
    for i in range(0, len(images), batch):
        chunk = list(images[i : i + batch])
        prompts = [prompt] * len(chunk)
        # What `vlm-guard backdoor calibrate` measures: every layer and head, and the views.
        settings = None if views is None else views.settings
        entropies, divergences = bye_measure(probe, chunk, prompts, settings)
        rows.append(entropies)
        if divergences is not None:
            divs.append(divergences)
        advance(len(chunk))
    arrays = np.stack([np.asarray(im) for im in images])  # (N, 32, 32, 3)
    answers = answer_images(probe.model, probe.processor, arrays, question=prompt)
    return Measured(np.concatenate(rows), np.concatenate(divs) if divs else None, answers)


def signals_only(
    probe: EntropyProbe,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    batch: int,
    advance: Callable[[int], None],
) -> np.ndarray:
    """(N, layers, 1 + heads): one prompt per image, no answers."""
    rows = []
    for i in range(0, len(images), batch):
        rows.append(probe.signals(probe.prepare(images[i : i + batch], prompts[i : i + batch])))
        advance(len(rows[-1]))
    return np.concatenate([r.numpy() for r in rows])


def roc(clean: np.ndarray, attacked: np.ndarray) -> dict[str, Any]:
    """AUROC and TPR at 1% FPR for a suspicion score (higher = more suspicious)."""
    y = np.r_[np.zeros(len(clean)), np.ones(len(attacked))]
    s = np.r_[clean, attacked]
    fpr, tpr, _ = roc_curve(y, s)
    at_1 = float(tpr[np.searchsorted(fpr, 0.01, side="right") - 1])
    return {
        "auroc": float(roc_auc_score(y, s)),
        "tpr_at_1pct_fpr": at_1,
        "curve": {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()},
    }


def z_low(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """How many reference standard deviations below the reference mean (suspicion score)."""
    std = max(float(reference.std()), 1e-12)
    out: np.ndarray = (float(reference.mean()) - values) / std
    return out


@torch.inference_mode()
def cost(
    probe: EntropyProbe,
    views: CrossView | None,
    images: Sequence[Image.Image],
    prompt: str,
    layers: list[int],
    heads: int,
    repeats: int,
) -> dict[str, Any]:
    """Median seconds per batch of the full prefill (last-position logits, as a server
    computes them), of the monitor's early-stopped probe (also as if each layer were the
    deepest watched) and of the cross-view check; and the bytes each keeps of attention (the
    probe: 1 + heads numbers per watched layer and row)."""
    prompts = [prompt] * len(images)
    batch = probe.prepare(images, prompts)

    def timed(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return float(np.median(runs))

    full = timed(lambda: probe.model(**batch.inputs, use_cache=False, logits_to_keep=1))
    monitor = timed(lambda: probe.signals(batch, layers))
    out: dict[str, Any] = {"full_prefill_s": full, "monitor_s": monitor}
    # The early stop's saving depends on where the profile's deepest channel sits: the cost
    # for each possible deepest layer shows how much of the ratio is the model, not the probe.
    out["monitor_s_by_deepest_layer"] = [
        timed(lambda i=layer: probe.signals(batch, [i])) for layer in range(probe.num_layers)
    ]
    if views is not None:
        out["crossview_s"] = timed(lambda: views.divergences(images, prompts))
    maps = probe.model(**batch.inputs, use_cache=False, output_attentions=True).attentions
    out["attention_maps_bytes"] = float(sum(a.numel() * a.element_size() for a in maps))
    out["monitor_kept_bytes"] = float(len(images) * len(layers) * (1 + heads) * 4)
    return out
