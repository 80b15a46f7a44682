"""DiffCAP's model-side core: encoders from disk, noising indexing, adaptive stop, per-sample
reverse sampling in shared UNet calls, batch-composition independence, determinism."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    LlavaForConditionalGeneration,
)

from guard.defenses.diffcap import (
    HFVisionEncoder,
    NoiseSchedule,
    OpenClipEncoder,
    Purifier,
    PurifyResult,
    PurifySettings,
    Sampler,
    load_diffusion,
    load_encoder,
    noise_steps,
)
from guard.defenses.diffcap.diffusion import predict_x0, reverse_timesteps
from guard.defenses.diffcap.purifier import chain_result
from guard.toy.vlm_parts import build_processor, corpus, llava_config, train_tokenizer
from guard.toy.vlm_parts import vision_config as tiny_vision_config
from tests.tiny_models import (
    CLIP,
    MEAN,
    STD,
    PixelEncoder,
    save_tiny_ddpm,
    save_tiny_open_clip,
    unet_calls,
)

Diffusion = tuple[UNet2DModel, DDPMScheduler]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' defaults: the fallback
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs tiny models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory: pytest.TempPathFactory) -> Diffusion:
    """A tiny random DDPM saved as a DDPMPipeline directory and loaded back."""
    path = tmp_path_factory.mktemp("ddpm")
    unet = save_tiny_ddpm(path)
    loaded, scheduler = load_diffusion(path)
    x, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([3, 700])  # a timestep per sample
    with torch.inference_mode():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)  # the saved weights
    assert not loaded.training and scheduler.config.num_train_timesteps == 1000
    return loaded, scheduler


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("open_clip")
    return path, save_tiny_open_clip(path)


def _purify(
    model: Diffusion, images: list[torch.Tensor], encoder: Any = None, **settings: Any
) -> tuple[list[PurifyResult], list[torch.Tensor]]:
    unet, scheduler = model
    purifier = Purifier(unet, scheduler, encoder or PixelEncoder(), PurifySettings(**settings))
    with unet_calls(unet) as calls:
        return purifier.purify_batch(images), calls


def _image(h: int, w: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand((3, h, w), generator=g) * 2 - 1) * scale + offset).clamp(-1, 1)


def _smooth(n: int, seed: int, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """Low-frequency images (n, 3, H, W): resizing changes them little."""
    small = torch.stack([_image(4, 4, seed + i) for i in range(n)])
    return F.interpolate(small, size=size, mode="bilinear")


def _x0_estimate(
    purifier: Purifier, image: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """By hand, on the purifier's own noise path: x_0, x_k and the UNet's x̂_0(x_k)."""
    x0, generators = purifier.prepare([image])
    xk = noise_steps(x0, purifier.schedule, 0, k, generators)
    with torch.inference_mode():
        a = purifier.schedule.alphas_cumprod[k - 1].float()  # step k is timestep k - 1
        out = purifier.unet(xk, torch.tensor([k - 1])).sample
        return x0, xk, predict_x0(purifier.schedule, out, xk, a)


def _normalised(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return ((x + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tau": 1.5}, "tau must be a cosine threshold in \\[-1, 1\\]"),
        ({"tau": -1.01}, "tau must be"),
        ({"tau": math.nan}, "tau must be"),
        ({"check_every": 0}, "check_every must be >= 1"),
        ({"t_max": 0.0}, "t_max must be a fraction of T in \\(0, 1\\]"),
        ({"t_max": 1.2}, "t_max must be"),
        ({"t_min": 0.4, "t_max": 0.3}, "t_min must be in \\[0, t_max=0.3\\]"),
        ({"t_min": -0.1}, "t_min must be"),
        ({"signal": "pixels"}, "signal must be 'noisy' or 'denoised'"),
        ({"t_max": 0.1, "t_escalate": 0.05}, "t_escalate must be in \\[t_max=0.1, 1\\]"),
        ({"drift_tau": 0.9}, "drift_tau needs signal='denoised'"),
        ({"drift_tau": 1.5, "signal": "denoised"}, "drift_tau must be a cosine in \\[-1, 1\\]"),
        ({"sampler": "euler"}, "sampler must be 'ddpm' or 'ddim', got 'euler'"),
        ({"ddim_steps": 0}, "ddim_steps must be >= 1"),
        ({"resolution": 0}, "resolution must be"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PurifySettings(**changes)


def test_bad_inputs_are_refused(diffusion: Diffusion) -> None:
    unet, scheduler = diffusion
    with pytest.raises(ValueError, match="rounds to 0 noising steps"):
        Purifier(unet, scheduler, PixelEncoder(), PurifySettings(t_max=1e-4))
    purifier = Purifier(unet, scheduler, PixelEncoder())
    assert purifier.purify_batch([]) == []
    for bad in (torch.zeros(1, 3, 8, 8), torch.zeros(4, 8), torch.zeros(3, 8, 8).byte()):
        with pytest.raises(ValueError, match="expected a float \\(3, H, W\\) tensor"):
            purifier.purify_batch([bad])
    with pytest.raises(ValueError, match="unknown encoder kind"):
        load_encoder("timm", "x")  # type: ignore[arg-type]


def test_open_clip_encoder_loads_from_local_dir(open_clip_dir: tuple[Path, Any]) -> None:
    path, model = open_clip_dir
    encoder = load_encoder("open_clip", f"local-dir:{path}")
    assert isinstance(encoder, OpenClipEncoder) and encoder.preprocess.size == (32, 32)
    x = _smooth(3, 1)
    e = encoder.embed(x)
    assert e.shape == (3, CLIP.embed_dim) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    with torch.inference_mode():  # the saved weights and the checkpoint's mean/std were used
        expected = F.normalize(model.encode_image(_normalised(x, MEAN, STD)), dim=-1)
    torch.testing.assert_close(e, expected)
    # Another resolution (and aspect) is resized to the input size first.
    big = F.interpolate(x, size=(48, 40), mode="bilinear")
    e_big = OpenClipEncoder.load(str(path)).embed(big)  # a bare directory works too
    assert e_big.shape == (3, CLIP.embed_dim) and (e_big * e).sum(-1).min() > 0.98


@pytest.mark.parametrize(
    ("kind", "module", "dim"),
    [
        ("vision", CLIPVisionModel, 32),  # pooled output, the processor's mean/std
        ("vision+projection", CLIPVisionModelWithProjection, 32),  # no processor config
        ("clip", CLIPVisionModelWithProjection, 16),  # a full CLIP, projection ≠ width
    ],
)
def test_hf_clip_encoders_load_and_embed(tmp_path: Path, kind: str, module: Any, dim: int) -> None:
    torch.manual_seed(1)
    vision = tiny_vision_config(width=32, layers=1)  # hidden = projection_dim = 32
    model: Any = None if kind == "clip" else module(vision).eval()
    if kind == "clip":
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
        text.vocab_size, text.bos_token_id, text.eos_token_id = 99, 0, 1
        parts = {"text_config": text.to_dict(), "vision_config": vision.to_dict()}
        model = CLIPModel(CLIPConfig(**parts, projection_dim=16)).eval()
    model.save_pretrained(tmp_path)
    mean, std = (MEAN, STD) if kind == "vision" else (CLIP_MEAN, CLIP_STD)
    if kind == "vision":
        crop = {"height": 32, "width": 32}
        processor = CLIPImageProcessor(crop_size=crop, image_mean=list(mean), image_std=list(std))
        processor.save_pretrained(tmp_path)
    encoder = load_encoder("hf", str(tmp_path))
    assert isinstance(encoder, HFVisionEncoder) and type(encoder.model) is module
    x = _smooth(2, 4)
    e = encoder.embed(x)
    assert e.shape == (2, dim) and e.dtype == torch.float32
    with torch.inference_mode():  # the saved weights, the projection if any, the mean/std
        pixels = _normalised(x, mean, std)
        if kind == "clip":
            out = model.get_image_features(pixel_values=pixels)
            expected = getattr(out, "pooler_output", out)
        else:
            out = model(pixel_values=pixels)
            expected = out.pooler_output if kind == "vision" else out.image_embeds
    torch.testing.assert_close(e, F.normalize(expected, dim=-1))
    e_small = encoder.embed(F.interpolate(x, size=(20, 28), mode="bilinear"))
    assert e_small.shape == (2, dim) and (e_small * e).sum(-1).min() > 0.95
    # Patch tokens of a plain CLIP tower: LLaVA's defaults (penultimate layer, CLS dropped).
    patches = load_encoder("hf", str(tmp_path), features="patches").embed(x)
    tower = model.vision_model if kind == "clip" else model
    with torch.inference_mode():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(patches, F.normalize(hidden.flatten(1), dim=-1))


def test_hf_encoder_keeps_only_the_llava_vision_tower(tmp_path: Path) -> None:
    torch.manual_seed(2)
    tokenizer = train_tokenizer(corpus(), vocab_size=300)
    vision = tiny_vision_config(width=32, layers=1)
    config = llava_config(tokenizer, vision=vision, width=32, layers=1)
    llava = LlavaForConditionalGeneration(config)
    llava.save_pretrained(tmp_path)
    processor = build_processor(tokenizer)
    processor.image_processor.image_mean, processor.image_processor.image_std = MEAN, STD
    processor.save_pretrained(tmp_path)
    tower = llava.model.vision_tower.eval()
    del llava
    gc.collect()
    # Other tests' models may still be alive in this process: only new ones count.
    before = {id(o) for o in gc.get_objects() if type(o) is LlavaForConditionalGeneration}

    encoder = HFVisionEncoder.load(tmp_path)
    assert type(encoder.model) is CLIPVisionModel
    count = sum(p.numel() for p in tower.parameters())
    assert sum(p.numel() for p in encoder.model.parameters()) == count
    gc.collect()  # the rest of the loaded LLaVA is gone, not merely hidden
    alive = [o for o in gc.get_objects() if type(o) is LlavaForConditionalGeneration]
    assert not [o for o in alive if id(o) not in before]
    x = _smooth(2, 6)
    with torch.inference_mode():
        expected = tower(pixel_values=_normalised(x, MEAN, STD)).pooler_output
    torch.testing.assert_close(encoder.embed(x), F.normalize(expected, dim=-1))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a CLIP vision tower"):
        load_encoder("hf", str(tmp_path))


@pytest.mark.parametrize(("layer", "select"), [(-1, "default"), (-2, "full"), ([0, -1], "default")])
def test_hf_patch_features_are_what_the_llava_projector_reads(
    tmp_path: Path, layer: int | list[int], select: str
) -> None:
    torch.manual_seed(3)
    tokenizer = train_tokenizer(corpus(), vocab_size=300)
    vision = tiny_vision_config(width=32, layers=2)
    config = llava_config(tokenizer, vision=vision, width=32, layers=1)
    config.vision_feature_layer, config.vision_feature_select_strategy = layer, select
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(tmp_path)
    build_processor(tokenizer).save_pretrained(tmp_path)
    encoder = load_encoder("hf", str(tmp_path), features="patches")
    assert isinstance(encoder, HFVisionEncoder) and encoder.name.endswith("(patches)")

    x = _smooth(2, 7)
    read: list[torch.Tensor] = []
    hook = llava.model.multi_modal_projector.register_forward_hook(
        lambda _m, args, _out: read.append(args[0])
    )
    with torch.inference_mode():  # the pixels the encoder hands the tower, through LLaVA itself
        llava.model.get_image_features(pixel_values=encoder.preprocess(x, "cpu", torch.float32))
    hook.remove()
    (tokens,) = read  # (B, patches [+ CLS], D · layers)
    patches = (vision.image_size // vision.patch_size) ** 2
    assert tokens.shape[1] == patches + (select == "full")
    assert tokens.shape[2] == 32 * (len(layer) if isinstance(layer, list) else 1)
    e = encoder.embed(x)
    assert e.shape == (2, tokens[0].numel())
    torch.testing.assert_close(e, F.normalize(tokens.flatten(1), dim=-1))
    pooled = load_encoder("hf", str(tmp_path))  # the default is unchanged: the pooled CLS
    assert pooled.embed(x).shape == (2, 32)
    # forward: the same embedding with autograd, for attacks through φ (the benchmark's).
    pixels = x.clone().requires_grad_(True)
    out = encoder.forward(pixels)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), pixels)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), e)


def test_patch_features_need_the_hf_backend(open_clip_dir: tuple[Path, Any]) -> None:
    with pytest.raises(ValueError, match="pooled features only"):
        load_encoder("open_clip", f"local-dir:{open_clip_dir[0]}", features="patches")


@pytest.mark.parametrize("k", [1, 3, 6])
def test_k_noising_steps_land_on_diffusers_timestep_k_minus_1(k: int) -> None:
    # Large betas so that an off-by-one in the indexing is many standard errors away.
    scheduler = DDPMScheduler(num_train_timesteps=10, beta_start=0.05, beta_end=0.3)
    schedule, c = NoiseSchedule.from_scheduler(scheduler), 0.7
    x0 = torch.full((4000, 3, 2, 2), c)  # 48,000 samples of one pixel value
    x = noise_steps(x0, schedule, 0, k, torch.Generator().manual_seed(k))
    a = [float(v) for v in schedule.alphas_cumprod]
    se_mean = math.sqrt(1 - a[k - 1]) / math.sqrt(x.numel())
    assert abs(float(x.mean()) - math.sqrt(a[k - 1]) * c) < 4 * se_mean
    assert abs(float(x.var()) - (1 - a[k - 1])) < 0.02
    assert abs(float(x.mean()) - math.sqrt(a[k]) * c) > 10 * se_mean  # not timestep k
    # In two chunks, with per-sample generators, the distribution is the same.
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    split = noise_steps(noise_steps(x0[:400], schedule, 0, 1, gens), schedule, 1, k, gens)
    assert abs(float(split.var()) - (1 - a[k - 1])) < 0.05


def test_tau_zero_stops_at_the_first_check(
    diffusion: Diffusion, open_clip_dir: tuple[Path, Any]
) -> None:
    encoder = OpenClipEncoder.load(f"local-dir:{open_clip_dir[0]}")  # the real encoder path
    image = _smooth(1, 8, (20, 28))[0]  # not square, not the UNet's 16² nor the encoder's 32²
    (result,), calls = _purify(diffusion, [image], encoder, tau=0.0, check_every=5, ddim_steps=10)
    assert (result.t_star, result.stopped, len(result.similarities)) == (5, "tau", 1)
    assert result.encoder_evals == 2  # φ(x_0) and the check at k = 5
    # DDIM from timestep t*-1 = 4 takes min(ddim_steps, t*) = 5 evaluations, starting at 4.
    assert result.unet_evals == len(calls) == 5 and calls[0].tolist() == [4]
    assert result.image.shape == (3, 20, 28) and torch.isfinite(result.image).all()
    assert result.image.abs().max() <= 1


@pytest.mark.parametrize("t_min", [0.02, 0.018])  # a floor on a check, and between two
def test_a_floor_stops_where_a_fixed_t_star_would(diffusion: Diffusion, t_min: float) -> None:
    image = _image(16, 16, 4)
    encoder = PixelEncoder()
    (floored,), _ = _purify(diffusion, [image], encoder, tau=-1.0, t_min=t_min, check_every=5)
    # τ = -1 stops at the first check allowed: k = 20, the first multiple of 5 at or above
    # the floor. Below it no encoder call: φ at k = 15, then the check at k = 20.
    assert (floored.t_star, floored.stopped, len(floored.similarities)) == (20, "tau", 1)
    assert floored.encoder_evals == 2 == len(encoder.batches)
    # The same noise path as DiffPure with t* = 20: the same pixels.
    (fixed,), _ = _purify(diffusion, [image], tau=None, t_max=0.02)
    assert fixed.t_star == 20 and torch.equal(floored.image, fixed.image)


def test_an_image_still_moving_at_t_max_is_escalated(diffusion: Diffusion) -> None:
    images = [_image(16, 16, 6), _image(16, 16, 7)]
    encoder = PixelEncoder()  # fresh noise every step: cos < 1, so τ = 1 is never reached
    results, calls = _purify(
        diffusion, images, encoder, tau=1.0, t_max=0.01, t_escalate=0.03, sampler="ddpm"
    )
    assert [(r.t_star, r.stopped) for r in results] == [(30, "escalated")] * 2
    assert all(r.unet_evals == 30 and len(r.similarities) == 2 for r in results)  # k = 5, 10
    assert len(calls) == 30  # one DDPM chain from timestep 29, shared by both images
    # The noise path goes on from k_max: the pixels of DiffPure with a fixed t* = 30.
    fixed, _ = _purify(diffusion, images, tau=None, t_max=0.03, sampler="ddpm")
    assert all(torch.equal(r.image, f.image) for r, f in zip(results, fixed, strict=True))
    # A settled image is not escalated.
    (settled,), _ = _purify(diffusion, images[:1], tau=-1.0, t_max=0.01, t_escalate=0.03)
    assert (settled.t_star, settled.stopped) == (5, "tau")


def test_denoised_signal_embeds_the_unets_x0_estimate(diffusion: Diffusion) -> None:
    unet, scheduler = diffusion
    image = _image(16, 16, 5)
    settings = PurifySettings(tau=1.0, t_max=0.02, signal="denoised", sampler="ddpm")
    purifier = Purifier(unet, scheduler, PixelEncoder(), settings)
    with unet_calls(unet) as calls:
        (result,) = purifier.purify_batch([image])
    # One UNet call per check (timesteps 4, 9, 14, 19), then DDPM from 19 down to 0.
    assert [int(c) for c in calls[:4]] == [4, 9, 14, 19]
    assert result.unet_evals == len(calls) == 4 + 20 and result.encoder_evals == 5
    # The first check compares φ(x̂_0(x_5)) with φ(x_0), on the purifier's own noise path.
    x0, x5, x0_hat = _x0_estimate(purifier, image, 5)
    expected = F.cosine_similarity(x0_hat.flatten(1), x0.flatten(1)).item()
    assert result.similarities[0] == pytest.approx(expected, abs=1e-5)
    noisy = F.cosine_similarity(x5.flatten(1), x0.flatten(1)).item()  # what "noisy" embeds
    assert abs(noisy - expected) > 1e-5


def test_the_drift_rule_escalates_at_the_first_check_below_drift_tau(diffusion: Diffusion) -> None:
    image = _image(16, 16, 6)
    kw: dict[str, Any] = {"signal": "denoised", "t_max": 0.02, "t_escalate": 0.03}
    # τ = -1 would stop the image at the first check (k = 5); a drift below drift_tau comes first.
    (kept,), _ = _purify(diffusion, [image], tau=-1.0, drift_tau=-1.0, sampler="ddpm", **kw)
    assert (kept.t_star, kept.stopped, len(kept.drifts)) == (5, "tau", 1)
    # Without a floor the first check compares with φ(x) itself: the drift is the similarity.
    assert kept.drifts[0] == pytest.approx(kept.similarities[0])
    (sent,), calls = _purify(diffusion, [image], tau=-1.0, drift_tau=1.0, sampler="ddpm", **kw)
    assert (sent.t_star, sent.stopped, sent.drifts) == (30, "escalated", kept.drifts)
    assert sent.unet_evals == len(calls) == 1 + 30  # the check's x̂_0, then DDPM from 29
    # The noise path goes on from k = 5: the pixels of DiffPure with a fixed t* = 30.
    (fixed,), _ = _purify(diffusion, [image], tau=None, t_max=0.03, sampler="ddpm")
    assert torch.equal(sent.image, fixed.image)


def test_every_checks_drift_is_measured_against_the_input(diffusion: Diffusion) -> None:
    unet, scheduler = diffusion
    image = _image(16, 16, 9)
    # τ = 1 never stops and drift_tau = -1 never escalates: four checks, k = 5 … 20.
    settings = PurifySettings(tau=1.0, t_max=0.02, signal="denoised", drift_tau=-1.0)
    purifier = Purifier(unet, scheduler, PixelEncoder(), settings)
    (result,) = purifier.purify_batch([image])
    (trace,) = purifier.traces([image])  # what calibration sees: the same numbers
    assert len(result.drifts) == 4 and trace.drifts == result.drifts
    previous = None
    for j, k in enumerate((5, 10, 15, 20)):
        x0, _, x0_hat = _x0_estimate(purifier, image, k)
        expected = F.cosine_similarity(x0_hat.flatten(1), x0.flatten(1)).item()
        assert result.drifts[j] == pytest.approx(expected, abs=1e-5)
        if previous is not None:  # not the consecutive similarity (an alias once made it so)
            consecutive = F.cosine_similarity(x0_hat.flatten(1), previous.flatten(1)).item()
            assert result.similarities[j] == pytest.approx(consecutive, abs=1e-5)
            assert abs(consecutive - expected) > 1e-5
        previous = x0_hat


def test_calibration_traces_match_the_stop_path_under_a_floor(diffusion: Diffusion) -> None:
    unet, scheduler = diffusion
    image = _image(16, 16, 10)
    kw: dict[str, Any] = {"t_min": 0.01, "t_max": 0.02, "signal": "denoised"}
    stopping = Purifier(
        unet, scheduler, PixelEncoder(), PurifySettings(tau=1.0, drift_tau=-1.0, **kw)
    )
    (result,) = stopping.purify_batch([image])
    (trace,) = stopping.traces([image])  # from the first check on; the floor's are k = 10 …
    assert result.drifts == trace.drifts[1:] and len(result.drifts) == 3


def test_the_drift_reference_under_a_floor_is_the_input_itself(diffusion: Diffusion) -> None:
    unet, scheduler = diffusion
    image = _image(16, 16, 8)
    settings = PurifySettings(
        tau=-1.0, t_min=0.01, t_max=0.02, signal="denoised", drift_tau=-1.0, sampler="ddpm"
    )
    purifier = Purifier(unet, scheduler, PixelEncoder(), settings)
    (result,) = purifier.purify_batch([image])
    # φ at k = 5 (the check before the floor), φ(x) for the drift, φ at the first check (k = 10).
    assert (result.t_star, result.encoder_evals, len(result.drifts)) == (10, 3, 1)
    x0, _, x0_hat = _x0_estimate(purifier, image, 10)
    expected = F.cosine_similarity(x0_hat.flatten(1), x0.flatten(1)).item()
    assert result.drifts[0] == pytest.approx(expected, abs=1e-5)
    assert abs(result.similarities[0] - expected) > 1e-5  # τ compares with k = 5 instead


def test_the_drift_rule_sends_on_only_the_images_below_it(diffusion: Diffusion) -> None:
    images = [_image(16, 16, seed) for seed in (11, 12, 13, 14)]
    kw: dict[str, Any] = {"signal": "denoised", "t_max": 0.02, "t_escalate": 0.03}
    probe, _ = _purify(diffusion, images, tau=-1.0, drift_tau=-1.0, **kw)
    drifts = sorted(r.drifts[0] for r in probe)
    assert drifts[1] < drifts[2]
    cut = (drifts[1] + drifts[2]) / 2  # two images below, two above
    batch, _ = _purify(diffusion, images, tau=-1.0, drift_tau=cut, **kw)
    assert sorted(r.stopped for r in batch) == ["escalated", "escalated", "tau", "tau"]
    for image, result, seen in zip(images, batch, probe, strict=True):
        assert result.stopped == ("escalated" if seen.drifts[0] < cut else "tau")
        (alone,), _ = _purify(diffusion, [image], tau=-1.0, drift_tau=cut, **kw)
        assert (alone.t_star, alone.stopped) == (result.t_star, result.stopped)
        assert torch.allclose(alone.image, result.image, atol=1e-5)


@pytest.mark.parametrize("t_max", [0.023, 0.02])  # k_max between checks, and on one
def test_an_unreachable_tau_runs_to_t_max(diffusion: Diffusion, t_max: float) -> None:
    encoder = PixelEncoder()  # fresh noise every step: cos < 1 always
    image = _image(16, 16, 9)
    (result,), _ = _purify(diffusion, [image], encoder, tau=1.0, t_max=t_max, sampler="ddpm")
    k_max = round(t_max * 1000)
    assert result.t_star == k_max and result.stopped == "t_max"
    assert len(result.similarities) == 4 and max(result.similarities) < 1  # k = 5, 10, 15, 20
    assert result.encoder_evals == 5 == len(encoder.batches)
    assert result.unet_evals == k_max  # DDPM: timesteps k_max-1, …, 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_mixed_t_star_batch_equals_each_image_alone(diffusion: Diffusion, sampler: Any) -> None:
    settings = {"tau": 0.9, "t_max": 0.1, "sampler": sampler, "ddim_steps": 10}
    # A strong image keeps its direction under early noise (stops at the first check); a faint
    # one is soon dominated by noise that keeps changing, so it stops later.
    strong = _image(20, 28, 11, scale=0.2, offset=0.6)
    faint = _image(16, 16, 12, scale=0.01)
    (alone_strong,), strong_calls = _purify(diffusion, [strong], **settings)
    (alone_faint,), faint_calls = _purify(diffusion, [faint], **settings)
    encoder = PixelEncoder()
    both, both_calls = _purify(diffusion, [strong, faint], encoder, **settings)
    assert both[0].t_star == alone_strong.t_star == 5
    assert both[1].t_star == alone_faint.t_star > 5
    for got, alone in ((both[0], alone_strong), (both[1], alone_faint)):
        torch.testing.assert_close(got.image, alone.image, atol=1e-5, rtol=0)
        assert got.similarities == pytest.approx(alone.similarities, abs=1e-6)
        assert (got.unet_evals, got.encoder_evals) == (alone.unet_evals, alone.encoder_evals)
    assert both[0].image.shape == (3, 20, 28) and both[1].image.shape == (3, 16, 16)
    # The strong image does not wait for the faint one: its reverse chain starts at once, while
    # the faint image still noises (its "noisy" checks need no UNet call to share), and ends
    # before the faint one's begins.
    assert [c.tolist() for c in both_calls[: both[0].unet_evals]] == [
        [t] for t in reverse_timesteps(both[0].t_star - 1, sampler, 10)
    ]
    assert len(both_calls) == len(strong_calls) + len(faint_calls)
    # One encoder call per check, over the samples still noising only.
    assert encoder.batches[:2] == [2, 2] and set(encoder.batches[2:]) == {1}
    assert len(encoder.batches) == both[1].encoder_evals


def test_a_chain_joins_and_leaves_between_steps(diffusion: Diffusion) -> None:
    unet, scheduler = diffusion
    # A fixed t* = 20 (no checks): 20 DDPM steps each, the first from timestep 19.
    settings = PurifySettings(tau=None, t_max=0.02, sampler="ddpm")
    purifier = Purifier(unet, scheduler, PixelEncoder(), settings)
    first, second = _image(16, 16, 21), _image(20, 28, 22)
    (alone_first,), (alone_second,) = (
        purifier.purify_batch([first]),
        purifier.purify_batch([second]),
    )
    stepper = purifier.stepper()
    stepper.admit(["first"], [first])
    ends: dict[object, int] = {}
    with unet_calls(unet) as calls:
        for step in range(1, 26):
            if step == 6:
                stepper.admit(["second"], [second])  # joins a chain five steps in
            ends.update((c.key, step) for c in stepper.advance())
    assert stepper.live == 0 and ends == {"first": 20, "second": 25}
    # Shared calls with each chain at its own timestep; each leaves when its chain ends.
    assert [c.tolist() for c in calls[4:7]] == [[15], [14, 19], [13, 18]]
    assert calls[19].tolist() == [0, 5] and calls[20].tolist() == [4]
    # The company changes nothing: the pixels of each image purified alone.
    stepper = purifier.stepper()
    stepper.admit(["first", "second"], [first, second])
    chains = {c.key: c for _ in range(20) for c in stepper.advance()}
    for key, alone in (("first", alone_first), ("second", alone_second)):
        torch.testing.assert_close(chain_result(chains[key]).image, alone.image, atol=1e-5, rtol=0)


def test_a_dropped_chain_leaves_the_others_running(diffusion: Diffusion) -> None:
    unet, scheduler = diffusion
    purifier = Purifier(unet, scheduler, PixelEncoder(), PurifySettings(tau=None, t_max=0.02))
    kept, dropped = _image(16, 16, 23), _image(16, 16, 24)
    (alone,) = purifier.purify_batch([kept])
    stepper = purifier.stepper()
    stepper.admit(["kept", "dropped"], [kept, dropped])
    finished = [c for _ in range(3) for c in stepper.advance()]
    stepper.drop(["dropped"])
    assert stepper.live == 1
    while stepper.live:
        finished += stepper.advance()
    assert [c.key for c in finished] == ["kept"]
    torch.testing.assert_close(chain_result(finished[0]).image, alone.image, atol=1e-5, rtol=0)


def test_sampler_choice_sets_the_unet_evaluations(diffusion: Diffusion) -> None:
    image, counts = _image(20, 28, 13), {}
    runs: tuple[tuple[Sampler, int], ...] = (("ddpm", 10), ("ddim", 6), ("ddim", 40))
    for sampler, steps in runs:
        encoder = PixelEncoder()  # tau=None: a fixed t* = k_max, the encoder never called
        (result,), calls = _purify(
            diffusion, [image], encoder, tau=None, t_max=0.025, sampler=sampler, ddim_steps=steps
        )
        assert (result.t_star, result.stopped, result.similarities) == (25, "t_max", ())
        assert result.encoder_evals == 0 and encoder.batches == []
        assert result.unet_evals == len(calls)
        assert result.image.shape == (3, 20, 28) and torch.isfinite(result.image).all()
        counts[sampler, steps] = result.unet_evals
    # DDPM: one per timestep from t*-1 to 0; DDIM: min(ddim_steps, t*).
    assert counts == {("ddpm", 10): 25, ("ddim", 6): 6, ("ddim", 40): 25}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_pixels_other_seed_other_pixels(diffusion: Diffusion, sampler: Any) -> None:
    images = [_image(20, 28, 14), _image(16, 16, 15)]

    def run(seed: int) -> list[torch.Tensor]:
        results, _ = _purify(diffusion, images, tau=0.95, t_max=0.03, sampler=sampler, seed=seed)
        return [r.image for r in results]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
