"""The benchmark's inputs: test images clean and triggered, and (optionally) a second VLM
fine-tuned with a blended trigger. The poisoned fine-tuning set is guard.toy.backdoor's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from rich.progress import Progress

from guard.toy.data import eval_images, load_splits
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
