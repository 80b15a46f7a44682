"""API-key check shared by both transports (constant time, every key compared)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr

from guard.errors import Unauthenticated


def check_bearer(authorization: str | None, keys: Sequence[SecretStr]) -> None:
    """Accept ``Bearer <key>`` for any configured key; no keys configured means open."""
    if not keys:
        return
    token = ""
    if authorization is not None and authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
    supplied = token.encode()
    ok = False
    for key in keys:
        # No early exit: the time taken must not tell which key, or how much of one, matched.
        ok |= hmac.compare_digest(supplied, key.get_secret_value().encode())
    if not ok:
        raise Unauthenticated("invalid or missing API key")
