"""White-box L∞ PGD on the undefended VLM: untargeted and targeted, at each eps (the adaptive
attack, which also goes through the purifier, is in adaptive.py)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from rich.progress import Progress

from benchmarks.purification.common import EPSILONS, TARGET_SHIFT, Condition, chunks
from guard.toy.attacks import PGDSettings, pgd_vlm
from guard.toy.vlm_parts import answer


def make_attacks(
    model: Any,
    processor: Any,
    images: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
    progress: Progress,
) -> list[Condition]:
    """White-box PGD on the undefended VLM: untargeted and targeted, at each eps."""
    truth = [answer(int(label)) for label in labels]
    wrong = [answer((int(label) + TARGET_SHIFT) % 10) for label in labels]
    parts = chunks(len(images), args.attack_batch)
    task = progress.add_task("PGD on the VLM", total=2 * len(EPSILONS) * len(parts))
    out = []
    for targeted in (False, True):
        for e in EPSILONS:
            eps = e / 255
            settings = PGDSettings(eps=eps, step=eps / 4, steps=args.pgd_steps, seed=args.seed)
            answers = wrong if targeted else truth
            start = time.perf_counter()
            adversarial = np.empty_like(images)
            for part in parts:
                progress.update(
                    task, description=f"PGD {'targeted' if targeted else 'untargeted'} ε={e}/255"
                )
                adversarial[part] = pgd_vlm(
                    model, processor, images[part], answers[part], settings, targeted=targeted
                )
                progress.advance(task)
            kind = "targeted" if targeted else "untargeted"
            out.append(
                Condition(
                    key=f"{kind}_{e}",
                    label=f"{kind[0]}{e}",
                    images=adversarial,
                    targets=wrong if targeted else None,
                    seconds=time.perf_counter() - start,
                )
            )
    return out
