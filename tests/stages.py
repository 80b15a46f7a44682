"""Test-only stages implementing the Stage protocol, to drive the pipeline's semantics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from PIL import ImageOps

from guard.intake.decode import image_digest
from guard.types import Decision, GuardRequest, ImageInput


@dataclass
class Fixed:
    """Always answers ``action``; records every request it saw."""

    name: str
    action: str = "allow"
    category: str | None = None
    may_rewrite: bool = False
    seen: list[GuardRequest] = field(default_factory=list)

    async def check(self, request: GuardRequest) -> Decision:
        self.seen.append(request)
        return Decision(
            self.name,
            self.action,
            reason=f"fixed {self.action}",  # type: ignore[arg-type]
            category=self.category,
            score=1.0,
            details={"k": [1, 2]},
        )

    def ready(self) -> bool:
        return True


@dataclass
class Raises:
    name: str
    may_rewrite: bool = False
    error: type[Exception] = RuntimeError

    async def check(self, request: GuardRequest) -> Decision:
        raise self.error("secret internal detail /etc/passwd 0xdeadbeef")

    def ready(self) -> bool:
        return True


@dataclass
class Sleeps:
    name: str
    seconds: float
    may_rewrite: bool = False

    async def check(self, request: GuardRequest) -> Decision:
        await asyncio.sleep(self.seconds)
        return Decision(self.name, "allow")

    def ready(self) -> bool:
        return True


@dataclass
class Inverts:
    """A rewriting stage (like purify): returns every image with inverted pixels."""

    name: str = "purify"
    may_rewrite: bool = True
    seen: list[GuardRequest] = field(default_factory=list)

    async def check(self, request: GuardRequest) -> Decision:
        self.seen.append(request)
        out = []
        for im in request.images:
            inverted = ImageOps.invert(im.image)
            out.append(ImageInput(im.index, inverted, image_digest(inverted)))
        details = {"images": [{"steps": 7, "similarity": [0.9, 0.99]} for _ in out]}
        return Decision(self.name, "rewrite", images=tuple(out), details=details)

    def ready(self) -> bool:
        return True


@dataclass
class Rendezvous:
    """Finishes only once every stage sharing ``barrier`` has started: proves concurrency."""

    name: str
    barrier: asyncio.Barrier
    may_rewrite: bool = False

    async def check(self, request: GuardRequest) -> Decision:
        async with asyncio.timeout(2):
            await self.barrier.wait()
        return Decision(self.name, "allow")

    def ready(self) -> bool:
        return True


@dataclass
class NotReady(Fixed):
    def ready(self) -> bool:
        return False
