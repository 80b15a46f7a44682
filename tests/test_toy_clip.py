"""The toy CLIP: saved in open_clip's layout, loaded through open_clip's own API, trainable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch

from guard.toy.clip import (
    MEAN,
    STD,
    ClipSettings,
    build_clip,
    clip_loss,
    load_clip,
    pixels,
    save_clip,
    train_clip,
    zero_shot_accuracy,
)
from guard.toy.data import load_splits, render, to_pil, to_tensor

TINY = ClipSettings(
    embed_dim=16,
    vision_width=32,
    vision_layers=1,
    vision_head_width=16,
    text_width=32,
    text_layers=1,
    text_heads=2,
    steps=3,
    batch=8,
)


def _images(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    train = load_splits()["train"]
    return render(train.glyphs[:n], np.random.default_rng(0)), train.labels[:n]


def test_saved_model_loads_through_open_clip_with_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_clip(TINY).eval()
    save_clip(model, TINY, tmp_path)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    assert (tmp_path / "open_clip_model.safetensors").is_file()

    loaded, preprocess, tokenizer = load_clip(tmp_path)
    assert not loaded.training
    images, _ = _images()
    with torch.no_grad():
        expected = model.encode_image(to_tensor(images))
        assert torch.equal(loaded.encode_image(to_tensor(images)), expected)  # same weights
        # ... and through the loaded preprocess, as the guard will call it on PIL images.
        got = loaded.encode_image(torch.stack([preprocess(to_pil(i)) for i in images]))
        text = tokenizer(["a photo of the digit seven"])
        assert text.shape == (1, TINY.context_length)
        assert torch.equal(model.encode_text(text), loaded.encode_text(text))
    torch.testing.assert_close(got, expected)


def test_preprocess_applies_the_training_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_clip(TINY)
    save_clip(model, TINY, tmp_path)
    loaded, preprocess, _ = load_clip(tmp_path)
    images, _ = _images(3)
    batch = torch.stack([preprocess(to_pil(i)) for i in images])  # (3, 3, 32, 32)
    assert batch.shape == (3, 3, 32, 32)
    # Training normalises with pixels(); mean = std = 0.5 makes that data.to_tensor's [-1, 1].
    torch.testing.assert_close(batch, pixels(model, images))
    torch.testing.assert_close(batch, pixels(loaded, images))
    torch.testing.assert_close(batch, to_tensor(images))
    assert tuple(loaded.visual.preprocess_cfg["mean"]) == MEAN
    assert tuple(loaded.visual.preprocess_cfg["std"]) == STD


def test_tokenizer_is_the_bundled_offline_bpe() -> None:
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    ids = tokenizer(["a photo of the digit seven"])[0]
    assert int(ids[0]) == tokenizer.sot_token_id
    assert tokenizer.decode([int(i) for i in ids[1:7]]).strip() == "a photo of the digit seven"


def test_clip_loss_treats_same_label_pairs_as_positives() -> None:
    labels = torch.tensor([0, 0, 1])
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    scale = torch.tensor(100.0)
    aligned = clip_loss(a, a, labels, scale, text_uniformity=1.0)
    # The best a row can do is spread evenly over its positives: ln 2 for each of the two
    # zeros, 0 for the one; the CLIP part (mean of both directions) and the caption term each
    # reach that floor.
    floor = 2 * (2 * np.log(2) / 3)
    assert abs(float(aligned) - floor) < 1e-3
    swapped = clip_loss(a, a.flip(0), labels, scale, text_uniformity=0.0)
    assert float(swapped) > float(aligned)


def test_train_clip_smoke(tmp_path: Path) -> None:
    figures = train_clip(tmp_path, seed=0, settings=TINY)
    json.dumps(figures)  # JSON-able, as the build manifest needs
    assert figures["settings"]["steps"] == 3
    assert 0.0 <= figures["zero_shot_accuracy"] <= 1.0
    model, _, tokenizer = load_clip(tmp_path)
    images, labels = _images(20)
    assert zero_shot_accuracy(model, tokenizer, images, labels) >= 0.0
    again = train_clip(tmp_path / "again", seed=0, settings=TINY)
    assert again["final_loss"] == figures["final_loss"]  # seeded and reproducible
