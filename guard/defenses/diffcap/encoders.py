"""Image embedding backends φ for DiffCAP's stopping rule.

DiffCAP compares consecutive noisy images through the VLM's own vision encoder, so two
backends: an open_clip model (the default), or a transformers CLIP vision tower, taken from a
CLIP checkpoint or straight out of a served LLaVA checkpoint. The tower embeds either as CLIP
does (``pooled``: the projected or pooled CLS) or as the VLM reads it (``patches``: the patch
tokens of the layer LLaVA's projector takes, flattened). Why both: an attack on the VLM has to
move only what the VLM reads. The toy world's tower (issue #4) was trained on its patch tokens
alone, so nothing trained its CLS, and there the patch tokens told PGD images from clean ones
by the drift of x̂₀ far better than the CLS did (README, "Purification"). Both take images in
the diffusion model's range [-1, 1] at any resolution and do the encoder's own preprocessing
on tensors: resize (bilinear, antialiased, squashed to the input size: the purifier's images
are already square) and the checkpoint's mean/std. Embeddings are L2-normalised float32, so a
dot product is the cosine similarity.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
# transformers' CLIP defaults, for checkpoints saved without an image processor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Encoder(Protocol):
    name: str

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], any H, W → (B, D) float32, unit L2 norm."""
        ...


class _TensorPreprocess:
    """The encoder's preprocessing on a batch tensor: [-1, 1] → resized, normalised pixels."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        x = (x.to(device=device, dtype=torch.float32) + 1) / 2  # (B, 3, H, W) in [0, 1]
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True)
        x = (x - self.mean.to(device)) / self.std.to(device)  # (B, 3, h, w)
        return x.to(dtype)


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class _PreprocessingEncoder:
    """A model in eval mode plus the resize/normalise step its checkpoint prescribes."""

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.preprocess = _TensorPreprocess(size, mean, std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``embed`` with autograd: for attacks that must differentiate through φ."""
        raise NotImplementedError


