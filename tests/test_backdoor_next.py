"""The backdoor monitor on a LLaVA-NeXT model, whose images get as many tokens as their shape
asks for: requests batched together must not need the same number of image tokens."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from guard.defenses.bye.crossview import CrossView, ViewSettings
from guard.defenses.bye.monitor import Monitor, load_model, model_identity
from guard.defenses.bye.probe import EntropyProbe
from guard.defenses.bye.profile import BackdoorProfile, calibrate
from tests.images import gradient
from tests.tiny_models import save_tiny_llava_next

PROMPTS = ["What digit is in the image?", "hi", "Name the digit."]
SHAPES = [(32, 32), (64, 32), (32, 64)]  # (width, height): 1, 2 and 2 tiles


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def next_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    path = tmp_path_factory.mktemp("llava-next")
    save_tiny_llava_next(path)
    model, processor = load_model(path)  # the auto classes, as the guard loads it
    return path, model, processor


@pytest.fixture(scope="module")
def probe(next_model: tuple[Path, Any, Any]) -> EntropyProbe:
    return EntropyProbe(next_model[1], next_model[2])


def _images() -> list[Image.Image]:
    return [gradient(w, h, seed=i) for i, (w, h) in enumerate(SHAPES)]


def test_the_auto_classes_load_llava_next(next_model: tuple[Path, Any, Any]) -> None:
    path, model, _ = next_model
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert model_identity(path, model)["architecture"] == "LlavaNextForConditionalGeneration"


def test_rows_with_different_numbers_of_image_tokens_share_a_batch(probe: EntropyProbe) -> None:
    batch = probe.prepare(_images(), PROMPTS)
    counts = batch.image_mask.sum(-1).tolist()
    assert len(set(counts)) == 3, counts  # the shapes really do differ in tokens
    got = probe.signals(batch)  # (3, layers, 1 + heads)
    from transformers import LlavaNextForConditionalGeneration

    path = probe.model.name_or_path
    eager = LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    with torch.inference_mode():
        out = eager.eval()(**batch.inputs, output_attentions=True)  # full maps to check against
    heads = out.attentions[0].shape[1]
    for layer, weights in enumerate(out.attentions):  # (B, heads, T, T)
        for row in range(3):
            image = weights[row, :, -1, batch.image_mask[row]]  # (heads, N_row)
            for column, p in enumerate([image.mean(0), *image]):
                p = p / p.sum()
                direct = -(p * (p + 1e-8).log()).sum()
                torch.testing.assert_close(got[row, layer, column], direct)
    # Far from uniform, so entropies over the wrong tokens could not pass for these.
    uniform = torch.tensor([math.log(n) for n in counts])
    assert bool((got[:, :, 0] < uniform[:, None] - 0.05).all())
    assert got.shape[-1] == 1 + heads
    # Each row alone gives its own numbers: neither the company nor the padding changes them.
    for row, (image, prompt) in enumerate(zip(_images(), PROMPTS, strict=True)):
        alone = probe.signals(probe.prepare([image], [prompt]))
        torch.testing.assert_close(alone[0], got[row], atol=1e-5, rtol=1e-5)


def test_the_monitor_screens_a_mixed_batch_with_cross_view(
    next_model: tuple[Path, Any, Any], probe: EntropyProbe
) -> None:
    path, model, _ = next_model
    images = _images()
    h = probe.entropies(probe.prepare(images, PROMPTS)).numpy()  # (3, layers)
    views = ViewSettings(views=2, fraction=0.25, answer_tokens=2)
    divergences = CrossView(probe, views).divergences(images, PROMPTS).numpy()
    assert divergences.shape == (3,) and bool((divergences >= 0).all())
    base = calibrate(np.vstack([h, h + 0.01]), identity=model_identity(path, model))
    cut = float(np.median(h.mean(1)))
    profile = BackdoorProfile(
        **{
            **base.__dict__,
            "clean_mean": cut,
            "clean_std": 0.0,
            "channels": [[i, None] for i in range(h.shape[1])],
            "combine": "either",
            "crossview": {"views": 2, "fraction": 0.25, "answer_tokens": 2, "seed": 0},
            "crossview_low": -1.0,  # never by cross-view: the entropy rule alone decides
        }
    )
    results = Monitor(probe, profile).screen(images, PROMPTS)
    assert [r.flagged for r in results] == [bool(s < cut) for s in h.mean(1)]
    assert [r.divergence for r in results] == pytest.approx(divergences.tolist(), abs=1e-5)
