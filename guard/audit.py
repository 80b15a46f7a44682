"""Audit log: one JSON line per blocked or would-block request.

The line names the request, the stages that blocked, their categories and reasons and the
image digests. Raw prompts are only included when configured; raw images never are.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from guard.config import AuditConfig
from guard.types import Verdict

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, cfg: AuditConfig, stream: IO[str] | None = None) -> None:
        self._cfg = cfg
        self._owned = stream is None and cfg.path is not None
        if stream is not None:
            self._stream = stream
        elif cfg.path is not None:
            self._stream = open(cfg.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        else:
            self._stream = sys.stderr

    def record(self, verdict: Verdict, *, transport: str) -> None:
        """Write the verdict if it blocked or would have blocked; otherwise do nothing."""
        if not verdict.blocking and not verdict.failed:
            return
        request = verdict.request
        entry: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "event": "vlm_guard.audit",
            "request_id": request.id,
            "transport": transport,
            "outcome": verdict.outcome,
            "blocking": [
                {
                    "stage": d.stage,
                    "category": d.category,
                    "reason": d.reason,
                    "score": d.score,
                    "details": _jsonable(d.details),
                }
                for d in verdict.blocking
            ],
            "failed_stages": list(verdict.failed),
            "image_digests": [i.digest for i in request.images],
        }
        if self._cfg.include_prompt:
            entry["prompt"] = request.text
        try:
            self._stream.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # An audit sink failure must not turn into a client error, but it must be loud.
            log.critical("cannot write audit record for request %s", request.id)

    def close(self) -> None:
        if self._owned:
            self._stream.close()


def _jsonable(value: Any) -> Any:
    """Details come from stages; keep what JSON can carry and name the rest."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, Mapping):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [_jsonable(v) for v in value]
        return repr(type(value).__name__)
