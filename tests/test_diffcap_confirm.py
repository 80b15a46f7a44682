"""The look that confirms a stop (PurifySettings.confirm_steps / confirm_tau): after τ stops an
image at k, the image is noised on to k + confirm_steps and its x̂_0 estimate there compared
with the input; it escalates below confirm_tau, else denoises from where τ stopped it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from guard.config import ConfigError, PurifyConfig
from guard.defenses.diffcap import (
    Purifier,
    PurifyResult,
    PurifySettings,
    Trace,
    load_diffusion,
    noise_steps,
)
from guard.defenses.diffcap.diffusion import predict_x0
from guard.defenses.diffcap.loading import load_purifier
from guard.defenses.diffcap.profile import PurifyProfile, calibrate, calibrate_purifier, stop_step
from guard.defenses.purify import PurifyStage
from guard.intake.decode import image_digest
from guard.types import GuardRequest, ImageInput
from tests.images import gradient
from tests.tiny_models import PixelEncoder, save_tiny_ddpm, unet_calls

Diffusion = tuple[UNet2DModel, DDPMScheduler]

# Checks every 5 steps, cap k_max = 10, a look 10 steps past a stop, escalation to k = 30.
LOOK: dict[str, Any] = {
    "signal": "denoised",
    "check_every": 5,
    "t_max": 0.01,
    "t_escalate": 0.03,
    "confirm_steps": 10,
    "sampler": "ddpm",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs tiny models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory: pytest.TempPathFactory) -> Diffusion:
    path = tmp_path_factory.mktemp("ddpm")
    save_tiny_ddpm(path)
    return load_diffusion(path)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ddpm_dir")
    save_tiny_ddpm(path)
    return str(path)


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((3, 16, 16), generator=g) * 2 - 1


def _purifier(model: Diffusion, **settings: Any) -> Purifier:
    unet, scheduler = model
    return Purifier(unet, scheduler, PixelEncoder(), PurifySettings(**{**LOOK, **settings}))


def _drift_at(purifier: Purifier, image: torch.Tensor, k: int) -> float:
    """cos(φ(x̂_0(x_k)), φ(x)) by hand, on the purifier's own noise path (φ = pixels)."""
    x0, generators = purifier.prepare([image])
    xk = noise_steps(x0, purifier.schedule, 0, k, generators)
    with torch.inference_mode():
        out = purifier.unet(xk, torch.tensor([k - 1])).sample
        a = purifier.schedule.alphas_cumprod[k - 1].float()
        x0_hat = predict_x0(purifier.schedule, out, xk, a)
    return F.cosine_similarity(x0_hat.flatten(1), x0.flatten(1)).item()


def _run(purifier: Purifier, images: list[torch.Tensor]) -> tuple[list[PurifyResult], list[int]]:
    with unet_calls(purifier.unet) as calls:
        results = purifier.purify_batch(images)
    return results, [int(c.reshape(-1)[0]) for c in calls]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"confirm_steps": 3}, "confirm_steps must be a multiple of check_every=5"),
        ({"confirm_steps": -5}, "confirm_steps must be a multiple"),
        ({"confirm_tau": 0.9}, "confirm_tau needs confirm_steps > 0"),
        ({"confirm_steps": 5, "confirm_tau": 1.5, "signal": "denoised"}, "confirm_tau must be"),
        ({"confirm_steps": 5, "confirm_tau": 0.9}, "confirm_tau needs signal='denoised'"),
        ({"confirm_steps": 5, "confirm_tau": 0.9, "signal": "denoised", "tau": None},
         "and a stop rule"),
    ],
)  # fmt: skip
def test_bad_look_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PurifySettings(**changes)


def test_the_look_may_not_reach_past_the_escalation_depth(diffusion: Diffusion) -> None:
    # k_max 10 + look 25 = 35 > 30: escalating from the look would have to go backwards.
    with pytest.raises(ValueError, match="must not exceed the escalation depth 30"):
        _purifier(diffusion, tau=-1.0, confirm_steps=25, confirm_tau=0.0)
    _purifier(diffusion, tau=-1.0, confirm_steps=25)  # no look taken: only traces go there


