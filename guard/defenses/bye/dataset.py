"""LLaVA-style fine-tuning sets: a JSON list or JSONL of ``{"id", "image", "conversations"}``.

The probe's prompt for a record is its first human turn without the ``<image>`` placeholder
(BYE: template + image + first question, no answer). Images are paths relative to
``image_root`` (default: the data file's folder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.config import ConfigError

PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    prompt: str
    record: dict[str, Any]  # the original record, written back unchanged when kept


def read_records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path}: expected a list of records (JSON array or JSONL)")
    return records


def read_samples(path: Path, image_root: Path | None = None) -> list[Sample]:
    """Every record as a Sample; a record without an id, image or human turn is an error."""
    root = image_root or path.parent
    samples, seen = [], set()
    for n, record in enumerate(read_records(path), start=1):
        rid, image = record.get("id"), record.get("image")
        if rid is None or not isinstance(image, str):
            raise ConfigError(f"{path}: record {n} needs an 'id' and an 'image' path")
        if str(rid) in seen:
            raise ConfigError(f"{path}: id {rid!r} appears twice")
        seen.add(str(rid))
        samples.append(Sample(str(rid), root / image, _first_question(record, path, n), record))
    return samples


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """In the input's format: JSONL for a ``.jsonl`` path, a JSON array otherwise."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(list(records), indent=1) + "\n")


def _first_question(record: dict[str, Any], path: Path, n: int) -> str:
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            return str(turn.get("value", "")).replace(PLACEHOLDER, "").strip()
    raise ConfigError(f"{path}: record {n} has no human turn in 'conversations'")
