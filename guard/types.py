"""Shared vocabulary of the guard: requests, images, decisions, verdicts and the Stage protocol.

Transports build a :class:`GuardRequest`, the pipeline runs :class:`Stage` objects over it and
returns a :class:`Verdict`; nothing else crosses those boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

Action = Literal["allow", "block", "rewrite"]
Outcome = Literal["allow", "block", "would_block", "error"]


@dataclass(frozen=True)
class ImageInput:
    """One decoded image of a request, exactly the pixels the guard checks and forwards."""

    index: int  # position among the request's image parts
    image: Image.Image  # RGB, decoded within limits
    digest: str  # sha256 over mode, size and pixels (not just bytes)


@dataclass(frozen=True)
class GuardRequest:
    """What the stages see: the judged text, the decoded images and the original body."""

    id: str
    text: str  # the text the reasoner judges (every text part, in order)
    images: tuple[ImageInput, ...]
    body: Mapping[str, Any] = field(default_factory=dict)  # rewritten only at forward time
    # The images as the client sent them, kept by the pipeline when a stage (purify) rewrites
    # ``images``; empty while nothing was rewritten.
    received: tuple[ImageInput, ...] = ()

    @property
    def images_as_received(self) -> tuple[ImageInput, ...]:
        return self.received or self.images


@dataclass(frozen=True)
class Decision:
    """One stage's answer about one request."""

    stage: str
    action: Action
    reason: str = ""
    category: str | None = None
    score: float | None = None
    images: tuple[ImageInput, ...] | None = None  # set when action == "rewrite"
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The pipeline's answer: what to do with the request and why.

    ``request`` is the request after every rewrite (purified images), the one to forward.
    ``blocking`` lists the decisions that block (or would block, in monitor mode).
    ``failed`` names the stages that raised or timed out under fail mode ``closed``.
    """

    outcome: Outcome
    request: GuardRequest
    decisions: tuple[Decision, ...]
    blocking: tuple[Decision, ...] = ()
    failed: tuple[str, ...] = ()

    @property
    def forward(self) -> bool:
        return self.outcome in ("allow", "would_block")


@runtime_checkable
class Stage(Protocol):
    """A defense. ``may_rewrite`` stages run first, one by one; the others run concurrently."""

    name: str
    may_rewrite: bool

    async def check(self, request: GuardRequest) -> Decision: ...

    def ready(self) -> bool: ...


@runtime_checkable
class Closeable(Protocol):
    """A stage that holds a model thread or other resources to release at shutdown."""

    def close(self) -> None: ...


@runtime_checkable
class AsyncCloseable(Protocol):
    """A stage whose resources belong to the event loop (an HTTP client pool)."""

    async def aclose(self) -> None: ...
