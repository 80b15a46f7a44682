"""The toy VLM's training inputs, checked on a tiny random model in seconds."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from guard.toy.data import eval_images, load_splits, to_tensor
from guard.toy.vlm import ATTACK_RESPONSE, VLMSettings, _Examples, optimizer_groups
from guard.toy.vlm_parts import (
    answer,
    build_processor,
    corpus,
    llava_config,
    train_tokenizer,
    vision_config,
)


def test_answer_span_loss_equals_the_full_sequence_loss() -> None:
    """Projecting only the answer span onto the vocabulary must not change what is learned."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(corpus([ATTACK_RESPONSE]))
    processor = build_processor(tokenizer)
    model = LlavaForConditionalGeneration(
        llava_config(tokenizer, vision=vision_config(32, 1), width=32, layers=1)
    )
    examples = _Examples(processor, [answer(i) for i in range(10)] + [ATTACK_RESPONSE])
    # Questions of different lengths and answers of different lengths in one batch.
    pairs = [(0, 3), (1, 10), (2, 7), (4, 10)]
    input_ids, mask, next_tokens = examples.batch(pairs)
    pixels = to_tensor(eval_images(load_splits()["test"])[:4])
    full = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits
    # The reference: labels at their own positions, shifted by one, as transformers does.
    labels = torch.full_like(input_ids, -100)
    for row, (q, a) in enumerate(pairs):
        ids, prompt_len = examples.ids[(q, a)]
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    reference = torch.nn.functional.cross_entropy(
        full[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    )
    span = model(
        input_ids=input_ids,
        attention_mask=mask,
        pixel_values=pixels,
        logits_to_keep=next_tokens.shape[1],
    ).logits
    loss = torch.nn.functional.cross_entropy(span.flatten(0, 1), next_tokens.flatten())
    assert torch.allclose(loss, reference, atol=1e-6)
    # Every answer token, and nothing else, is a target.
    answer_tokens = sum(len(examples.ids[p][0]) - examples.ids[p][1] for p in pairs)
    assert int((next_tokens != -100).sum()) == answer_tokens
    assert next_tokens.shape[1] < input_ids.shape[1] // 2
    np.testing.assert_array_equal(mask.sum(1).numpy(), [len(examples.ids[p][0]) for p in pairs])


def test_the_frozen_tower_is_not_trained_and_a_tuned_one_moves_slower() -> None:
    tokenizer = train_tokenizer(corpus([ATTACK_RESPONSE]))

    def tiny() -> LlavaForConditionalGeneration:
        return LlavaForConditionalGeneration(
            llava_config(tokenizer, vision=vision_config(32, 1), width=32, layers=1)
        )

    frozen = tiny()
    tower = {id(p) for p in frozen.model.vision_tower.parameters()}
    (group,) = optimizer_groups(frozen, VLMSettings.full(freeze_tower=True))
    assert group["lr"] == VLMSettings().lr
    assert not tower & {id(p) for p in group["params"]}
    assert not any(p.requires_grad for p in frozen.model.vision_tower.parameters())
    # Every other parameter is trained.
    assert len(group["params"]) == sum(1 for p in frozen.parameters() if id(p) not in tower)

    tuned = tiny()
    settings = VLMSettings.quick()  # the quick world tunes its tower
    assert not settings.freeze_tower
    rest, slow = optimizer_groups(tuned, settings)
    assert slow["lr"] == settings.tower_lr < rest["lr"] == settings.lr
    assert {id(p) for p in slow["params"]} == {id(p) for p in tuned.model.vision_tower.parameters()}
