"""The purify stage: rewrite, cache, micro-batching, profile scores, loading from config, and
the whole guard (HTTP + gRPC) with purification on tiny models saved in their native formats."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from transformers import CLIPVisionModel

from guard.config import ConfigError, PurifyConfig
from guard.defenses.diffcap import (
    Purifier,
    PurifySettings,
    Trace,
    load_diffusion,
    pil_to_tensor,
    tensor_to_pil,
)
from guard.defenses.diffcap.loading import load_purifier
from guard.defenses.diffcap.profile import PurifyProfile, calibrate, calibrate_purifier
from guard.defenses.purify import PurifyStage
from guard.errors import Overloaded
from guard.intake.decode import image_digest
from guard.metrics import Metrics
from guard.toy.openai_server import pixel_digest
from guard.toy.vlm_parts import vision_config
from guard.types import GuardRequest, ImageInput
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.images import data_url, encode, gradient, image_message
from tests.servers import AppServer, RunningGuard
from tests.tiny_models import PixelEncoder, save_tiny_ddpm, save_tiny_open_clip


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs tiny models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ddpm, clip = tmp_path_factory.mktemp("ddpm"), tmp_path_factory.mktemp("clip")
    save_tiny_ddpm(ddpm)
    save_tiny_open_clip(clip)
    return {"diffusion": str(ddpm), "encoder_model": f"local-dir:{clip}"}


def _stage(models: dict[str, str], **kwargs: Any) -> PurifyStage:
    unet, scheduler = load_diffusion(models["diffusion"])
    settings = PurifySettings(tau=0.0, check_every=5, t_max=0.05, ddim_steps=4)
    return PurifyStage(Purifier(unet, scheduler, PixelEncoder(), settings), **kwargs)


def _request(*images: Image.Image, rid: str = "r") -> GuardRequest:
    return GuardRequest(
        rid, "text", tuple(ImageInput(i, im, image_digest(im)) for i, im in enumerate(images))
    )


async def test_rewrites_every_image_at_its_own_size(models: dict[str, str]) -> None:
    stage = _stage(models)
    try:
        images = (gradient(40, 24, seed=1), gradient(16, 16, seed=2))
        decision = await stage.check(_request(*images))
    finally:
        stage.close()
    assert decision.action == "rewrite" and decision.images is not None
    for before, after in zip(images, decision.images, strict=True):
        assert after.image.size == before.size and after.image.mode == "RGB"
        assert after.digest == image_digest(after.image) != image_digest(before)
    traces = decision.details["images"]
    assert [t["steps"] for t in traces] == [5, 5]  # tau 0: the first check stops
    assert all(len(t["similarity"]) == 1 and t["stopped"] == "tau" for t in traces)
    assert all(t["score"] is None and not t["cached"] for t in traces)
    assert decision.score is None  # no profile, no adversarial score


async def test_no_images_is_allowed_untouched(models: dict[str, str]) -> None:
    stage = _stage(models)
    try:
        decision = await stage.check(GuardRequest("r", "just text", ()))
    finally:
        stage.close()
    assert decision.action == "allow" and decision.images is None


async def test_cache_hit_returns_the_same_pixels_without_the_model(models: dict[str, str]) -> None:
    metrics = Metrics(CollectorRegistry())
    stage = _stage(models, metrics=metrics, cache_bytes=1 << 20)
    image = gradient(24, 24, seed=3)
    try:
        first = await stage.check(_request(image))
        items = stage.batch_stats.items
        second = await stage.check(_request(image.copy(), rid="again"))  # same pixels
        assert stage.batch_stats.items == items  # not purified again
    finally:
        stage.close()
    assert first.images is not None and second.images is not None
    assert second.images[0].digest == first.images[0].digest
    assert second.details["images"][0]["cached"] is True
    assert metrics.cache_hits.labels("purify")._value.get() == 1
    assert metrics.purify_steps._sum.get() == 10  # t* observed for both requests


async def test_a_repeated_image_is_purified_once(models: dict[str, str]) -> None:
    stage = _stage(models)
    image = gradient(16, 16, seed=8)
    try:
        decision = await stage.check(_request(image, image.copy()))
        items = stage.batch_stats.items
    finally:
        stage.close()
    assert items == 1
    assert decision.images is not None
    assert [im.index for im in decision.images] == [0, 1]
    assert decision.images[0].digest == decision.images[1].digest


async def test_cache_key_covers_the_settings(models: dict[str, str]) -> None:
    """Two stages with different settings never share entries (keys differ)."""
    a = _stage(models, cache_bytes=1 << 20)
    unet, scheduler = load_diffusion(models["diffusion"])
    b = PurifyStage(
        Purifier(unet, scheduler, PixelEncoder(), PurifySettings(tau=0.0, seed=1)),
        cache_bytes=1 << 20,
    )
    try:
        assert a._key != b._key
    finally:
        a.close()
        b.close()


async def test_concurrent_requests_share_model_calls(models: dict[str, str]) -> None:
    stage = _stage(models, max_batch=16, max_wait_s=0.2)
    images = [gradient(16, 16, seed=10 + i) for i in range(8)]
    try:
        together = await asyncio.gather(
            *(stage.check(_request(im, rid=str(i))) for i, im in enumerate(images))
        )
        shared = stage.batch_stats.mean_batch_size
        alone = [await stage.check(_request(im)) for im in images[:2]]
    finally:
        stage.close()
    assert shared > 2  # images per model call
    for one, both in zip(alone, together[:2], strict=True):
        assert one.images is not None and both.images is not None
        assert one.images[0].digest == both.images[0].digest  # batch-independent pixels


async def test_full_queue_is_overload(models: dict[str, str]) -> None:
    stage = _stage(models, max_batch=1, max_queue=1, max_wait_s=0)
    images = [gradient(16, 16, seed=20 + i) for i in range(6)]
    try:
        results = await asyncio.gather(
            *(stage.check(_request(im)) for im in images), return_exceptions=True
        )
    finally:
        stage.close()
    assert any(isinstance(r, Overloaded) for r in results)
    assert any(not isinstance(r, BaseException) for r in results)
    assert not stage.ready()  # closed


def _profile(identity: dict[str, Any], mean: float = 5.0, std: float = 0.0) -> PurifyProfile:
    return PurifyProfile(
        tau=0.0,
        check_every=5,
        target_steps=5,
        quantile=0.9,
        clean_mean=mean,
        clean_std=std,
        clean_quantiles={"p50": mean},
        images=10,
        identity=identity,
    )


async def test_profile_scores_and_block_score_blocks(models: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="needs a calibration profile"):
        _stage(models, block_score=1.0)
    # Clean images stop at 5 steps; these need 5 too: score 0. A profile whose clean images
    # stopped at 0 makes t* = 5 one spread (check_every) above: score 1, blocked above 0.5.
    calm = _stage(models, profile=_profile({}), block_score=0.5)
    wary = _stage(models, profile=_profile({}, mean=0.0), block_score=0.5)
    try:
        allowed = await calm.check(_request(gradient(16, 16, seed=4)))
        blocked = await wary.check(_request(gradient(16, 16, seed=4)))
    finally:
        calm.close()
        wary.close()
    assert allowed.action == "rewrite" and allowed.score == 0.0
    assert blocked.action == "block" and blocked.score == 1.0
    assert blocked.category == "adversarial" and blocked.images is not None


def test_profile_round_trip_and_identity_check(tmp_path: Path, models: dict[str, str]) -> None:
    cfg = PurifyConfig(**models, check_every=5, t_max=0.05)
    _, identity, _ = load_purifier(cfg)
    profile = calibrate(
        [(0.1, 0.5, 0.9), (0.2, 0.8, 0.95), (0.6, 0.7, 0.99)],
        check_every=5,
        k_max=15,
        target_steps=10,
        quantile=2 / 3,
        identity=identity,
    )
    # Best similarity within 10 steps: 0.5, 0.8, 0.7; two of three must stop by then: 0.7.
    assert profile.tau == 0.7
    assert profile.clean_mean == pytest.approx((15 + 10 + 10) / 3)
    path = tmp_path / "profile.json"
    profile.save(path)
    assert PurifyProfile.load(path) == profile
    _, _, loaded = load_purifier(cfg.model_copy(update={"profile": path}))
    assert loaded == profile
    other = cfg.model_copy(update={"profile": path, "check_every": 3})
    with pytest.raises(ConfigError, match="differs in: check_every"):
        load_purifier(other)
    with pytest.raises(ConfigError, match="differs in: t_min"):
        load_purifier(cfg.model_copy(update={"profile": path, "t_min": 0.01}))
    with pytest.raises(ConfigError, match="differs in: signal"):
        load_purifier(cfg.model_copy(update={"profile": path, "signal": "denoised"}))
    with pytest.raises(ConfigError, match="differs in: t_escalate"):
        load_purifier(cfg.model_copy(update={"profile": path, "t_escalate": 0.1}))
    with pytest.raises(ConfigError, match="not both"):
        load_purifier(PurifyConfig(**models, profile=path, tau=0.5))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read purify profile"):
        load_purifier(cfg.model_copy(update={"profile": tmp_path / "bad.json"}))


def test_patch_features_are_part_of_the_purifiers_identity(
    tmp_path: Path, models: dict[str, str]
) -> None:
    tower = tmp_path / "tower"
    CLIPVisionModel(vision_config(width=32, layers=1)).save_pretrained(tower)
    pooled = PurifyConfig(
        diffusion=models["diffusion"], encoder="hf", encoder_model=str(tower), t_max=0.05
    )
    patches = pooled.model_copy(update={"encoder_features": "patches"})
    _, before, _ = load_purifier(pooled)
    assert "encoder_features" not in before  # profiles made before the option stay valid
    purifier, identity, _ = load_purifier(patches)
    assert identity["encoder_features"] == "patches" and purifier.encoder.name.endswith("(patches)")
    profile = calibrate([(0.1, 0.5, 0.9)] * 2, check_every=5, k_max=15, target_steps=10,
                        quantile=0.5, identity=identity)  # fmt: skip
    path = tmp_path / "profile.json"
    profile.save(path)
    load_purifier(patches.model_copy(update={"profile": path}))
    with pytest.raises(ConfigError, match="differs in: encoder_features"):
        load_purifier(pooled.model_copy(update={"profile": path}))
    with pytest.raises(ValueError, match="patches needs encoder: hf"):
        PurifyConfig(**models, encoder_features="patches")


def test_profile_calibrates_the_drift_rule(tmp_path: Path, models: dict[str, str]) -> None:
    cfg = PurifyConfig(**models, check_every=5, t_max=0.015, t_escalate=0.03, signal="denoised")
    purifier, identity, _ = load_purifier(cfg)
    sims = [(0.1, 0.5, 0.9), (0.2, 0.8, 0.95), (0.6, 0.7, 0.99)]
    drifts = [(0.99, 0.98, 0.90), (0.97, 0.96, 0.5), (0.995, 0.99, 0.2)]
    traces = [Trace(t, d) for t, d in zip(sims, drifts, strict=True)]
    kw: dict[str, Any] = {"target_steps": 10, "quantile": 2 / 3, "identity": identity}
    profile = calibrate_purifier(purifier, traces, drift_quantile=1 / 3, **kw)
    # τ = 0.7 stops the images at k = 15, 10, 10; their lowest drifts on the way: 0.90, 0.96,
    # 0.99. A third may escalate: drift_tau = 0.96, and the first image goes on to k = 30.
    assert (profile.tau, profile.drift_tau, profile.drift_quantile) == (0.7, 0.96, 1 / 3)
    assert profile.clean_mean == pytest.approx((30 + 10 + 10) / 3)
    none = calibrate_purifier(purifier, traces, drift_quantile=0.0, **kw)
    assert none.drift_tau == 0.90 and none.clean_mean == pytest.approx((15 + 10 + 10) / 3)
    with pytest.raises(ValueError, match="drift_quantile must be in \\[0, 1\\)"):
        calibrate_purifier(purifier, traces, drift_quantile=1.0, **kw)
    noisy = [Trace(t, ()) for t in sims]  # signal="noisy" measures no drift
    with pytest.raises(ValueError, match="needs every image's drifts"):
        calibrate_purifier(purifier, noisy, drift_quantile=0.1, **kw)
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded, _, _ = load_purifier(cfg.model_copy(update={"profile": path}))
    assert (loaded.settings.tau, loaded.settings.drift_tau) == (0.7, 0.96)
    with pytest.raises(ConfigError, match=r"set purify\.drift_tau or purify\.profile, not both"):
        load_purifier(cfg.model_copy(update={"profile": path, "drift_tau": 0.5}))
    with pytest.raises(ValueError, match="drift_tau needs signal: denoised"):
        PurifyConfig(**models, drift_tau=0.9)


def test_profile_with_a_floor_counts_only_checks_above_it(models: dict[str, str]) -> None:
    cfg = PurifyConfig(**models, check_every=5, t_max=0.05, t_min=0.01)
    purifier, identity, _ = load_purifier(cfg)
    assert (purifier.k_min, identity["t_min"]) == (10, 0.01)
    traces = [(0.1, 0.5, 0.9), (0.2, 0.8, 0.95), (0.99, 0.7, 0.9)]
    with pytest.raises(ValueError, match="target_steps must be in \\[10, 15\\]"):
        calibrate(
            traces, check_every=5, k_max=15, target_steps=5, quantile=1, identity=identity, k_min=10
        )
    profile = calibrate(
        traces,
        check_every=5,
        k_max=15,
        target_steps=15,
        quantile=2 / 3,
        identity=identity,
        k_min=10,
    )
    # Only checks at k = 10 and 15 count (the third image's 0.99 at k = 5 is below the floor):
    # best 0.9, 0.95, 0.9, so two of three stop by k = 15 with τ = 0.9.
    assert profile.tau == 0.9 and profile.k_min == 10
    assert profile.clean_mean == 15


def _guard(upstream: AppServer, models: dict[str, str]) -> RunningGuard:
    purify = {**models, "tau": 0.5, "check_every": 5, "t_max": 0.05, "ddim_steps": 4}
    return RunningGuard(
        upstream.url + "/v1",
        {"pipeline": {"defenses": ["purify"]}, "purify": purify},
    )


def test_guard_forwards_purified_pixels_over_http(
    upstream: AppServer, models: dict[str, str]
) -> None:
    guard = _guard(upstream, models)
    image = gradient(48, 32, seed=5)
    try:
        body = {"model": "echo", "messages": image_message(data_url(encode(image)))}
        response = httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["x-guard-decision"] == "allow"
        sent = upstream.app.state.received[-1]
        url = sent["messages"][0]["content"][1]["image_url"]["url"]
        forwarded = Image.open(io.BytesIO(_decode_data_url(url)))
        assert forwarded.size == image.size
        assert pixel_digest(forwarded) != pixel_digest(image)  # purified, not the original
        assert guard.metric("vlm_guard_purify_steps_count") == 1
        ready = httpx.get(guard.url + "/readyz", timeout=10)
        assert ready.status_code == 200
    finally:
        guard.close()


async def test_grpc_purify_and_check_report_t_star(
    upstream: AppServer, models: dict[str, str]
) -> None:
    guard = _guard(upstream, models)
    png = encode(gradient(20, 20, seed=6))
    try:
        async with grpc.aio.insecure_channel(guard.grpc_target) as channel:
            stub = pb_grpc.GuardStub(channel)
            purified = await stub.Purify(pb.PurifyRequest(images=[pb.Image(data=png)]))
            checked = await stub.Check(pb.CheckRequest(text="hi", images=[pb.Image(data=png)]))
    finally:
        guard.close()
    (item,) = purified.images
    assert item.steps > 0 and len(item.similarity) >= 1
    out = Image.open(io.BytesIO(item.png))
    assert out.size == (20, 20) and image_digest(out) == item.digest
    (decision,) = checked.decisions
    assert decision.stage == "purify" and decision.action == "rewrite"
    steps = decision.details["images"][0]["steps"]
    assert steps == item.steps  # same image, same seed: same t* (from the cache or not)
    assert checked.images[0].digest == item.digest


def _decode_data_url(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])


def test_images_are_unchanged_in_shape_and_range(models: dict[str, str]) -> None:
    """The conversion PIL ↔ tensor round-trips exactly when the purifier is the identity."""
    image = gradient(13, 7, seed=7)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(image))), np.asarray(image))
