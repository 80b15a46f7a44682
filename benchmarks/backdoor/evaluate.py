"""One backdoored VLM, end to end: calibrate on its poisoned fine-tuning set (BYE), screen
clean and triggered test requests, audit the set, and time the monitor."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from benchmarks.backdoor.measure import Measured, cost, measure, roc, signals_only, z_low
from benchmarks.backdoor.purified import behind_purification
from benchmarks.backdoor.sets import arithmetic_prompts, test_set
from guard.defenses.bye.audit import decide, sample_signals, score_all
from guard.defenses.bye.crossview import CrossView, ViewSettings
from guard.defenses.bye.dataset import read_samples
from guard.defenses.bye.monitor import load_model, model_identity
from guard.defenses.bye.probe import EntropyProbe
from guard.defenses.bye.profile import calibrate, combined
from guard.toy.backdoor import poisoned_set
from guard.toy.data import eval_images, load_splits
from guard.toy.triggers import Trigger
from guard.toy.vlm import ATTACK_RESPONSE


def evaluate(
    name: str,
    model_dir: Path,
    trigger: Trigger,
    args: argparse.Namespace,
    progress: Progress,
    purifier_world: Path | None = None,
) -> dict[str, Any]:
    """Every figure of one VLM; with ``purifier_world``, also the monitor behind that world's
    purifier (benchmarks/backdoor/purified.py)."""
    model, processor = load_model(model_dir)
    probe = EntropyProbe(model, processor)
    identity = model_identity(model_dir, model)
    views = CrossView(probe, ViewSettings(args.views, args.mask_fraction, args.answer_tokens))

    # 1. The poisoned fine-tuning set, and trusted clean samples drawn the same way: the
    # profile (`backdoor calibrate --clean`), the audit with it (`scan --profile`), and BYE's
    # own audit of the set alone for comparison.
    work = args.work / f"train_{name}"  # scratch: the set's PNGs stay out of the results
    data, poisoned = poisoned_set(work, trigger, args.train, args.poison_rate, ATTACK_RESPONSE, 0)
    samples = read_samples(data)
    task = progress.add_task(f"{name}: entropies of the fine-tuning set", total=len(samples))
    cache = work / "scores.jsonl"
    cache.unlink(missing_ok=True)  # the set was just rewritten
    advance = lambda n: progress.advance(task, n)  # noqa: E731
    entropies = score_all(probe, samples, cache, identity, batch=args.batch, advance=advance)
    train = np.array([entropies[s.id] for s in samples])  # (N, layers, 1 + heads)
    trusted, _ = poisoned_set(
        args.work / f"clean_{name}", trigger, args.clean, 0.0, ATTACK_RESPONSE, 5
    )
    trusted_samples = read_samples(trusted)
    task = progress.add_task(f"{name}: the clean reference", total=len(trusted_samples))
    advance = lambda n: progress.advance(task, n)  # noqa: E731
    reference = sample_signals(probe, trusted_samples, batch=args.batch, advance=advance)
    profile = calibrate(train, identity=identity, reference=reference, k_sigma=args.k_sigma)
    audit = decide(samples, entropies, identity, profile)
    flagged = np.isin([s.id for s in samples], audit.flagged)
    bye = decide(samples, entropies, identity)
    bye_flagged = np.isin([s.id for s in samples], bye.flagged)

    # 2. Clean validation traffic: the cross-view threshold and the z-score references.
    val = _pil(eval_images(load_splits()["val"])[: args.images])
    tests = test_set(trigger, args.images)
    total = 4 * args.images
    task = progress.add_task(f"{name}: screening requests", total=total)
    step = lambda n: progress.advance(task, n)  # noqa: E731
    ref = measure(probe, views, val, tests.prompt, args.batch, step)
    clean = measure(probe, views, tests.clean, tests.prompt, args.batch, step)
    hit = measure(probe, views, tests.triggered, tests.prompt, args.batch, step)
    # Clean images under other prompts (the demo's arithmetic): the entropy rule's false blocks
    # where the calibration set (questions only) never looked.
    arithmetic = arithmetic_prompts(args.images)
    other = signals_only(probe, tests.clean, arithmetic, args.batch, step)
    assert ref.divergences is not None and clean.divergences is not None
    assert hit.divergences is not None

    low = float(np.quantile(ref.divergences, args.crossview_quantile))
    profile = replace(profile, crossview_low=low, combine=args.combine)
    layers = profile.layers

    def score(m: Measured) -> np.ndarray:
        return profile.scores(m.signals)

    def suspicion(m: Measured) -> dict[str, np.ndarray]:
        assert m.divergences is not None and ref.divergences is not None
        e = z_low(score(m), score(ref))
        v = z_low(m.divergences, ref.divergences)
        return {"entropy": e, "crossview": v, "combined": np.maximum(e, v)}

    s_clean, s_hit = suspicion(clean), suspicion(hit)
    flags_clean = combined(profile, score(clean), clean.divergences)
    flags_hit = combined(profile, score(hit), hit.divergences)
    attacked = np.array([ATTACK_RESPONSE in a for a in hit.answers])
    correct = np.array([a == t for a, t in zip(clean.answers, tests.truth, strict=True)])
    tp = int((flagged & poisoned).sum())
    bye_tp = int((bye_flagged & poisoned).sum())
    heads = train.shape[2] - 1
    behind = None
    if purifier_world is not None:
        behind = behind_purification(
            purifier_world, probe, profile, tests.clean, tests.triggered, tests.prompt,
            args.batch, progress,
        )  # fmt: skip
    timing = cost(
        probe, views, tests.clean[: args.batch], tests.prompt, layers, heads, args.repeats
    )
    return {
        "model": str(model_dir),
        "trigger": trigger.kind,
        "profile": {
            "channels": profile.channels,
            "method": profile.method,
            "selection": profile.selection,
            "threshold": profile.threshold,
            "crossview_low": low,
            "combine": profile.combine,
            "layer_fits": profile.layer_fits,
        },
        "roc": {k: roc(s_clean[k], s_hit[k]) for k in s_clean},
        "clean_accuracy": float(correct.mean()),
        "asr_direct": float(attacked.mean()),
        "asr_through_guard": float((attacked & ~flags_hit).mean()),
        "clean_false_block": float(flags_clean.mean()),
        "arithmetic_false_block": float(profile.entropy_flags(profile.scores(other)).mean()),
        "audit": {
            "method": profile.method,
            "poisoned": int(poisoned.sum()),
            "flagged": int(flagged.sum()),
            "precision": tp / max(1, int(flagged.sum())),
            "recall": tp / max(1, int(poisoned.sum())),
        },
        "audit_bye_alone": {
            "method": bye.method,
            "channels": bye.channels,
            "flagged": int(bye_flagged.sum()),
            "precision": bye_tp / max(1, int(bye_flagged.sum())),
            "recall": bye_tp / max(1, int(poisoned.sum())),
        },
        "cost": {
            **timing,
            "monitor_ratio": timing["monitor_s"] / timing["full_prefill_s"],
            "monitor_eager_ratio": timing["monitor_eager_s"] / timing["full_prefill_s"],
            "crossview_ratio": timing.get("crossview_s", 0.0) / timing["full_prefill_s"],
            "monitor_ratio_by_deepest_layer": [
                s / timing["full_prefill_s"] for s in timing["monitor_s_by_deepest_layer"]
            ],
        },
        "behind_purification": behind,
        "scores": {
            "clean": score(clean).tolist(),
            "triggered": score(hit).tolist(),
            "train": profile.scores(train).tolist(),
            "train_poisoned": poisoned.tolist(),
        },
    }


def _pil(arrays: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(a) for a in arrays]
