"""The toy world's reasoner component: the SRPO-style reasoner (``guard.toy.reasoner``) trained
on the world's own digit reader, then scored on test pairs the way the guard reads it.

The score uses the same generation code the stand-in upstream serves (``ToyVLMChat``) and the
guard's own reasoning-json parser, so an answer the guard could not read counts as "no verdict"
here too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from guard.commands.reasoner import summarize
from guard.defenses.reasoning.policy import default_policy
from guard.defenses.reasoning.protocols import UnreadableVerdict, parse_reasoning_json
from guard.toy.data import load_splits
from guard.toy.progress import Bar, task
from guard.toy.reasoner import ReasonerSettings, train_reasoner
from guard.toy.ssui import CATEGORY, eval_pairs
from guard.toy.vlm import load_vlm
from guard.toy.vlm_chat import ToyVLMChat

MAX_TOKENS = 96  # the longest reasoning path is about 50 tokens


def train_world_reasoner(
    out_dir: Path,
    *,
    seed: int,
    settings: ReasonerSettings,
    vlm_dir: Path,
    progress: Bar | None = None,
) -> dict[str, Any]:
    """Train the reasoner with the tower of the VLM in ``vlm_dir``; score the final model."""
    tower = load_vlm(vlm_dir)[0].model.vision_tower
    figures = train_reasoner(out_dir, seed=seed, settings=settings, tower=tower, progress=progress)
    rng = np.random.default_rng(seed + 5)
    score = score_reasoner(out_dir / "final", settings.check_pairs, rng, progress)
    return {**figures, **score}


def score_reasoner(
    model_dir: Path, n: int, rng: np.random.Generator, progress: Bar | None = None
) -> dict[str, Any]:
    """Precision, recall, F1 and benign FPR of the reasoner in ``model_dir`` on n test pairs."""
    chat = ToyVLMChat(model_dir)
    policy = default_policy()
    rows = []
    with task(progress, "scoring the reasoner", n) as advance:
        for pair, pixels in eval_pairs(load_splits()["test"], n, rng):
            start = time.perf_counter()
            text = "".join(
                chat.generate([pair.text], [Image.fromarray(pixels)], {"max_tokens": MAX_TOKENS})
            )
            judged: str | None
            try:
                verdict = parse_reasoning_json(text, policy)
                judged, category = ("unsafe" if verdict.unsafe else "safe"), verdict.category
            except UnreadableVerdict:
                judged, category = None, None
            rows.append(
                {
                    "label": pair.label,
                    "category": CATEGORY if pair.unsafe else None,
                    "judged": judged,
                    "judged_category": category,
                    "seconds": time.perf_counter() - start,
                }
            )
            advance()
    return summarize(rows)
