"""The monitor behind purification, as the toy world's guard runs it: each test image is
purified with the world's purifier (its config and profile), and the backdoor stage screens the
image as received, as purified, or both (``backdoor.screen``). Entropy rule only: the world's
guard profile does not use the cross-view check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import Progress

from benchmarks.backdoor.measure import signals_only
from guard.config import PurifyConfig
from guard.defenses.bye.probe import EntropyProbe
from guard.defenses.bye.profile import BackdoorProfile
from guard.defenses.diffcap import Purifier
from guard.defenses.diffcap.loading import load_purifier
from guard.defenses.diffcap.purifier import pil_to_tensor, tensor_to_pil
from guard.toy.checks import purify_config
from guard.toy.vlm import ATTACK_RESPONSE, answer_images


def purify_all(
    purifier: Purifier, images: Sequence[Image.Image], progress: Progress
) -> list[Image.Image]:
    """``purifier`` over ``images``, in batches of 50 (seeded: results do not depend on the
    batch)."""
    task = progress.add_task("purifying test images", total=len(images))
    out: list[Image.Image] = []
    for i in range(0, len(images), 50):
        chunk = [pil_to_tensor(im) for im in images[i : i + 50]]
        out += [tensor_to_pil(r.image) for r in purifier.purify_batch(chunk)]
        progress.advance(task, len(chunk))
    return out


def behind_purification(
    world: Path,
    probe: EntropyProbe,
    profile: BackdoorProfile,
    clean: Sequence[Image.Image],
    triggered: Sequence[Image.Image],
    prompt: str,
    batch: int,
    progress: Progress,
) -> dict[str, Any]:
    """Flag rates per view for clean and triggered images, the attack's success on the
    purified triggered images (what the model would answer were nothing blocked), and what
    passes the whole guard (purify, then the monitor on both views)."""
    purifier, _, _ = load_purifier(PurifyConfig(**purify_config(world)))
    task = progress.add_task("screening both views", total=4 * len(clean))

    def flags(images: Sequence[Image.Image]) -> np.ndarray:
        advance = lambda n: progress.advance(task, n)  # noqa: E731
        signals = signals_only(probe, images, [prompt] * len(images), batch, advance)
        out: np.ndarray = profile.entropy_flags(profile.scores(signals))
        return out

    # name -> (purified images, flags as received, flags as purified)
    views: dict[str, tuple[list[Image.Image], np.ndarray, np.ndarray]] = {}
    for name, received in (("clean", clean), ("triggered", triggered)):
        purified = purify_all(purifier, received, progress)
        views[name] = (purified, flags(received), flags(purified))
    rates = {
        name: {
            "received": float(as_received.mean()),
            "purified": float(as_purified.mean()),
            "both": float((as_received | as_purified).mean()),
        }
        for name, (_, as_received, as_purified) in views.items()
    }
    purified_hit, hit_received, hit_purified = views["triggered"]
    arrays = np.stack([np.asarray(im) for im in purified_hit])
    answers = answer_images(probe.model, probe.processor, arrays, question=prompt)
    attacked = np.array([ATTACK_RESPONSE in a for a in answers])
    return {
        "flagged": rates,
        "asr_purified": float(attacked.mean()),
        "asr_through_guard": float((attacked & ~(hit_received | hit_purified)).mean()),
    }
