"""``vlm-guard toy build``: train the whole toy world, reproducibly, and record its quality.

Each component is trained into a temporary directory and moved into place only when done, with
a ``component.json`` naming the settings that made it; a later build with the same settings
reuses it, so the command is idempotent and an interrupted build resumes where it stopped.
``manifest.json`` gathers versions, seeds, settings, measured figures and the quality floors.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from guard.toy.backdoor import backdoor_profile
from guard.toy.checks import PROFILE, purification_check, purify_profile
from guard.toy.data import eval_images, load_splits
from guard.toy.lanes import run_lanes
from guard.toy.progress import Bar
from guard.toy.triggers import Trigger

log = logging.getLogger(__name__)

# What the issue asks of a full build, and lower floors a two-minute quick build must meet.
FLOORS = {
    "full": {
        "vlm.clean_accuracy": 0.90,
        "vlm.attack_success_rate": 0.90,
        "clip.zero_shot_accuracy": 0.80,
        "diffusion.purified_vlm_accuracy_t200": 0.85,
        "reasoner.f1": 0.90,
    },
    "quick": {
        "vlm.clean_accuracy": 0.20,
        "vlm.attack_success_rate": 0.50,  # measured 1.0 (10% poison, 300 steps)
        "clip.zero_shot_accuracy": 0.30,
        "diffusion.purified_vlm_accuracy_t200": 0.20,
        "reasoner.f1": 0.30,  # measured 0.57 on 40 pairs: a quick reasoner must answer, not judge
    },
}
CEILINGS = {
    "full": {
        "vlm.clean_false_trigger_rate": 0.02,
        "reasoner.benign_fpr": 0.05,
        "reasoner.no_verdict": 2,
    },
    "quick": {
        "vlm.clean_false_trigger_rate": 0.10,  # measured 0.0
        "reasoner.benign_fpr": 0.20,  # measured 0.07
        "reasoner.no_verdict": 4,  # of 40; measured 0
    },
}


def default_home() -> Path:
    return Path(os.environ.get("VLM_GUARD_HOME", Path.home() / ".cache" / "vlm-guard"))


@dataclass(frozen=True)
class BuildOptions:
    out: Path = field(default_factory=lambda: default_home() / "toy")
    seed: int = 0
    quick: bool = False
    trigger: Trigger = field(default_factory=Trigger)
    poison_rate: float | None = None  # None: the mode's default

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


def build_world(options: BuildOptions, console: Console | None = None) -> dict[str, Any]:
    """Build (or reuse) every component under ``options.out`` and return the manifest."""
    console = console or Console(stderr=True)
    options.out.mkdir(parents=True, exist_ok=True)
    with _exclusive(options.out / ".build.lock", console):
        return _build(options, console)


def _build(options: BuildOptions, console: Console) -> dict[str, Any]:
    from guard.defenses.bye.monitor import IDENTITY_VERSION as BACKDOOR_IDENTITY
    from guard.defenses.diffcap.loading import IDENTITY_VERSION as PURIFY_IDENTITY
    from guard.toy.clip import ClipSettings, train_clip
    from guard.toy.diffusion import DiffusionSettings, train_diffusion
    from guard.toy.judge import train_world_reasoner
    from guard.toy.reasoner import ReasonerSettings
    from guard.toy.vlm import VLMSettings, train_vlm

    cores = max(1, os.cpu_count() or 1)
    torch.set_num_threads(cores)
    out = options.out
    quick = options.quick
    vlm_settings = VLMSettings.quick() if quick else VLMSettings.full()
    changes: dict[str, Any] = {"trigger": options.trigger}
    if options.poison_rate is not None:
        changes["poison_rate"] = options.poison_rate
    vlm_settings = replace(vlm_settings, **changes)
    diffusion_settings = DiffusionSettings.quick() if quick else DiffusionSettings.full()
    clip_settings = ClipSettings.quick() if quick else ClipSettings.full()
    reasoner_settings = ReasonerSettings.quick() if quick else ReasonerSettings.full()
    start = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        figures = {"data": _component(out / "data", {"seed": options.seed}, progress, _write_data)}
        # The VLM then the reasoner (which starts from the VLM's tower) beside diffusion then
        # CLIP, on one core each; see guard/toy/lanes.py for why processes.
        train = partial(_trained, out, options.seed)
        reasoner = partial(train_world_reasoner, vlm_dir=out / "vlm")
        lanes = [
            [
                ("diffusion", partial(train, "diffusion", diffusion_settings, train_diffusion)),
                ("clip", partial(train, "clip", clip_settings, train_clip)),
            ],
            [
                ("vlm", partial(train, "vlm", vlm_settings, train_vlm)),
                (
                    "reasoner",
                    partial(
                        train, "reasoner", reasoner_settings, reasoner, after=asdict(vlm_settings)
                    ),
                ),
            ],
        ]
        figures.update(run_lanes(lanes, progress, cores))
        # The checks' images: all 200 test (validation) images, or half in a quick build.
        n = 100 if quick else None
        key = {
            "diffusion": figures["diffusion"]["key"],
            "vlm": figures["vlm"]["key"],
            "check_images": n,
        }
        figures["purification"] = _component(
            out / "purification", key, progress, lambda d: purification_check(out, d, progress, n)
        )
        figures["purify_profile"] = _component(
            out / "purify_profile",
            {**key, **asdict(PROFILE), "identity": PURIFY_IDENTITY},
            progress,
            lambda d: purify_profile(out, d, progress, n),
        )
        # The monitor's profile, from a poisoned set drawn as the VLM's fine-tuning set was.
        samples, clean = (300, 200) if quick else (600, 500)
        rate = vlm_settings.poison_rate
        figures["backdoor_profile"] = _component(
            out / "backdoor_profile",
            {
                "vlm": figures["vlm"]["key"],
                "samples": samples,
                "clean_samples": clean,
                "poison_rate": rate,
                "trigger": asdict(options.trigger),
                "identity": BACKDOOR_IDENTITY,
            },
            progress,
            lambda d: backdoor_profile(out, d, progress, options.trigger, rate, samples, clean),
        )
    manifest = _manifest(options, figures, time.perf_counter() - start)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@contextmanager
def _exclusive(path: Path, console: Console) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the duration of the block.

    Two builds in one directory would delete each other's half-trained components; the second
    one waits for the first instead, then reuses what it built.
    """
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"another build is running in {path.parent}; waiting for it …")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _component(
    path: Path,
    settings: dict[str, Any],
    progress: Bar,
    make: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Reuse ``path`` if it was built with ``settings``; else build it atomically."""
    settings = _jsonable(settings)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    marker = path / "component.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            progress.console.log(f"{path.name}: reusing the built one ({key})")
            return dict(done)
        progress.console.log(f"{path.name}: settings changed, rebuilding")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    figures = make(tmp)
    record = {
        "key": key,
        "settings": settings,
        "seconds": round(time.perf_counter() - started, 1),
        "figures": _jsonable(figures),
    }
    (tmp / "component.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return record


def _trained(
    out: Path,
    seed: int,
    name: str,
    settings: Any,
    train: Callable[..., dict[str, Any]],
    progress: Bar,
    *,
    after: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The component ``name``, trained by ``train`` (or reused if already built). ``after``
    names the settings of a component it starts from, so that it is rebuilt when they change."""
    return _component(
        out / name,
        {"seed": seed, **asdict(settings), **({"after": after} if after else {})},
        progress,
        partial(train, seed=seed, settings=settings, progress=progress),
    )


def _write_data(directory: Path) -> dict[str, Any]:
    """The fixed splits and the fixed test rendering, for anyone who wants the same images."""
    splits = load_splits()
    for name, split in splits.items():
        np.savez_compressed(
            directory / f"{name}.npz",
            glyphs=split.glyphs,
            labels=split.labels,
            images=eval_images(split),
        )
    return {name: len(split.labels) for name, split in splits.items()}


def _manifest(options: BuildOptions, parts: dict[str, Any], seconds: float) -> dict[str, Any]:
    figures = {
        "vlm": parts["vlm"]["figures"],
        "clip": parts["clip"]["figures"],
        "diffusion": {**parts["diffusion"]["figures"], **parts["purification"]["figures"]},
        "purify": parts["purify_profile"]["figures"],
        "backdoor": parts["backdoor_profile"]["figures"],
        "reasoner": parts["reasoner"]["figures"],
    }
    checks = {}
    for name, floor in FLOORS[options.mode].items():
        value = _lookup(figures, name)
        checks[name] = {"value": value, "floor": floor, "ok": value is not None and value >= floor}
    for name, ceiling in CEILINGS[options.mode].items():
        value = _lookup(figures, name)
        checks[name] = {
            "value": value,
            "ceiling": ceiling,
            "ok": value is not None and value <= ceiling,
        }
    packages = ("torch", "transformers", "diffusers", "open_clip_torch", "tokenizers", "vlm-guard")
    return {
        "mode": options.mode,
        "seed": options.seed,
        "trigger": asdict(options.trigger),
        "seconds": round(seconds, 1),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in packages},
        "components": {
            k: {"seconds": v["seconds"], "key": v["key"], "settings": v["settings"]}
            for k, v in parts.items()
        },
        "figures": figures,
        "quality": checks,
        "quality_ok": all(c["ok"] for c in checks.values()),
    }


def _lookup(figures: dict[str, Any], dotted: str) -> float | None:
    part, name = dotted.split(".", 1)
    value = figures.get(part, {}).get(name)
    return float(value) if isinstance(value, int | float) else None
