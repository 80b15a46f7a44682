"""Tiny seeded models saved in their libraries' native formats, for the DiffCAP and backdoor
tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from open_clip.model import set_model_preprocess_cfg

from guard.toy.clip import ClipSettings, build_clip, preprocess_config, save_clip

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)  # not 0.5, so ignoring them would show
CLIP = ClipSettings(embed_dim=16, vision_width=32, vision_layers=1, vision_head_width=16)


def save_tiny_ddpm(path: Path) -> UNet2DModel:
    """A tiny random DDPM (16×16) saved as a DDPMPipeline directory at ``path``."""
    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    unet = UNet2DModel(sample_size=16, block_out_channels=(8, 16), norm_num_groups=4, **blocks)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(path)
    return unet


def save_tiny_open_clip(path: Path) -> Any:
    """A tiny random open_clip CLIP saved as an open_clip local directory at ``path``."""
    torch.manual_seed(0)
    model = build_clip(CLIP).eval()
    set_model_preprocess_cfg(model, {**preprocess_config(), "mean": MEAN, "std": STD})
    save_clip(model, CLIP, path)
    return model


class PixelEncoder:
    """φ = the flattened pixels, L2-normalised: similarity tracks the noise, not a model.
    Records the batch size of every call, so tests see the encoder work actually done."""

    name = "pixels"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return F.normalize(x.flatten(1).float(), dim=-1)  # (B, 3·H·W)


@contextmanager
def unet_calls(unet: UNet2DModel) -> Iterator[list[torch.Tensor]]:
    """Record the timestep tensor of every UNet forward (by wrapping ``unet.forward``)."""
    calls: list[torch.Tensor] = []
    forward = unet.forward

    def counting(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(torch.as_tensor(timestep).clone())
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = counting
    try:
        yield calls
    finally:
        del unet.forward  # back to the class's method


def save_tiny_llava(path: Path, *, layers: int = 3, seed: int = 0) -> Any:
    """A tiny random LLaVA (8-px patches: 16 image tokens) + processor saved at ``path``;
    returns the model loaded back with eager attention (full maps, to check the monitor's rows
    against)."""
    from transformers import LlavaForConditionalGeneration

    from guard.toy.vlm_parts import build_processor, corpus, llava_config, train_tokenizer
    from guard.toy.vlm_parts import vision_config as tiny_vision_config

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus(), vocab_size=300)
    vision = tiny_vision_config(width=32, layers=1, patch=8)
    model = LlavaForConditionalGeneration(
        llava_config(tokenizer, vision=vision, width=32, layers=layers)
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    build_processor(tokenizer, patch=8).save_pretrained(path)
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def save_tiny_llava_next(path: Path, *, layers: int = 2, seed: int = 0) -> Any:
    """A tiny random LLaVA-NeXT saved at ``path``: each image is tiled by its aspect ratio
    (pinpoints 32×32, 32×64, 64×32 of 8-px patches), so images of different shapes get
    different numbers of image tokens. Returned loaded back with eager attention."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from guard.toy.vlm_parts import CHAT_TEMPLATE, corpus, llava_config, train_tokenizer
    from guard.toy.vlm_parts import vision_config as tiny_vision_config

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus(), vocab_size=300)
    base = llava_config(
        tokenizer, vision=tiny_vision_config(width=32, layers=1, patch=8), width=32, layers=layers
    )
    # Wider initial weights than the default 0.02: attention far from uniform, so an entropy
    # taken over the wrong tokens cannot pass for the right one.
    base.text_config.initializer_range = 0.3
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=base.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    images = LlavaNextImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=pinpoints,
        image_mean=MEAN,
        image_std=STD,
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return LlavaNextForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
