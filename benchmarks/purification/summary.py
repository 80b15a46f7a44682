"""The numbers behind the tables and the JSON: accuracy and cost per defense, DiffCAP's t* on
clean vs attacked images, and DiffCAP against the best fixed t* on a 90/10 traffic mix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np

from benchmarks.purification.common import (
    MIX_ATTACKED,
    SAMPLERS,
    Condition,
    Defense,
    Outcome,
    stats,
)


def defense_row(
    defense: Defense, outcomes: dict[str, Outcome], attack_keys: list[str]
) -> dict[str, Any]:
    clean = outcomes["clean"]
    attacked_unet = np.concatenate([outcomes[k].unet_evals for k in attack_keys])
    attacked_enc = np.concatenate([outcomes[k].encoder_evals for k in attack_keys])
    row: dict[str, Any] = {
        "label": defense.label,
        "family": defense.family,
        "sampler": defense.sampler,
        "encoder": defense.encoder,
        "t_fixed": defense.t_fixed,
        "settings": asdict(defense.purifier.settings) if defense.purifier else None,
        "clean_accuracy": float(clean.correct.mean()),
        "robust_accuracy": float(np.mean([outcomes[k].correct.mean() for k in attack_keys])),
        "unet_evals_clean": float(clean.unet_evals.mean()),
        "unet_evals_attacked": float(attacked_unet.mean()),
        "encoder_evals_clean": float(clean.encoder_evals.mean()),
        "encoder_evals_attacked": float(attacked_enc.mean()),
        "unet_evals_mix": float(
            (1 - MIX_ATTACKED) * clean.unet_evals.mean() + MIX_ATTACKED * attacked_unet.mean()
        ),
        "encoder_evals_mix": float(
            (1 - MIX_ATTACKED) * clean.encoder_evals.mean() + MIX_ATTACKED * attacked_enc.mean()
        ),
        "images_per_s_clean": (len(clean.correct) / clean.seconds if clean.seconds > 0 else None),
        "images_per_s_all": (
            sum(len(o.correct) for o in outcomes.values())
            / sum(o.seconds for o in outcomes.values())
            if defense.family != "none"
            else None
        ),
        "conditions": {},
    }
    for key, o in outcomes.items():
        entry: dict[str, Any] = {
            "accuracy": float(o.correct.mean()),
            "unet_evals_mean": float(o.unet_evals.mean()),
            "encoder_evals_mean": float(o.encoder_evals.mean()),
            "seconds": round(o.seconds, 3),
            "images_per_s": len(o.correct) / o.seconds if o.seconds > 0 else None,
        }
        if o.hit_target is not None:
            entry["target_success"] = float(o.hit_target.mean())
        if o.t_star is not None:
            entry["t_star"] = stats(o.t_star)
        row["conditions"][key] = entry
    return row


def diffcap_picture(
    outcomes: dict[str, Outcome], attack_keys: list[str], k_max: int
) -> dict[str, Any]:
    """Per-image view of the adaptive stop: t* of clean vs attacked, and the early stoppers."""
    clean = outcomes["clean"]
    assert clean.t_star is not None
    p50 = float(np.percentile(clean.t_star, 50))
    out: dict[str, Any] = {
        "clean": stats(clean.t_star),
        "clean_p50": p50,
        "clean_stopped_at_t_max": float((clean.t_star >= k_max).mean()),
        "attacks": {},
    }
    for key in attack_keys:
        o = outcomes[key]
        assert o.t_star is not None
        early = o.t_star <= p50
        out["attacks"][key] = {
            "t_star": stats(o.t_star),
            "stopped_at_or_below_clean_p50": float(early.mean()),
            "accuracy_early": float(o.correct[early].mean()) if early.any() else None,
            "accuracy_late": float(o.correct[~early].mean()) if (~early).any() else None,
            "stopped_at_t_max": float((o.t_star >= k_max).mean()),
        }
    return out


def same_t_star(
    results: dict[str, dict[str, Outcome]], conditions: list[Condition], encoders: Iterable[str]
) -> dict[str, bool]:
    """Per encoder: is t* the same under DDPM and DDIM? It should be: noising comes first,
    from the same per-image seeds. Empty when only one sampler ran."""
    if not all(f"diffcap_{name}_{s}" in results for name in encoders for s in SAMPLERS):
        return {}
    return {
        name: all(
            np.array_equal(
                results[f"diffcap_{name}_ddpm"][c.key].t_star,  # type: ignore[arg-type]
                results[f"diffcap_{name}_ddim"][c.key].t_star,  # type: ignore[arg-type]
            )
            for c in conditions
        )
        for name in encoders
    }


def traffic_mix(
    defenses: list[Defense], rows: dict[str, dict[str, Any]], encoders: Iterable[str]
) -> dict[str, Any]:
    """90/10 traffic: each DiffCAP row against the fixed t* with the best robust accuracy
    (ties: the smaller t*), same sampler, and the issue's three goals."""
    none_clean = rows["none"]["clean_accuracy"]
    mix: dict[str, Any] = {}
    for sampler in dict.fromkeys(d.sampler for d in defenses if d.family == "diffpure"):
        fixed = [d for d in defenses if d.family == "diffpure" and d.sampler == sampler]
        best = max(fixed, key=lambda d: (rows[d.key]["robust_accuracy"], -(d.t_fixed or 0)))
        b = rows[best.key]
        for name in encoders:
            key = f"diffcap_{name}_{sampler}"
            r = rows[key]
            ratio = r["unet_evals_mix"] / b["unet_evals_mix"] if b["unet_evals_mix"] else None
            gap = r["robust_accuracy"] - b["robust_accuracy"]
            drop = none_clean - r["clean_accuracy"]
            goals = {
                "robust_within_2_points": gap >= -0.02,
                "unet_ratio_at_most_0.25": ratio is not None and ratio <= 0.25,
                "clean_drop_at_most_3_points": drop <= 0.03,
            }
            mix[key] = {
                "best_fixed": best.key,
                "robust_accuracy": r["robust_accuracy"],
                "best_fixed_robust_accuracy": b["robust_accuracy"],
                "robust_gap": gap,
                "clean_accuracy_drop_vs_none": drop,
                "unet_evals_mix": r["unet_evals_mix"],
                "encoder_evals_mix": r["encoder_evals_mix"],
                "best_fixed_unet_evals_mix": b["unet_evals_mix"],
                "unet_ratio": ratio,
                "goals": goals,
            }
    return mix