def test_a_confirmed_stop_denoises_from_where_tau_stopped(diffusion: Diffusion) -> None:
    purifier = _purifier(diffusion, tau=-1.0, confirm_tau=-1.0)
    image = _image(1)
    (result,), calls = _run(purifier, [image])
    # τ = -1 stops at the first check (k = 5); the look at k = 15 holds (confirm_tau = -1).
    assert (result.t_star, result.stopped, len(result.drifts)) == (5, "tau", 1)
    assert result.confirm_drift == pytest.approx(_drift_at(purifier, image, 15), abs=1e-5)
    # x̂_0 at the check (timestep 4) and at the look (14), then DDPM from timestep 4: the chain
    # goes back to x_5, not on from x_15.
    assert calls == [4, 14, 4, 3, 2, 1, 0]
    assert result.unet_evals == 7 and result.encoder_evals == 3  # φ(x), check, look
    # Without the look: the same t*, the same first x̂_0, no confirm_drift, two calls fewer.
    plain = _purifier(diffusion, tau=-1.0, confirm_steps=0)
    (alone,), plain_calls = _run(plain, [image])
    assert (alone.t_star, alone.confirm_drift, alone.drifts) == (5, None, ())
    assert plain_calls == [4, 4, 3, 2, 1, 0]


def test_a_confirmed_stop_denoises_the_held_sample_itself(diffusion: Diffusion) -> None:
    # DDIM draws no noise in reverse: denoising the held x_5 gives the no-look pixels exactly,
    # where x_15 (the look's sample) would give others.
    image = _image(6)
    looked = _purifier(diffusion, tau=-1.0, confirm_tau=-1.0, sampler="ddim", ddim_steps=5)
    plain = _purifier(diffusion, tau=-1.0, confirm_steps=0, sampler="ddim", ddim_steps=5)
    (a,), (b,) = looked.purify_batch([image]), plain.purify_batch([image])
    assert (a.t_star, b.t_star) == (5, 5) and torch.equal(a.image, b.image)


def test_an_overturned_stop_escalates_on_the_same_noise_path(diffusion: Diffusion) -> None:
    purifier = _purifier(diffusion, tau=-1.0, confirm_tau=1.0)  # every look fails
    image = _image(2)
    (result,), calls = _run(purifier, [image])
    assert (result.t_star, result.stopped) == (30, "escalated")
    assert result.confirm_drift == pytest.approx(_drift_at(purifier, image, 15), abs=1e-5)
    assert calls[:2] == [4, 14] and calls[2:] == list(range(29, -1, -1))
    assert result.unet_evals == 2 + 30
    # Noised on from the look at k = 15: the pixels of DiffPure with a fixed t* = 30.
    fixed = _purifier(diffusion, tau=None, t_max=0.03, t_escalate=None, confirm_steps=0)
    (diffpure,) = fixed.purify_batch([image])
    assert torch.equal(result.image, diffpure.image)


def test_the_drift_rule_still_comes_first(diffusion: Diffusion) -> None:
    purifier = _purifier(diffusion, tau=-1.0, drift_tau=1.0, confirm_tau=-1.0)
    (result,), calls = _run(purifier, [_image(3)])
    # Escalated at the first check by the drift rule: no look.
    assert (result.stopped, result.confirm_drift) == ("escalated", None)
    assert calls[0] == 4 and len(calls) == 1 + 30


