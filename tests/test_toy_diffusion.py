"""The toy diffusion model's API: native save/load, the DiffPure forward/reverse, costs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from guard.toy.diffusion import (
    DiffusionSettings,
    build_scheduler,
    build_unet,
    denoise,
    load_diffusion,
    noise_to,
    train_diffusion,
    unet_evaluations,
)

TINY = DiffusionSettings(block_out_channels=(8, 16), norm_num_groups=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs tiny models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def model() -> tuple[UNet2DModel, DDPMScheduler]:
    torch.manual_seed(0)
    return build_unet(TINY, sample_size=16).eval(), build_scheduler(TINY)


def _images(n: int = 3, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand((n, 3, size, size), generator=generator) * 2 - 1  # (B, 3, H, W)


def _public(config: Any) -> dict[str, Any]:
    """A config without diffusers' bookkeeping keys (``_class_name``, ``_use_default_values``)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


class _Counter:
    """Counts UNet forward calls through a hook, so the test checks real work."""

    def __init__(self, unet: UNet2DModel) -> None:
        self.calls = 0
        self._handle = unet.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def test_save_pretrained_roundtrip(
    model: tuple[UNet2DModel, DDPMScheduler], tmp_path: Path
) -> None:
    unet, scheduler = model
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"][1] == "UNet2DModel"
    loaded, loaded_scheduler = load_diffusion(tmp_path)
    assert not loaded.training
    assert _public(loaded_scheduler.config) == _public(scheduler.config)
    x = _images()
    t = torch.tensor([5, 500, 999])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)


@pytest.mark.parametrize(
    ("sampler", "t", "steps", "expected"),
    [
        ("ddpm", 0, 20, 1),
        ("ddpm", 7, 20, 8),  # t, t-1, …, 0
        ("ddim", 100, 20, 20),  # ddim_steps timesteps from t to 0
        ("ddim", 100, 1, 1),  # one jump straight to x_0
        ("ddim", 4, 20, 5),  # never more than t+1
    ],
)
def test_denoise_spends_the_counted_unet_evaluations(
    model: tuple[UNet2DModel, DDPMScheduler], sampler: Any, t: int, steps: int, expected: int
) -> None:
    unet, scheduler = model
    assert unet_evaluations(t, sampler, steps) == expected
    counter = _Counter(unet)
    try:
        x_t = noise_to(_images(), t, scheduler, torch.Generator().manual_seed(0))
        out = denoise(
            unet,
            scheduler,
            x_t,
            t,
            torch.Generator().manual_seed(0),
            sampler=sampler,
            ddim_steps=steps,
        )
    finally:
        counter.close()
    assert counter.calls == expected  # batched: one call per step for the whole batch
    assert out.shape == (3, 3, 16, 16)
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_denoise_is_deterministic_under_a_seeded_generator(
    model: tuple[UNet2DModel, DDPMScheduler], sampler: Any
) -> None:
    unet, scheduler = model

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x_t = noise_to(_images(), 30, scheduler, generator)
        return denoise(unet, scheduler, x_t, 30, generator, sampler=sampler, ddim_steps=5)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_ddim_does_not_touch_the_callers_scheduler(
    model: tuple[UNet2DModel, DDPMScheduler],
) -> None:
    unet, scheduler = model
    before = scheduler.timesteps.clone()
    denoise(unet, scheduler, _images(), 10, None, sampler="ddim", ddim_steps=3)
    denoise(unet, scheduler, _images(), 3, torch.Generator().manual_seed(0))
    assert torch.equal(scheduler.timesteps, before) and scheduler.num_inference_steps is None


def test_noise_to_endpoints(model: tuple[UNet2DModel, DDPMScheduler]) -> None:
    _, scheduler = model
    x0 = _images(64, 32)
    generator = torch.Generator().manual_seed(0)
    near = noise_to(x0, 0, scheduler, generator)
    assert (near - x0).abs().mean() < 0.02  # ᾱ_0 = 1 - 1e-4: noise std 0.01
    far = noise_to(x0, 999, scheduler, generator)
    assert abs(float(far.mean())) < 0.02 and abs(float(far.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([far.flatten(), x0.flatten()]))[0, 1])) < 0.05


def test_bad_timesteps_are_refused(model: tuple[UNet2DModel, DDPMScheduler]) -> None:
    unet, scheduler = model
    with pytest.raises(ValueError):
        noise_to(_images(), 1000, scheduler, None)
    with pytest.raises(ValueError):
        denoise(unet, scheduler, _images(), -1, None)
    with pytest.raises(ValueError):
        unet_evaluations(10, "euler")  # type: ignore[arg-type]


def test_train_diffusion_smoke(tmp_path: Path) -> None:
    settings = DiffusionSettings.quick(
        block_out_channels=(8, 16), steps=4, batch_size=4, warmup=2, eval_images=4
    )
    figures = train_diffusion(tmp_path / "a", seed=0, settings=settings)
    again = train_diffusion(tmp_path / "b", seed=0, settings=settings)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    timing = {"seconds", "seconds_per_step"}
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in figures.items() if k not in timing
    }
    assert json.loads(json.dumps(figures)) == figures
    assert figures["steps"] == 4 and figures["final_loss"] > 0
    assert {"purified_psnr_t100", "purified_psnr_t200"} <= set(figures)
    unet, scheduler = load_diffusion(tmp_path / "a")
    assert tuple(unet.config.block_out_channels) == (8, 16)
    out = denoise(unet, scheduler, _images(2, 32), 5, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)
