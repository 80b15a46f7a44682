"""An attention implementation for the monitored model: SDPA for the output, plus each head's
attention row of the last query position, computed exactly as eager attention computes it.

Why: the entropy probe needs only that row (DESIGN.md §4.2), but eager attention builds the
whole (B, heads, T, T) map in every layer and runs slower than SDPA. For a LLaVA-NeXT-7B
prompt of ~2,900 tokens that map is ~0.5 GB per row and layer in fp16. Here a layer returns
(B, heads, 1, T) as its attention weights; the probe's hooks read them as they read eager's
maps, and the layer's output is SDPA's.

Registered with transformers' attention and mask interfaces; where a release lacks them,
:func:`implementation` answers "eager" and the probe reads eager's full maps.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "vlm_guard_last_row"


def implementation() -> str:
    """The attn_implementation to load the monitored model with: this one, or "eager"."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return "eager"

    def last_row(
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, heads, T, d)
        key: torch.Tensor,  # (B, kv_heads, S, d)
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,  # (B, 1, T, S): bool (keep) or additive float
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs.pop("output_attentions", None)  # SDPA warns about it; this returns the row
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        return out, last_row_weights(query, key, attention_mask, scaling)

    AttentionInterface.register(NAME, last_row)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # SDPA's masks: what the output needs
    return NAME


def last_row_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
) -> torch.Tensor:
    """(B, heads, 1, S) softmax(q·kᵀ·scaling + mask) for the last query position, in float32
    then the query's dtype, as eager attention does."""
    groups = query.shape[1] // key.shape[1]  # grouped-query attention shares key heads
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # (B, heads, S, d)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query[:, :, -1:, :], keys.transpose(2, 3)) * scale  # (B, heads, 1, S)
    if attention_mask is not None:
        # SDPA's mask may be None (plain causal: the last position sees every key) or (B, 1, T, S).
        mask = attention_mask[:, :, -1:, : keys.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
