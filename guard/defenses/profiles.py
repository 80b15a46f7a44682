"""What the defenses' calibration profiles share: a JSON file with a version, and the identity
of the models it was made for, checked at load so a profile never meets another model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from guard.config import ConfigError


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def check_identity(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], *, stage: str, made_for: str
) -> None:
    """Refuse, in one line, a profile whose identity differs from the loaded models'."""
    a, b = jsonable(dict(mine)), jsonable(dict(theirs))
    if a != b:
        differ = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
        raise ConfigError(
            f"{stage}.profile was calibrated for a different {made_for} "
            f"(differs in: {', '.join(differ)}); run vlm-guard {stage} calibrate again"
        )


def save(profile: Any, path: Path) -> None:
    """A profile dataclass as indented JSON."""
    path.write_text(json.dumps(jsonable(asdict(profile)), indent=2) + "\n")


def read(path: Path, *, stage: str, version: int) -> dict[str, Any]:
    """A profile's fields, or one clear ConfigError (unreadable, not an object, other version)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {stage} profile {path}: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{stage} profile {path}: expected a JSON object")
    if data.get("version") != version:
        raise ConfigError(
            f"{stage} profile {path}: version {data.get('version')!r}, expected {version}; "
            f"run vlm-guard {stage} calibrate again"
        )
    return data
