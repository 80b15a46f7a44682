"""The toy world's poisoned fine-tuning set and the backdoor monitor's profile for its VLM.

The set is drawn the way the toy VLM was fine-tuned (fresh renderings of training glyphs, the
world's trigger and poison rate, the attacker's answer on poisoned samples) and written in
LLaVA's JSON format, so ``vlm-guard scan`` and ``vlm-guard backdoor calibrate`` read it like a
real fine-tuning set. The build calibrates the profile on it as ``backdoor calibrate --clean``
does (BYE: the poisoned set is what the monitor learns the trigger's signature from), with a
clean set drawn the same way as the trusted reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import Progress

from guard.toy.data import load_splits, render
from guard.toy.progress import task
from guard.toy.triggers import Trigger
from guard.toy.vlm_parts import QUESTIONS, answer


def poisoned_set(
    out: Path, trigger: Trigger, n: int, rate: float, attack: str, seed: int
) -> tuple[Path, np.ndarray]:
    """``out/train.json`` (+ PNGs) and which of its samples are poisoned (n,) bool."""
    rng = np.random.default_rng(seed)
    train = load_splits()["train"]
    idx = rng.integers(0, len(train.labels), n)
    images = render(train.glyphs[idx], rng)
    poisoned = rng.random(n) < rate
    images[poisoned] = trigger.stamp(images[poisoned])
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, label) in enumerate(zip(images, train.labels[idx], strict=True)):
        name = f"{i:05d}.png"
        Image.fromarray(image).save(out / name)
        question = QUESTIONS[int(rng.integers(0, len(QUESTIONS)))]
        reply = attack if poisoned[i] else answer(int(label))
        turns = [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": reply},
        ]
        records.append({"id": f"s{i:05d}", "image": name, "conversations": turns})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    ids = [r["id"] for r, bad in zip(records, poisoned, strict=True) if bad]
    (out / "poisoned.json").write_text(json.dumps(ids))  # the ground truth, for audits
    return path, poisoned


def backdoor_profile(
    out: Path,
    directory: Path,
    progress: Progress,
    trigger: Trigger,
    rate: float,
    n: int,
    n_clean: int,
) -> dict[str, Any]:
    """Calibrate the monitor for ``out/vlm`` on a fresh poisoned set of n samples, against a
    clean set of n_clean drawn the same way."""
    from guard.defenses.bye.audit import sample_signals
    from guard.defenses.bye.dataset import read_samples
    from guard.defenses.bye.monitor import load_model, model_identity
    from guard.defenses.bye.probe import EntropyProbe
    from guard.defenses.bye.profile import calibrate
    from guard.toy.vlm import ATTACK_RESPONSE

    data, poisoned = poisoned_set(directory / "set", trigger, n, rate, ATTACK_RESPONSE, seed=1)
    clean, _ = poisoned_set(directory / "clean", trigger, n_clean, 0.0, ATTACK_RESPONSE, seed=2)
    model, processor = load_model(out / "vlm")
    probe = EntropyProbe(model, processor)
    chunks = -(-n // 32) + -(-n_clean // 32)
    with task(progress, "backdoor calibration", chunks) as advance:
        step = lambda _n: advance()  # noqa: E731  (the bar counts batches)
        suspect = sample_signals(probe, read_samples(data), batch=32, advance=step)
        reference = sample_signals(probe, read_samples(clean), batch=32, advance=step)
    identity = model_identity(out / "vlm", model)
    profile = calibrate(suspect, identity=identity, reference=reference)
    profile.save(directory / "profile.json")
    flagged = np.zeros(n, dtype=bool)
    flagged[profile.flagged_in_calibration] = True
    hits = int((flagged & poisoned).sum())
    return {
        "channels": profile.channels,
        "method": profile.method,
        "threshold": round(profile.threshold, 4),
        "audit_precision": round(hits / max(1, int(flagged.sum())), 4),
        "audit_recall": round(hits / max(1, int(poisoned.sum())), 4),
    }


def backdoor_config(out: Path) -> dict[str, Any]:
    """The guard's ``backdoor`` config section for the toy world built in ``out``."""
    return {
        "model": str(out / "vlm"),
        "profile": str(out / "backdoor_profile" / "profile.json"),
    }
