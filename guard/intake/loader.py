"""Turn the image sources of one request into decoded, limited, hashed images."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from guard.config import ImagesConfig, RequestsConfig
from guard.errors import InvalidRequest
from guard.intake.budget import Hold, PixelBudget
from guard.intake.decode import decode_image, header_pixels, parse_data_url
from guard.intake.fetch import Fetcher
from guard.intake.messages import ImageRef, RiskyFields, chat_parts, completion_text
from guard.types import GuardRequest, ImageInput

T = TypeVar("T")


@dataclass(frozen=True)
class ImageSource:
    """An image given as raw bytes (gRPC) or as a URL (``data:`` or http(s))."""

    data: bytes | None = None
    url: str | None = None


class Intake:
    """Fetches, checks and decodes a request's images, within the shared pixel budget: a
    caller holds ``pixels.hold(transport)`` for as long as the decoded images live."""

    def __init__(
        self,
        cfg: ImagesConfig,
        fetcher: Fetcher,
        fields: RiskyFields | None = None,
        pixels: PixelBudget | None = None,
    ) -> None:
        self._cfg = cfg
        self._fetcher = fetcher
        self._fields = fields if fields is not None else RiskyFields(RequestsConfig())
        self.pixels = pixels if pixels is not None else PixelBudget(cfg)

    async def aclose(self) -> None:
        await self._fetcher.aclose()

    async def chat(
        self, request_id: str, body: Mapping[str, Any], hold: Hold
    ) -> tuple[GuardRequest, tuple[ImageRef, ...]]:
        self._fields.apply(request_id, body)
        parts = chat_parts(body)
        images = await self.load_all(
            [ImageSource(url=r.url) for r in parts.images], [r.param for r in parts.images], hold
        )
        return GuardRequest(request_id, parts.text, images, body), parts.images

    def completion(self, request_id: str, body: Mapping[str, Any]) -> GuardRequest:
        self._fields.apply(request_id, body)
        return GuardRequest(request_id, completion_text(body), (), body)

    async def load_all(
        self, sources: Sequence[ImageSource], params: Sequence[str], hold: Hold
    ) -> tuple[ImageInput, ...]:
        """Fetch every image and check its header, reserve their pixels in ``hold`` (waiting for
        room), then decode them: no pixel is decoded outside the budget."""
        if len(sources) > self._cfg.max_images:
            raise InvalidRequest(
                f"too many images: {len(sources)} (at most {self._cfg.max_images})",
                param="messages",
            )
        pairs = enumerate(zip(sources, params, strict=True))
        read = await _all(self._read(i, source, param) for i, (source, param) in pairs)
        await hold.reserve(sum(pixels for _, pixels in read))
        # Decoding is CPU work on possibly large inputs: keep it off the event loop.
        return tuple(
            await _all(
                asyncio.to_thread(decode_image, data, i, self._cfg, param=p)
                for i, ((data, _), p) in enumerate(zip(read, params, strict=True))
            )
        )

    async def _read(self, index: int, source: ImageSource, param: str) -> tuple[bytes, int]:
        """The image's bytes, and its pixel count from a header that passed every limit."""
        if source.data is not None:
            data = source.data
        elif source.url is not None and source.url[:5].lower() == "data:":
            data = parse_data_url(source.url, self._cfg, param=param, index=index)
        elif source.url is not None:
            data = await self._fetcher.fetch(source.url, param=param, index=index)
        else:
            raise InvalidRequest(f"image {index}: no data and no URL", param=param)
        pixels = await asyncio.to_thread(header_pixels, data, index, self._cfg, param=param)
        return data, pixels


async def _all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest and is the one raised (a
    TaskGroup would wrap it in an ExceptionGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
