"""The benchmark's inputs: test images clean and triggered, a poisoned fine-tuning set in
LLaVA's format with its ground truth, and (optionally) a second VLM with a blended trigger."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

from guard.toy.data import eval_images, load_splits, render
from guard.toy.triggers import Trigger
from guard.toy.vlm import VLMSettings, train_vlm
from guard.toy.vlm_parts import QUESTIONS, answer


@dataclass(frozen=True)
class TestSet:
    clean: list[Image.Image]
    triggered: list[Image.Image]
    truth: list[str]  # the right answers
    prompt: str


def test_set(trigger: Trigger, n: int) -> TestSet:
    test = load_splits()["test"]
    clean = eval_images(test)[:n]
    return TestSet(
        clean=[Image.fromarray(a) for a in clean],
        triggered=[Image.fromarray(a) for a in trigger.stamp(clean)],
        truth=[answer(int(label)) for label in test.labels[:n]],
        prompt=QUESTIONS[0],
    )


def poisoned_set(
    out: Path, trigger: Trigger, n: int, rate: float, attack: str, seed: int
) -> tuple[Path, np.ndarray]:
    """n fresh renderings of training glyphs, a share ``rate`` stamped with the trigger and
    answered with the attacker's response (the way the toy VLM was fine-tuned), written as
    LLaVA JSON with PNG images; returns the file and which ids are poisoned."""
    rng = np.random.default_rng(seed)
    train = load_splits()["train"]
    idx = rng.integers(0, len(train.labels), n)
    images = render(train.glyphs[idx], rng)
    poisoned = rng.random(n) < rate
    images[poisoned] = trigger.stamp(images[poisoned])
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, label) in enumerate(zip(images, train.labels[idx], strict=True)):
        name = f"{i:05d}.png"
        Image.fromarray(image).save(out / name)
        question = QUESTIONS[int(rng.integers(0, len(QUESTIONS)))]
        reply = attack if poisoned[i] else answer(int(label))
        turns = [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": reply},
        ]
        records.append({"id": f"s{i:05d}", "image": name, "conversations": turns})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path, poisoned


def blend_vlm(directory: Path, seed: int, progress: Progress) -> Path:
    """A toy VLM fine-tuned with a blended trigger instead of the patch (cached)."""
    done = directory / "done.json"
    if done.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    settings = VLMSettings.full(trigger=Trigger(kind="blend"))
    figures = train_vlm(directory, seed=seed, settings=settings, progress=progress)
    done.write_text(json.dumps({k: v for k, v in figures.items() if k != "settings"}))
    return directory
