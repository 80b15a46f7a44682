"""The benchmark's inputs: test images clean and triggered, and (optionally) a second VLM
fine-tuned with a blended trigger. The poisoned fine-tuning set is guard.toy.backdoor's."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from rich.progress import Progress

from guard.toy.data import eval_images, load_splits
from guard.toy.ssui import all_pairs
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


def arithmetic_prompts(n: int) -> list[str]:
    """n harmless arithmetic prompts about the n first test images' digits (the demo's kind)."""
    labels = load_splits()["test"].labels[:n]
    benign = [p for p in all_pairs() if not p.unsafe and p.operand > 0]
    by_digit = {d: [p.text for p in benign if p.digit == d] for d in range(10)}
    return [by_digit[int(d)][i % len(by_digit[int(d)])] for i, d in enumerate(labels)]


def blend_vlm(directory: Path, progress: Progress) -> Path:
    """A toy VLM fine-tuned with a blended trigger instead of the patch (one thread)."""
    return cached_vlm(directory, VLMSettings.full(trigger=Trigger(kind="blend")), 1, progress)


def cached_vlm(directory: Path, settings: VLMSettings, threads: int, progress: Progress) -> Path:
    """A toy VLM trained with ``settings`` (seed 0) on ``threads`` torch threads, cached in
    ``directory`` and trained again when any of these change."""
    key = json.loads(json.dumps({"seed": 0, "threads": threads, **asdict(settings)}, default=str))
    done = directory / "done.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        figures = train_vlm(directory, seed=0, settings=settings, progress=progress)
    finally:
        torch.set_num_threads(before)
    record = {k: v for k, v in figures.items() if k != "settings"}
    done.write_text(json.dumps({**record, "key": key}))
    return directory