def test_looks_share_steps_and_results_do_not_depend_on_company(diffusion: Diffusion) -> None:
    images = [_image(seed) for seed in (11, 12, 13, 14)]
    probe = _purifier(diffusion, tau=-1.0, confirm_tau=-1.0)
    looks = sorted(r.confirm_drift for r in probe.purify_batch(images) if r.confirm_drift)
    assert len(looks) == 4 and looks[1] < looks[2]
    cut = (looks[1] + looks[2]) / 2  # two looks fail, two hold
    purifier = _purifier(diffusion, tau=-1.0, confirm_tau=cut)
    batch, calls = _run(purifier, images)
    assert sorted(r.stopped for r in batch) == ["escalated", "escalated", "tau", "tau"]
    for image, result in zip(images, batch, strict=True):
        assert result.confirm_drift is not None
        assert result.stopped == ("escalated" if result.confirm_drift < cut else "tau")
        (alone,), _ = _run(purifier, [image])
        assert (alone.t_star, alone.stopped) == (result.t_star, result.stopped)
        assert torch.allclose(alone.image, result.image, atol=1e-5)
    # One call for the four checks, one for the four looks, then the chains' reverse steps
    # shared per step: as many calls as the deepest chain (30) takes.
    assert len(calls) == 2 + 30


def test_calibration_traces_run_on_to_the_look(diffusion: Diffusion) -> None:
    purifier = _purifier(diffusion, tau=-1.0)  # confirm_steps 10, no confirm_tau yet
    image = _image(4)
    (trace,) = purifier.traces([image])
    # Checks at k = 5 … k_max + confirm_steps = 20; each drift on the image's own noise path.
    assert len(trace.similarities) == len(trace.drifts) == 4
    assert trace.drifts[2] == pytest.approx(_drift_at(purifier, image, 15), abs=1e-5)
    looking = _purifier(diffusion, tau=-1.0, confirm_tau=-1.0)
    (result,) = looking.purify_batch([image])
    assert result.confirm_drift == pytest.approx(trace.drifts[2], abs=1e-5)


def test_calibrate_picks_confirm_tau_from_the_looks_after_each_stop() -> None:
    sims = [
        (0.1, 0.9, 0.2, 0.2),
        (0.95, 0.3, 0.3, 0.3),
        (0.99, 0.5, 0.5, 0.5),
        (0.2, 0.3, 0.4, 0.5),
    ]
    drifts = [(0.99, 0.98, 0.97, 0.60), (0.99, 0.97, 0.80, 0.7), (0.99, 0.96, 0.90, 0.8),
              (0.99, 0.99, 0.99, 0.99)]  # fmt: skip
    kw: dict[str, Any] = {"check_every": 5, "k_max": 10, "target_steps": 10, "identity": {}}
    profile = calibrate(
        sims, quantile=0.75, drifts=drifts, k_escalate=30, confirm_steps=10,
        confirm_quantile=0.25, **kw,
    )  # fmt: skip
    # τ = 0.9 stops images 1–3 at checks 2, 1, 1 (the fourth runs to k_max and escalates).
    # Their looks, two checks on: 0.60, 0.80, 0.90; +∞ for the fourth. A quarter may escalate:
    # confirm_tau = 0.80, so the first image escalates and the others keep their stops.
    assert (profile.tau, profile.confirm_tau, profile.confirm_steps) == (0.9, 0.80, 10)
    assert profile.clean_mean == pytest.approx((30 + 5 + 5 + 30) / 4)
    steps = [stop_step(t, 0.9, 5, 10, drifts=d, k_escalate=30, confirm_steps=10,
                       confirm_tau=0.80) for t, d in zip(sims, drifts, strict=True)]  # fmt: skip
    assert steps == [30, 5, 5, 30]
    off = calibrate(sims, quantile=0.75, drifts=drifts, k_escalate=30, **kw)
    assert (off.confirm_tau, off.confirm_steps, off.clean_mean) == (None, 0, (10 + 5 + 5 + 30) / 4)
    with pytest.raises(ValueError, match="positive multiple of check_every=5, got 3"):
        calibrate(sims, quantile=0.75, drifts=drifts, confirm_steps=3, confirm_quantile=0.1, **kw)
    with pytest.raises(ValueError, match="ends before the look at step 25"):
        calibrate(sims, quantile=0.75, drifts=drifts, confirm_steps=15, confirm_quantile=0.1, **kw)
    with pytest.raises(ValueError, match="confirm_quantile must be in \\[0, 1\\)"):
        calibrate(sims, quantile=0.75, drifts=drifts, confirm_steps=10, confirm_quantile=1, **kw)