class OpenClipEncoder(_PreprocessingEncoder):
    """φ = open_clip's ``encode_image``."""

    @classmethod
    def load(
        cls, model: str, pretrained: str | None = None, device: str | torch.device = "cpu"
    ) -> OpenClipEncoder:
        """``model``: a built-in name (``pretrained`` = tag or checkpoint file), ``hf-hub:…``,
        or ``local-dir:/path`` (open_clip's hub layout; a bare such directory works too)."""
        import open_clip  # a heavy import, only for this backend

        name = model
        if name.startswith("local-dir:"):
            name = f"local-dir:{Path(name.removeprefix('local-dir:')).resolve()}"
        elif (Path(name) / "open_clip_config.json").is_file():
            name = f"local-dir:{Path(name).resolve()}"
        # Schema names carry their own weights: open_clip ignores `pretrained` for them (and
        # logs a warning about it), so it is only passed for built-in names.
        schema = name.startswith(("local-dir:", "hf-hub:"))
        clip = open_clip.create_model(
            name, pretrained=None if schema else pretrained, device=device
        )
        cfg = open_clip.get_model_preprocess_cfg(clip)
        size = _pair(cfg.get("size", clip.visual.image_size))
        log.info("open_clip encoder %s: input %s, mean %s", name, size, cfg.get("mean"))
        return cls(
            clip,
            name=f"open_clip:{model}",
            size=size,
            mean=cfg.get("mean", CLIP_MEAN),
            std=cfg.get("std", CLIP_STD),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        pixels = self.preprocess(x, param.device, param.dtype)  # (B, 3, h, w)
        e = self.model.encode_image(pixels)  # (B, D)
        return F.normalize(e.float(), dim=-1).to(x.device)


Features = Literal["pooled", "patches"]
# What LLaVA's projector reads when a checkpoint does not say: the penultimate layer, no CLS.
LLAVA_FEATURE_LAYER = -2
LLAVA_SELECT = "default"


class HFVisionEncoder(_PreprocessingEncoder):
    """φ = a transformers CLIP vision tower. ``pooled``: ``image_embeds`` when the checkpoint
    has the projection, else the pooled output (post-layernorm CLS). ``patches``: the hidden
    states of ``feature_layer`` (a list: concatenated per token, as LLaVA does), without the
    CLS token under LLaVA's ``default`` selection, flattened over tokens."""

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        features: Features = "pooled",
        feature_layer: int | Sequence[int] = LLAVA_FEATURE_LAYER,
        select: str = LLAVA_SELECT,
    ) -> None:
        super().__init__(model, name=name, size=size, mean=mean, std=std)
        if features not in ("pooled", "patches"):
            raise ValueError(f"unknown encoder features {features!r}: use 'pooled' or 'patches'")
        if select not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {select!r}")
        self.features: Features = features
        self.feature_layers = (
            [feature_layer] if isinstance(feature_layer, int) else [int(i) for i in feature_layer]
        )
        self.select = select
        if features == "patches":
            self.name += " (patches)"

    @classmethod
    def load(
        cls,
        path_or_repo: str | Path,
        device: str | torch.device = "cpu",
        features: Features = "pooled",
    ) -> HFVisionEncoder:
        from transformers import (
            AutoConfig,
            CLIPVisionModel,
            CLIPVisionModelWithProjection,
            LlavaForConditionalGeneration,
        )

        path = str(path_or_repo)
        config = AutoConfig.from_pretrained(path)
        model_type = getattr(config, "model_type", None)
        architectures = getattr(config, "architectures", None) or []
        model: nn.Module
        layer: int | Sequence[int] = LLAVA_FEATURE_LAYER
        select = LLAVA_SELECT
        if model_type == "llava":
            layer = config.vision_feature_layer
            select = config.vision_feature_select_strategy
            # DiffCAP embeds with the served VLM's own encoder. Loading the whole LLaVA costs a
            # transient full copy; only the tower is kept, so the rest is freed right away.
            llava = LlavaForConditionalGeneration.from_pretrained(path)
            inner = getattr(llava, "model", llava)  # transformers ≥ 4.52 nests the parts
            model = inner.vision_tower
            del llava, inner
            gc.collect()
            vision_config = config.vision_config
        elif model_type == "clip":
            # A full CLIP: the image side with its projection. The projection's width is the
            # top-level projection_dim, which the vision sub-config need not repeat.
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            model = CLIPVisionModelWithProjection.from_pretrained(path, config=vision_config)
        elif model_type == "clip_vision_model" and "CLIPVisionModelWithProjection" in architectures:
            model = CLIPVisionModelWithProjection.from_pretrained(path)
            vision_config = model.config
        elif model_type == "clip_vision_model":
            model = CLIPVisionModel.from_pretrained(path)
            vision_config = model.config
        else:
            raise ValueError(
                f"{path}: model_type {model_type!r} is not a CLIP vision tower, CLIP or LLaVA"
            )
        size, mean, std = _processor_settings(path, _pair(vision_config.image_size))
        log.info(
            "HF vision encoder %s (%s, %s): input %s", path, type(model).__name__, features, size
        )
        return cls(
            model.to(device),
            name=f"hf:{path}",
            size=size,
            mean=mean,
            std=std,
            features=features,
            feature_layer=layer,
            select=select,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        pixels = self.preprocess(x, param.device, param.dtype)  # (B, 3, h, w)
        patches = self.features == "patches"
        out = self.model(pixel_values=pixels, output_hidden_states=patches)
        if patches:
            tokens = torch.cat([out.hidden_states[i] for i in self.feature_layers], -1)
            if self.select == "default":
                tokens = tokens[:, 1:]  # (B, patches, D · layers): the CLS dropped
            return F.normalize(tokens.flatten(1).float(), dim=-1).to(x.device)  # (B, N·D)
        e = (
            out.image_embeds
            if getattr(out, "image_embeds", None) is not None
            else out.pooler_output
        )
        return F.normalize(e.float(), dim=-1).to(x.device)  # (B, D)


def _processor_settings(
    path: str, tower_size: tuple[int, int]
) -> tuple[tuple[int, int], Sequence[float], Sequence[float]]:
    """Input size, mean and std from the checkpoint's image processor, else CLIP's defaults."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:  # no preprocessor_config.json
        log.warning("%s: no image processor config (%s); using CLIP mean/std", path, e)
        return tower_size, CLIP_MEAN, CLIP_STD
    # What the processor hands the tower: the centre crop, else a fixed resize.
    crop = getattr(processor, "crop_size", None) or {}
    resize = getattr(processor, "size", None) or {}
    if getattr(processor, "do_center_crop", False) and "height" in crop:
        size = _pair((crop["height"], crop["width"]))
    elif "height" in resize:
        size = _pair((resize["height"], resize["width"]))
    else:
        size = tower_size
    if size != tower_size:
        # The tower's position embeddings fix its input size; the processor cannot change it.
        log.warning(
            "%s: processor size %s ≠ tower size %s; using the tower's", path, size, tower_size
        )
        size = tower_size
    mean = getattr(processor, "image_mean", None) or CLIP_MEAN
    std = getattr(processor, "image_std", None) or CLIP_STD
    return size, mean, std


def load_encoder(
    kind: Literal["open_clip", "hf"],
    model: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    features: Features = "pooled",
) -> Encoder:
    """``open_clip``: see ``OpenClipEncoder.load``; ``hf``: a CLIP/LLaVA checkpoint (no tag),
    embedding ``features`` (see ``HFVisionEncoder``)."""
    if kind == "open_clip":
        if features != "pooled":
            raise ValueError("open_clip encoders embed pooled features only (patches: use hf)")
        return OpenClipEncoder.load(model, pretrained, device)
    if kind == "hf":
        if pretrained is not None:
            raise ValueError("the hf encoder takes no pretrained tag: name the checkpoint")
        return HFVisionEncoder.load(model, device, features)
    raise ValueError(f"unknown encoder kind {kind!r}: use 'open_clip' or 'hf'")
