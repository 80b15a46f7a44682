"""The toy reasoner's training at tiny scale: SFT then DPO run, save servable checkpoints,
and the preference step moves the policy towards the safe reasoning paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guard.toy.reasoner import (
    ReasonerSettings,
    _answer_logprob,
    _Batches,
    prompt_ids,
    train_reasoner,
)
from guard.toy.ssui import all_pairs
from guard.toy.vlm_chat import ToyVLMChat
from tests.images import gradient

TINY = ReasonerSettings(
    width=32, layers=1, patch=8, sft_steps=3, batch=4, dpo_steps=4, dpo_batch=2, dpo_lr=1e-3
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: one torch thread (tests/conftest.py)."""


def test_training_saves_servable_sft_and_final_models(tmp_path: Path) -> None:
    figures = train_reasoner(tmp_path, seed=0, settings=TINY)
    # The preference step starts at the reference (margin 0) and widens the margin.
    assert figures["dpo_final_margin"] > 0
    for name in ("sft", "final"):
        chat = ToyVLMChat(tmp_path / name, name="judge")
        text = "".join(chat.generate(["Add 4 to the number in the image."], [gradient(32, 32)], {}))
        assert isinstance(text, str)
    sft = ToyVLMChat(tmp_path / "sft").model
    final = ToyVLMChat(tmp_path / "final").model
    changed = any(
        not torch.equal(a, b) for a, b in zip(sft.parameters(), final.parameters(), strict=True)
    )
    assert changed


def test_answer_log_probability_counts_only_the_answer(tmp_path: Path) -> None:
    train_reasoner(tmp_path, seed=0, settings=TINY)
    chat: Any = ToyVLMChat(tmp_path / "sft")
    pair = all_pairs()[5]
    batches = _Batches(chat.processor)
    ids, mask, targets = batches.rows([(pair, pair.answer())])
    prompt = prompt_ids(chat.processor, pair.text)
    assert int((targets != -100).sum()) == ids.shape[1] - len(prompt)  # every answer token
    pixels = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        total = _answer_logprob(chat.model, ids, mask, targets, pixels)
        logits = chat.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    logp = torch.log_softmax(logits.float(), -1)[0]
    by_hand = sum(logp[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1]))
    assert total.item() == pytest.approx(float(by_hand), abs=1e-4)
