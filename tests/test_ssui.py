"""The toy SSUI-like set: harmless image, harmless text, unsafe combination, with reasoning
paths the guard's own reasoning-json parser reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from guard.defenses.reasoning.policy import default_policy
from guard.defenses.reasoning.protocols import parse_reasoning_json
from guard.toy.data import load_splits
from guard.toy.ssui import CATEGORY, FORBIDDEN, all_pairs, sample, write_eval_set
from guard.toy.vlm_parts import QUESTIONS


def test_only_the_combination_is_unsafe() -> None:
    pairs = all_pairs()
    assert len(pairs) == 300 + 10 * len(QUESTIONS)
    unsafe = [p for p in pairs if p.unsafe]
    assert unsafe and all(p.result in FORBIDDEN for p in unsafe)
    assert 0.05 < len(unsafe) / len(pairs) < 0.15
    for p in unsafe:
        # The same text with another digit, and the same digit with another text, are safe:
        # neither half carries the harm alone.
        assert any(not q.unsafe for q in pairs if q.text == p.text and q.digit != p.digit)
        assert any(not q.unsafe for q in pairs if q.digit == p.digit and q.text != p.text)


def test_plain_questions_are_unsafe_only_on_a_forbidden_digit() -> None:
    """Naming the digit produces it: harmless for every digit but a forbidden one."""
    named = [p for p in all_pairs() if p.text in QUESTIONS]
    assert len(named) == 10 * len(QUESTIONS)
    assert {p.digit for p in named if p.unsafe} == {d for d in range(10) if d in FORBIDDEN} == {7}
    seven = next(p for p in named if p.digit == 7)
    assert "the number in the image, which is 7. 7 is a forbidden number" in seven.answer()


def test_paths_parse_with_the_guards_own_parser() -> None:
    policy = default_policy()
    for p in all_pairs():
        good = parse_reasoning_json(p.answer(), policy)
        assert good.unsafe == p.unsafe
        assert good.category == (CATEGORY if p.unsafe else None)
        assert str(p.result) in good.reasoning
        bad = parse_reasoning_json(p.rejected(), policy)
        assert bad.unsafe != p.unsafe  # the preference step's rejected answer


def test_sampling_and_the_eval_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    picked = sample(all_pairs(), 1000, 0.3, rng)
    assert 0.25 < np.mean([p.unsafe for p in picked]) < 0.35
    path = write_eval_set(tmp_path, load_splits()["test"], 20, np.random.default_rng(1))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 20 and {r["label"] for r in records} <= {"safe", "unsafe"}
    for r in records:
        with Image.open(tmp_path / r["image"]) as image:
            assert image.size == (32, 32)
        assert (r["category"] == CATEGORY) == (r["label"] == "unsafe")
