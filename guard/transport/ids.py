"""Request ids: the client's own when it is safe to echo and to log, else a fresh one."""

from __future__ import annotations

import re
import uuid

_SAFE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(supplied: str | None) -> str:
    return supplied if supplied and _SAFE.match(supplied) else uuid.uuid4().hex