def test_a_profile_with_a_look_loads_only_with_that_look(tmp_path: Path, ddpm_dir: str) -> None:
    models = {"diffusion": ddpm_dir, "encoder": "hf", "encoder_model": _tower(tmp_path)}
    cfg = PurifyConfig(**models, check_every=5, t_max=0.01, t_escalate=0.03, signal="denoised",
                       confirm_steps=10)  # fmt: skip
    purifier, identity, _ = load_purifier(cfg)
    assert identity["confirm_steps"] == 10 and purifier.settings.confirm_tau is None
    traces = [Trace((0.9, 0.1, 0.1, 0.1), (0.99, 0.9, 0.7, 0.6)), Trace((0.9,) * 4, (0.9,) * 4)]
    profile = calibrate_purifier(
        purifier, traces, target_steps=10, quantile=1.0, identity=identity, confirm_quantile=0.5
    )
    assert (profile.tau, profile.confirm_tau) == (0.9, 0.9)  # looks at k = 15: 0.7 and 0.9
    path = tmp_path / "profile.json"
    profile.save(path)
    assert PurifyProfile.load(path) == profile
    loaded, _, _ = load_purifier(cfg.model_copy(update={"profile": path}))
    assert (loaded.settings.confirm_steps, loaded.settings.confirm_tau) == (10, 0.9)
    for other in (0, 5):
        with pytest.raises(ConfigError, match="differs in: confirm_steps"):
            load_purifier(cfg.model_copy(update={"profile": path, "confirm_steps": other}))
    with pytest.raises(ConfigError, match=r"set purify\.confirm_tau or purify\.profile, not both"):
        load_purifier(cfg.model_copy(update={"profile": path, "confirm_tau": 0.5}))
    assert "confirm_steps" not in load_purifier(cfg.model_copy(update={"confirm_steps": 0}))[1]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"confirm_steps": 7}, "must be a multiple of check_every"),
        ({"confirm_steps": 10, "signal": "noisy"}, "confirm_steps needs signal: denoised"),
        ({"confirm_tau": 0.9}, "confirm_tau needs confirm_steps > 0"),
    ],
)
def test_bad_look_config_is_refused(changes: dict[str, Any], message: str) -> None:
    base = {"signal": "denoised", "check_every": 5}
    with pytest.raises(ValueError, match=message):
        PurifyConfig(**{**base, **changes})


def _tower(tmp_path: Path) -> str:
    from transformers import CLIPVisionModel

    from guard.toy.vlm_parts import vision_config

    tower = tmp_path / "tower"
    CLIPVisionModel(vision_config(width=32, layers=1)).save_pretrained(tower)
    return str(tower)


async def test_the_stage_reports_the_look(diffusion: Diffusion) -> None:
    stage = PurifyStage(_purifier(diffusion, tau=-1.0, confirm_tau=1.0))
    image: Image.Image = gradient(16, 16, seed=3)
    try:
        decision = await stage.check(
            GuardRequest("r", "text", (ImageInput(0, image, image_digest(image)),))
        )
    finally:
        stage.close()
    (seen,) = decision.details["images"]
    assert (seen["steps"], seen["stopped"]) == (30, "escalated")  # overturned by the look
    assert isinstance(seen["confirm_drift"], float) and seen["confirm_drift"] < 1.0
    assert json.loads(json.dumps(seen["confirm_drift"])) == seen["confirm_drift"]


def test_a_look_past_the_escalation_depth_stops_start_up(tmp_path: Path, ddpm_dir: str) -> None:
    models = {"diffusion": ddpm_dir, "encoder": "hf", "encoder_model": _tower(tmp_path)}
    cfg = PurifyConfig(**models, signal="denoised", t_max=0.01, t_escalate=0.02,
                       confirm_steps=15, confirm_tau=0.9)  # fmt: skip
    with pytest.raises(ConfigError, match="must not exceed the escalation depth 20"):
        load_purifier(cfg)
