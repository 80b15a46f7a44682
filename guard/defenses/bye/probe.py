"""Attention entropy of the served model over the image (BYE, DESIGN.md §4.2).

One prefill of (image + prompt, no answer). In each watched decoder layer, a forward hook on
the self-attention module takes the last prompt token's attention row over the image tokens,
renormalises it and keeps only Shannon entropies: of the head average (BYE's signal) and of
each head alone, (B, 1 + heads) per layer. The model loaded by monitor.load_model computes
only that row, (B, heads, 1, T), beside SDPA's output (attention.py); an eager model builds the
(B, heads, T, T) map and frees it layer by layer, and the hook reads its last row. The hook
on the deepest watched layer ends the forward right after its attention, so neither that
layer's MLP nor the later layers nor the vocabulary projection are paid for.

Why single heads too: a trigger that fills one image token can be singled out by one head
while the average over heads blurs it (an 8-px toy VLM, issue #5: one head of the first layer
at AUROC 0.997, the best head average at 0.92).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from guard.defenses.bye import attention

log = logging.getLogger(__name__)
EPS = 1e-8  # BYE's: H = -Σ p ln(p + 1e-8)


class _Enough(Exception):
    """Raised by the hook on the deepest watched layer: the rest of the forward is not needed."""


@dataclass(frozen=True)
class Prefill:
    """A batch as the model takes it, and where its image tokens are."""

    inputs: dict[str, torch.Tensor]  # input_ids (B, T), attention_mask, pixel_values, …
    image_mask: torch.Tensor  # (B, T) bool: positions holding image tokens


def decoder_layers(model: Any) -> nn.ModuleList:
    """The language model's decoder layers (LLaVA-family models expose get_decoder())."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(m, "self_attn") for m in layers):
        raise ValueError(
            f"{type(model).__name__}: no decoder layers with self_attn found; the backdoor "
            "monitor needs a LLaVA-family model loaded with transformers"
        )
    return layers


def entropy(row: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of non-negative rows (…, N), each renormalised to sum 1."""
    p = row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    return -(p * (p + EPS).log()).sum(-1)


class EntropyProbe:
    """Entropies of the last prompt token's attention over the image, per watched layer."""

    def __init__(self, model: Any, processor: Any) -> None:  # a transformers PreTrainedModel
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation not in ("eager", attention.NAME):
            # sdpa/flash kernels never materialise attention probabilities for a hook to read.
            raise ValueError(
                f"the backdoor monitor needs attention weights, got {implementation!r}; load "
                "the model with guard.defenses.bye.monitor.load_model, or with "
                "attn_implementation='eager'"
            )
        self.model: Any = model.eval()
        self.processor = processor
        self.layers = decoder_layers(model)
        self.image_token_id = int(model.config.image_token_id)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Prefill:
        """The processor's batch for one image and one user text per row, left-padded so that
        every row's last position is its last prompt token."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        texts = [self._chat(p) for p in prompts]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = self.processor(
                images=[im.convert("RGB") for im in images],
                text=texts,
                return_tensors="pt",
                padding=True,
            )
        finally:
            tokenizer.padding_side = side
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        mask = inputs["input_ids"] == self.image_token_id  # (B, T)
        if not bool(mask.any(-1).all()):
            raise ValueError("a prompt lost its image tokens (truncated?)")
        return Prefill(inputs, mask)

    def entropies(self, batch: Prefill, layers: Sequence[int] | None = None) -> torch.Tensor:
        """(B, len(layers)) head-averaged entropies in nats, for ``layers`` (default: all)."""
        return self.signals(batch, layers)[..., 0]

    @torch.inference_mode()
    def signals(self, batch: Prefill, layers: Sequence[int] | None = None) -> torch.Tensor:
        """(B, len(layers), 1 + heads) entropies in nats for ``layers`` (default: all), in that
        order: column 0 of the head-averaged row, column 1 + h of head h's own row."""
        watched = list(range(self.num_layers)) if layers is None else list(layers)
        if not watched or not all(0 <= i < self.num_layers for i in watched):
            raise ValueError(f"layers must be in [0, {self.num_layers}), got {watched}")
        found: dict[int, torch.Tensor] = {}
        with self._hooks(batch.image_mask, set(watched), found), suppress(_Enough):
            self.model(**batch.inputs, use_cache=False)
        return torch.stack([found[i] for i in watched], dim=1).float().cpu()

    def _chat(self, prompt: str) -> str:
        # A placeholder typed by the user would become a second image slot and fail the
        # prefill: a request could then switch the monitor off wherever it fails open.
        placeholder = getattr(self.processor, "image_token", None)
        if placeholder:
            prompt = prompt.replace(placeholder, " ")
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text: str = self.processor.apply_chat_template(user, add_generation_prompt=True)
        return text

    @contextmanager
    def _hooks(
        self, image_mask: torch.Tensor, watched: set[int], found: dict[int, torch.Tensor]
    ) -> Iterator[None]:
        deepest = max(watched)
        keep_image = image_mask[:, None, :].float()  # (B, 1, T)

        def keep(index: int) -> Any:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError(f"layer {index}: attention weights were not returned")
                # (B, heads, T, T) from eager, (B, heads, 1, T) from attention.NAME
                last = weights[:, :, -1, :].float()  # (B, heads, T): the last prompt token
                # Each row's own image positions, zero elsewhere: left padding moves them, and
                # rows may hold different numbers of image tokens (LLaVA-NeXT tiles each image
                # by its size). A zero adds nothing to the entropy of the renormalised row.
                image = last * keep_image  # (B, heads, T)
                rows = torch.cat([image.mean(1, keepdim=True), image], dim=1)  # (B, 1 + H, T)
                found[index] = entropy(rows)  # (B, 1 + heads)
                if index == deepest:
                    raise _Enough  # not even this layer's MLP is needed

            return hook

        attention: dict[int, Any] = {i: self.layers[i].self_attn for i in watched}
        handles = [module.register_forward_hook(keep(i)) for i, module in attention.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
