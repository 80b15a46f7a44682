"""``vlm-guard purify calibrate|run`` as a user runs them: real processes, tiny saved models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from guard.defenses.diffcap.profile import PurifyProfile
from tests.images import gradient
from tests.tiny_models import save_tiny_ddpm, save_tiny_open_clip


@pytest.fixture(scope="module")
def model_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    ddpm, clip = tmp_path_factory.mktemp("ddpm"), tmp_path_factory.mktemp("clip")
    save_tiny_ddpm(ddpm)
    save_tiny_open_clip(clip)
    return ["--diffusion", str(ddpm), "--encoder-model", f"local-dir:{clip}"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guard", "purify", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _clean_dir(tmp_path: Path, n: int, seed: int, size: tuple[int, int] = (16, 16)) -> Path:
    """n small clean PNGs to calibrate on."""
    data = tmp_path / "clean"
    data.mkdir()
    for i in range(n):
        gradient(*size, seed=seed + i).save(data / f"{i}.png")
    return data


def _run_one(
    model_flags: list[str], tmp_path: Path, image: Path, env: dict[str, str]
) -> dict[str, Any]:
    """``purify run`` on one image with the profile at tmp_path/p.json: its JSON line."""
    ran = _cli(
        "run", *model_flags, "--profile", str(tmp_path / "p.json"), str(image),
        "--out", str(tmp_path / "o"), env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    line: dict[str, Any] = json.loads(ran.stdout)
    return line


def test_calibrate_then_run_with_the_profile(tmp_path: Path, model_flags: list[str]) -> None:
    data = _clean_dir(tmp_path, 6, 0, (24, 20))
    (data / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    env = {"VLM_GUARD_PURIFY__T_MAX": "0.03"}  # 30 steps: 6 checks of 5
    profile_path = tmp_path / "profile.json"
    done = _cli(
        "calibrate",
        *model_flags,
        "--data",
        str(data),
        "--out",
        str(profile_path),
        "--quantile",
        "0.5",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    profile = PurifyProfile.load(profile_path)
    assert summary["images"] == profile.images == 6
    assert summary["tau"] == profile.tau and -1 <= profile.tau <= 1
    assert profile.target_steps == 10 and profile.identity["t_max"] == 0.03
    # At least half the clean images stop within 10 steps under the chosen tau (the rest by
    # the cap, 30): the mean clean t* is at most (3·10 + 3·30) / 6.
    assert 5 <= profile.clean_mean <= 20

    out = tmp_path / "out"
    ran = _cli(
        "run",
        *model_flags,
        "--profile",
        str(profile_path),
        str(data / "0.png"),
        str(data / "1.png"),
        "--out",
        str(out),
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["0.png", "1.png"]
    for line in lines:
        assert 5 <= line["t_star"] <= 30 and isinstance(line["score"], float)
        with Image.open(line["out"]) as purified:
            assert purified.size == (24, 20)

    # The same profile with another purifier (other t_max) is refused, in one line.
    other = _cli(
        "run", *model_flags, "--profile", str(profile_path), str(data / "0.png"), "--out", str(out)
    )
    assert other.returncode == 2
    assert "calibrated for a different purifier (differs in: t_max)" in other.stderr
    assert "Traceback" not in other.stderr


def test_calibrate_the_drift_rule_and_run_with_it(tmp_path: Path, model_flags: list[str]) -> None:
    data = _clean_dir(tmp_path, 4, 10)
    out = ["--data", str(data), "--out", str(tmp_path / "p.json"), "--drift-quantile", "0.25"]
    env = {"VLM_GUARD_PURIFY__T_MAX": "0.02", "VLM_GUARD_PURIFY__T_ESCALATE": "0.04"}
    refused = _cli("calibrate", *model_flags, *out, env=env)
    assert refused.returncode == 2
    assert "--drift-quantile needs purify.signal: denoised" in refused.stderr
    env["VLM_GUARD_PURIFY__SIGNAL"] = "denoised"
    done = _cli("calibrate", *model_flags, *out, env=env)
    assert done.returncode == 0, done.stderr
    profile = PurifyProfile.load(tmp_path / "p.json")
    assert json.loads(done.stdout)["drift_tau"] == profile.drift_tau
    assert profile.drift_quantile == 0.25 and profile.drift_tau is not None
    line = _run_one(model_flags, tmp_path, data / "0.png", env)
    assert line["drift"] and all(-1 <= d <= 1 for d in line["drift"])
    # Escalated (to 40) where the estimate drifted below drift_tau; kept shallow otherwise.
    below = min(line["drift"]) < profile.drift_tau
    assert line["stopped"] == "escalated" if below else line["t_star"] <= 20


@pytest.mark.parametrize(
    "args,needle",
    [
        (["calibrate", "--data", "/nonexistent", "--out", "/tmp/p.json"], "neither a directory"),
        (["run", "/nonexistent.png", "--out", "/tmp/o"], "cannot read /nonexistent.png"),
        (["run", "--encoder-features", "patches", "x.png", "--out", "/tmp/o"], "needs encoder: hf"),
    ],
)
def test_bad_input_is_one_line(args: list[str], needle: str, model_flags: list[str]) -> None:
    done = _cli(args[0], *model_flags, *args[1:])
    assert done.returncode == 2
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_calibrate_the_look_confirming_a_stop(tmp_path: Path, model_flags: list[str]) -> None:
    data = _clean_dir(tmp_path, 4, 20)
    out = ["--data", str(data), "--out", str(tmp_path / "p.json"), "--confirm-quantile", "0.25"]
    env = {
        "VLM_GUARD_PURIFY__T_MAX": "0.02",
        "VLM_GUARD_PURIFY__T_ESCALATE": "0.04",
        "VLM_GUARD_PURIFY__SIGNAL": "denoised",
    }
    refused = _cli("calibrate", *model_flags, *out, env=env)
    assert refused.returncode == 2
    assert "--confirm-quantile needs purify.confirm_steps > 0" in refused.stderr
    env["VLM_GUARD_PURIFY__CONFIRM_STEPS"] = "10"
    done = _cli("calibrate", *model_flags, *out, env=env)
    assert done.returncode == 0, done.stderr
    profile = PurifyProfile.load(tmp_path / "p.json")
    assert json.loads(done.stdout)["confirm_tau"] == profile.confirm_tau is not None
    assert (profile.confirm_steps, profile.confirm_quantile) == (10, 0.25)
    line = _run_one(model_flags, tmp_path, data / "0.png", env)
    # τ stops within k_max = 20 and the look at t* + 10 decides: kept there, or sent to 40.
    assert line["confirm_drift"] is not None
    below = line["confirm_drift"] < profile.confirm_tau
    assert (line["stopped"], line["t_star"]) == ("escalated", 40) if below else line["t_star"] <= 20
