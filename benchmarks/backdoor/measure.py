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
    """Median seconds per batch of the full prefill (SDPA, last-position logits, as a server
    computes it), of the monitor's early-stopped probe (also as if each layer were the deepest
    watched, and on eager attention, which builds the full maps) and of the cross-view check;
    and the bytes of attention weights: eager's maps, the row attention's rows, and what the
    probe keeps (1 + heads numbers per watched layer and row)."""
    prompts = [prompt] * len(images)
    batch = probe.prepare(images, prompts)
    model = probe.model
    mine = model.config._attn_implementation
    # (attention implementation, what runs): taken in turn, once per repeat, so that a slow
    # spell of this machine falls on all of them alike rather than on one block of repeats.
    runs: dict[str, tuple[str, Callable[[], Any]]] = {
        "full_prefill_s": (
            "sdpa",
            lambda: model(**batch.inputs, use_cache=False, logits_to_keep=1),
        ),
        "monitor_s": (mine, lambda: probe.signals(batch, layers)),
        "monitor_eager_s": ("eager", lambda: probe.signals(batch, layers)),
    }
    # The early stop's saving depends on where the profile's deepest channel sits: the cost
    # for each possible deepest layer shows how much of the ratio is the model, not the probe.
    for layer in range(probe.num_layers):
        runs[f"deepest_{layer}"] = (mine, lambda i=layer: probe.signals(batch, [i]))
    if views is not None:
        runs["crossview_s"] = (mine, lambda: views.divergences(images, prompts, batch))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for repeat in range(repeats + 1):  # the first round warms up
            for name, (implementation, fn) in runs.items():
                model.set_attn_implementation(implementation)
                start = time.perf_counter()
                fn()
                if repeat:
                    seconds[name].append(time.perf_counter() - start)
    finally:
        model.set_attn_implementation(mine)
    out: dict[str, Any] = {name: float(np.median(s)) for name, s in seconds.items()}
    out["monitor_s_by_deepest_layer"] = [
        out.pop(f"deepest_{layer}") for layer in range(probe.num_layers)
    ]
    rows, length = batch.inputs["input_ids"].shape  # (B, T)
    # Bytes per (query, key) pair, summed over the batch, the heads and every layer.
    weights = rows * heads * probe.num_layers * model.dtype.itemsize
    out["attention_maps_bytes"] = float(weights * length * length)  # eager: (B, H, T, T) each
    out["attention_rows_bytes"] = float(weights * length)  # the row attention: (B, H, 1, T) each
    out["monitor_kept_bytes"] = float(rows * len(layers) * (1 + heads) * 4)
    return out
