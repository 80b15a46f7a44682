"""The ``backdoor`` stage inside the whole guard: a tiny LLaVA saved in transformers' format
and a profile for it; blocks over HTTP, the decision over gRPC Check, metrics, start-up
refusals, and the calibrate/scan commands run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch

from guard.config import ConfigError
from guard.defenses.backdoor import BackdoorStage
from guard.defenses.bye.monitor import Monitor, load_model, model_identity
from guard.defenses.bye.probe import EntropyProbe
from guard.defenses.bye.profile import BackdoorProfile, calibrate
from guard.intake.decode import image_digest
from guard.types import GuardRequest, ImageInput
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.images import data_url, encode, gradient, image_message
from tests.servers import AppServer, RunningGuard
from tests.tiny_models import save_tiny_llava


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs tiny models: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("llava")
    save_tiny_llava(path)
    model, _ = load_model(path)
    return path, model_identity(path, model)


def _profile(tmp: Path, identity: dict[str, Any], *, clean_mean: float) -> Path:
    """A profile over every layer whose threshold (clean_mean, σ = 0) is set by the test."""
    x = np.random.default_rng(0).normal(2.0, 0.05, size=(20, 3))
    base = calibrate(x, identity=identity)
    every = [[0, None], [1, None], [2, None]]
    profile = replace(base, channels=every, clean_mean=clean_mean, clean_std=0.0)
    path = tmp / f"profile_{clean_mean}.json"
    profile.save(path)
    return path


def _guard(upstream: AppServer, llava_dir: Path, profile: Path) -> RunningGuard:
    return RunningGuard(
        upstream.url + "/v1",
        {
            "pipeline": {"defenses": ["backdoor"]},
            "backdoor": {"model": str(llava_dir), "profile": str(profile)},
        },
    )


def test_a_flagged_image_is_blocked_and_never_forwarded(
    tmp_path: Path, upstream: AppServer, llava: tuple[Path, dict[str, Any]]
) -> None:
    path, identity = llava
    guard = _guard(upstream, path, _profile(tmp_path, identity, clean_mean=100.0))
    seen = len(upstream.app.state.received)
    try:
        body = {"model": "echo", "messages": image_message(data_url(encode(gradient(32, 32))))}
        response = httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "content_policy_violation"
        assert len(upstream.app.state.received) == seen  # nothing reached the model
        blocked = {"stage": "backdoor", "category": "backdoor"}
        assert guard.metric("vlm_guard_blocked_total", blocked) == 1
        assert guard.metric("vlm_guard_backdoor_entropy_count") == 1
    finally:
        guard.close()


async def test_grpc_check_shows_the_backdoor_decision(
    tmp_path: Path, upstream: AppServer, llava: tuple[Path, dict[str, Any]]
) -> None:
    path, identity = llava
    guard = _guard(upstream, path, _profile(tmp_path, identity, clean_mean=-100.0))
    png = encode(gradient(24, 24, seed=4))
    try:
        async with grpc.aio.insecure_channel(guard.grpc_target) as channel:
            stub = pb_grpc.GuardStub(channel)
            checked = await stub.Check(pb.CheckRequest(text="hi", images=[pb.Image(data=png)]))
        body = {"model": "echo", "messages": image_message(data_url(png))}
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(guard.url + "/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text  # allowed: forwarded
    finally:
        guard.close()
    (decision,) = checked.decisions
    assert decision.stage == "backdoor" and decision.action == "allow"
    (image,) = decision.details["images"]
    assert [list(c) for c in decision.details["channels"]] == [[0, None], [1, None], [2, None]]
    assert 0 < image["score"] <= np.log(16) + 1e-6 and len(image["entropies"]) == 3
    assert image["flagged"] is False and image["divergence"] is None


async def test_both_the_received_and_the_purified_image_are_screened(
    llava: tuple[Path, dict[str, Any]],
) -> None:
    """A trigger the client sent is caught even when purification defused it: ``screen``
    chooses the received image, the purified one (what the model sees), or both."""
    path, identity = llava
    model, processor = load_model(path)
    probe = EntropyProbe(model, processor)
    sent, purified = gradient(32, 32, seed=1), gradient(32, 32, seed=2)
    scores = probe.entropies(probe.prepare([sent, purified], ["hi", "hi"])).numpy().mean(1)
    assert scores[0] != scores[1]
    base = calibrate(np.random.default_rng(0).normal(2.0, 0.05, (20, 3)), identity=identity)
    every = [[0, None], [1, None], [2, None]]
    # Only the received image falls below the threshold.
    profile = replace(base, channels=every, clean_mean=float(scores.mean()), clean_std=0.0)
    if scores[0] > scores[1]:
        sent, purified = purified, sent
    request = GuardRequest(
        "r",
        "hi",
        (ImageInput(0, purified, image_digest(purified)),),
        received=(ImageInput(0, sent, image_digest(sent)),),
    )
    decisions = {}
    for screen in ("purified", "received", "both"):
        stage = BackdoorStage(Monitor(probe, profile), screen=screen)
        try:
            decisions[screen] = await stage.check(request)
        finally:
            stage.close()
    assert decisions["purified"].action == "allow"
    assert decisions["received"].action == "block"
    both = decisions["both"]
    assert both.action == "block" and "image 0 as received" in both.reason
    views = [(im["view"], im["flagged"]) for im in both.details["images"]]
    assert views == [("received", True), ("purified", False)]
    # Nothing rewritten (no purify stage): each image is screened once.
    stage = BackdoorStage(Monitor(probe, profile), screen="both")
    try:
        alone = await stage.check(replace(request, received=()))
    finally:
        stage.close()
    assert [im["view"] for im in alone.details["images"]] == ["received"]
    assert alone.action == "allow"


def test_a_profile_for_another_model_stops_start_up(
    tmp_path: Path, upstream: AppServer, llava: tuple[Path, dict[str, Any]]
) -> None:
    path, identity = llava
    other = _profile(tmp_path, {**identity, "weights_sha256": "0" * 16}, clean_mean=0.0)
    with pytest.raises(ConfigError, match="differs in: weights_sha256"):
        _guard(upstream, path, other)
    with pytest.raises(ConfigError, match=r"backdoor\.profile is required"):
        RunningGuard(
            upstream.url + "/v1",
            {"pipeline": {"defenses": ["backdoor"]}, "backdoor": {"model": str(path)}},
        )


def test_the_weights_dtype_is_part_of_the_profile(
    tmp_path: Path, upstream: AppServer, llava: tuple[Path, dict[str, Any]]
) -> None:
    """A profile calibrated on bfloat16 weights is refused by a guard that loads them as the
    checkpoint's float32 (entropies move with the dtype), and serves with backdoor.dtype."""
    path, identity = llava
    model, processor = load_model(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and identity["dtype"] == "float32"
    half = model_identity(path, model)
    assert half["dtype"] == "bfloat16"
    profile = _profile(tmp_path, half, clean_mean=100.0)  # flags everything
    with pytest.raises(ConfigError, match="differs in: config_sha256, dtype, weights_sha256"):
        _guard(upstream, path, profile)
    guard = RunningGuard(
        upstream.url + "/v1",
        {
            "pipeline": {"defenses": ["backdoor"]},
            "backdoor": {"model": str(path), "profile": str(profile), "dtype": "bfloat16"},
        },
    )
    try:
        body = {"model": "echo", "messages": image_message(data_url(encode(gradient(32, 32))))}
        response = httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "content_policy_violation"
    finally:
        guard.close()
    # The bfloat16 probe measures what float32 does, to bfloat16's precision.
    image = [gradient(32, 32, seed=4)]
    signals = []
    for probe in (EntropyProbe(model, processor), EntropyProbe(*load_model(path))):
        signals.append(probe.signals(probe.prepare(image, ["hi"])))
    torch.testing.assert_close(signals[0], signals[1], atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        load_model(path, dtype="float64")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guard", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_calibrate_and_scan_commands(tmp_path: Path, llava: tuple[Path, dict[str, Any]]) -> None:
    path, identity = llava
    records = []
    for i in range(8):
        gradient(32, 32, seed=20 + i).save(tmp_path / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "a"}]
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": turns})
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    profile_path = tmp_path / "profile.json"
    model = ["--model", str(path), "--data", str(data), "--batch", "3"]
    both_tails = ["--combine", "either", "--crossview-high-quantile", "0.9"]
    done = _cli("backdoor", "calibrate", *model, "--out", str(profile_path), *both_tails)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    profile = BackdoorProfile.load(profile_path)
    assert summary["samples"] == profile.samples == 8 and summary["channels"] == profile.channels
    assert profile.identity == json.loads(json.dumps(identity))
    assert profile.crossview["views"] == 4 and profile.combine == "either"
    assert profile.crossview_low is not None and profile.crossview_high is not None
    assert profile.crossview_low <= profile.crossview_high
    assert "reference_samples" not in profile.selection

    # With trusted clean samples beside the data: measured too, and named in the profile.
    clean_set = tmp_path / "clean_set.jsonl"
    clean_set.write_text("\n".join(json.dumps(r) for r in records[:5]) + "\n")
    referenced = tmp_path / "referenced.json"
    done = _cli(
        "backdoor", "calibrate", *model, "--out", str(referenced), "--clean", str(clean_set)
    )
    assert done.returncode == 0, done.stderr
    with_clean = BackdoorProfile.load(referenced)
    assert with_clean.selection["reference_samples"] == 5
    assert json.loads(done.stdout)["method"] == with_clean.method
    clean_set.write_text(json.dumps(records[0]) + "\n")
    one = _cli("backdoor", "calibrate", *model, "--out", str(referenced), "--clean", str(clean_set))
    assert one.returncode == 2 and "clean reference needs at least two samples" in one.stderr

    clean = tmp_path / "clean.json"
    scanned = _cli("scan", *model, "--out", str(clean), "--profile", str(profile_path))
    assert scanned.returncode == 0, scanned.stderr
    report = json.loads((tmp_path / "clean.json.report.json").read_text())
    kept = json.loads(clean.read_text())
    assert report["samples"] == 8 and report["method"] == "profile"
    assert len(kept) == report["kept"] == 8 - len(report["flagged"])
    assert {r["id"] for r in kept} | {f["id"] for f in report["flagged"]} == {
        r["id"] for r in records
    }
    scores = Path(report["scores_file"]).read_text().splitlines()
    assert len(scores) == 1 + 8  # the identity line, then one line per sample
    again = _cli("scan", *model, "--out", str(clean), "--profile", str(profile_path))
    assert again.returncode == 0, again.stderr
    assert Path(report["scores_file"]).read_text().splitlines() == scores  # nothing rescored
    assert asdict(profile)["identity"]["model"] == str(path)
    half = _cli(
        "scan", *model, "--out", str(clean), "--profile", str(profile_path), "--dtype", "bfloat16"
    )
    assert (
        half.returncode == 2 and "differs in: config_sha256, dtype, weights_sha256" in half.stderr
    )
    bad = _cli("scan", "--model", str(path), "--data", str(tmp_path / "none.json"), "--out", "x")
    assert bad.returncode == 2 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr
