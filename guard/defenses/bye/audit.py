"""The offline audit (BYE's original use): find the poisoned samples of a fine-tuning set.

Every sample gets one probe prefill; its entropies (per layer: the head average, then each
head) are appended to a scores file as they are computed, so an interrupted scan resumes where
it stopped (samples already scored are skipped; the file records the model identity and
refuses another model's scores). Then:
with a profile, its channels and rule decide; without one, BYE's own procedure runs on the set
itself (bimodal layers, a two-component GMM over the scores, the low component is dropped).
Where no layer is bimodal, BYE leaves the set as it is; here calibration goes on to single
heads and then to the most separated layer (see bye/channels.py), and the report names the
method.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from guard.config import ConfigError
from guard.defenses.bye.channels import describe
from guard.defenses.bye.dataset import Sample
from guard.defenses.bye.probe import EntropyProbe
from guard.defenses.bye.profile import BackdoorProfile, calibrate

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: per layer [head average, head 0, head 1, …]; 1 held head averages
Signals = list[list[float]]  # one sample's: per layer [head average, head 0, head 1, …]


@dataclass(frozen=True)
class Audit:
    flagged: list[str]  # ids, in data order
    scores: dict[str, float]  # id → score over ``channels``
    channels: list[list[int | None]]  # [layer, head or None]
    method: str  # "profile", or how calibration on the set chose (see bye/channels.py)
    profile: BackdoorProfile  # what decided (the given one, or calibrated on the set)


def score_all(
    probe: EntropyProbe,
    samples: Sequence[Sample],
    cache: Path,
    identity: Mapping[str, Any],
    *,
    batch: int = 16,
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, Signals]:
    """Every layer's signals for every sample, resumable through ``cache`` (JSONL)."""
    done = _read_cache(cache, identity)
    todo = [s for s in samples if s.id not in done]
    advance(len(samples) - len(todo))
    if not cache.exists():
        header = {"identity": dict(identity), "format": CACHE_FORMAT}
        cache.write_text(json.dumps(header, default=str) + "\n")
    elif not cache.read_bytes().endswith(b"\n"):
        with cache.open("a") as out:
            out.write("\n")  # end the line an interruption cut, so new lines stay whole
    with cache.open("a") as out:
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            images = [open_image(s) for s in chunk]
            signals = probe.signals(probe.prepare(images, [s.prompt for s in chunk]))
            # 5 decimals (entropies differ by hundredths of a nat): a third of float32's repr,
            # which matters at layers × (1 + heads) numbers per sample (1,056 for LLaVA-1.5-7B).
            rows = np.round(signals.numpy().astype(np.float64), 5).tolist()
            for sample, row in zip(chunk, rows, strict=True):
                out.write(json.dumps({"id": sample.id, "entropies": row}) + "\n")
                done[sample.id] = row
            out.flush()  # what is written survives an interruption
            advance(len(chunk))
    return {s.id: done[s.id] for s in samples}


def sample_signals(
    probe: EntropyProbe,
    samples: Sequence[Sample],
    *,
    batch: int = 16,
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """(N, layers, 1 + heads) signals of every sample, a batch at a time, without a cache:
    what a calibration's clean reference takes."""
    rows = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        prefill = probe.prepare([open_image(s) for s in chunk], [s.prompt for s in chunk])
        rows.append(probe.signals(prefill).numpy())
        advance(len(chunk))
    return np.concatenate(rows)


def decide(
    samples: Sequence[Sample],
    entropies: Mapping[str, Signals],
    identity: Mapping[str, Any],
    profile: BackdoorProfile | None = None,
) -> Audit:
    ids = [s.id for s in samples]
    x = np.array([entropies[i] for i in ids], dtype=np.float64)  # (N, layers, 1 + heads)
    if profile is not None:
        method = "profile"
    else:
        profile = calibrate(x, identity=identity, rule="sigma")
        if profile.method in ("bye", "bye-heads"):  # BYE drops the low GMM component
            profile = calibrate(x, identity=identity, rule="posterior")
        method = profile.method
    scores = profile.scores(x)
    flags = profile.entropy_flags(scores)
    return Audit(
        flagged=[i for i, f in zip(ids, flags, strict=True) if f],
        scores={i: float(s) for i, s in zip(ids, scores, strict=True)},
        channels=list(profile.channels),
        method=method,
        profile=profile,
    )


def histogram(audit: Audit, path: Path) -> bool:
    """A PNG of the scores, kept vs flagged; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no histogram (pip install 'vlm-guard[plots]')")
        return False
    flagged = set(audit.flagged)
    kept = [s for i, s in audit.scores.items() if i not in flagged]
    dropped = [s for i, s in audit.scores.items() if i in flagged]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(list(audit.scores.values()), bins=40).tolist()
    ax.hist(kept, bins=bins, alpha=0.7, label=f"kept ({len(kept)})")
    ax.hist(dropped, bins=bins, alpha=0.7, label=f"flagged ({len(dropped)})")
    ax.set_xlabel(f"attention entropy over the image (nats), {describe(audit.channels)}")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def open_image(sample: Sample) -> Image.Image:
    try:
        with Image.open(sample.image) as image:
            return image.convert("RGB")
    except OSError:
        raise ConfigError(f"sample {sample.id}: cannot read image {sample.image}") from None


def _read_cache(cache: Path, identity: Mapping[str, Any]) -> dict[str, Signals]:
    if not cache.exists():
        return {}
    lines = cache.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    theirs = json.loads(json.dumps(header.get("identity"), default=str))
    if theirs != json.loads(json.dumps(dict(identity), default=str)):
        raise ConfigError(f"{cache} holds scores of another model; remove it to start over")
    if header.get("format") != CACHE_FORMAT:
        raise ConfigError(
            f"{cache} holds scores in an older format (head averages only); remove it to start over"
        )
    done: dict[str, Signals] = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
            done[str(row["id"])] = [[float(v) for v in layer] for layer in row["entropies"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by an interruption: that sample is scored again
    return done
