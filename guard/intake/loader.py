"""Turn the image sources of one request into decoded, limited, hashed images."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.config import ImagesConfig, RequestsConfig
from guard.errors import InvalidRequest
from guard.intake.decode import decode_image, parse_data_url
from guard.intake.fetch import Fetcher
from guard.intake.messages import ImageRef, RiskyFields, chat_parts, completion_text
from guard.types import GuardRequest, ImageInput


@dataclass(frozen=True)
class ImageSource:
    """An image given as raw bytes (gRPC) or as a URL (``data:`` or http(s))."""

    data: bytes | None = None
    url: str | None = None


class Intake:
    def __init__(
        self, cfg: ImagesConfig, fetcher: Fetcher, fields: RiskyFields | None = None
    ) -> None:
        self._cfg = cfg
        self._fetcher = fetcher
        self._fields = fields if fields is not None else RiskyFields(RequestsConfig())

    async def aclose(self) -> None:
        await self._fetcher.aclose()

    async def chat(
        self, request_id: str, body: Mapping[str, Any]
    ) -> tuple[GuardRequest, tuple[ImageRef, ...]]:
        self._fields.apply(request_id, body)
        parts = chat_parts(body)
        images = await self.load_all(
            [ImageSource(url=r.url) for r in parts.images], [r.param for r in parts.images]
        )
        return GuardRequest(request_id, parts.text, images, body), parts.images

    def completion(self, request_id: str, body: Mapping[str, Any]) -> GuardRequest:
        self._fields.apply(request_id, body)
        return GuardRequest(request_id, completion_text(body), (), body)

    async def load_all(
        self, sources: Sequence[ImageSource], params: Sequence[str]
    ) -> tuple[ImageInput, ...]:
        if len(sources) > self._cfg.max_images:
            raise InvalidRequest(
                f"too many images: {len(sources)} (at most {self._cfg.max_images})",
                param="messages",
            )
        # Fetch and decode concurrently; the first failure cancels the rest and is the one
        # reported (a TaskGroup would wrap it in an ExceptionGroup).
        tasks = [
            asyncio.ensure_future(self._load(i, s, p))
            for i, (s, p) in enumerate(zip(sources, params, strict=True))
        ]
        try:
            return tuple(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _load(self, index: int, source: ImageSource, param: str) -> ImageInput:
        if source.data is not None:
            data = source.data
        elif source.url is not None and source.url[:5].lower() == "data:":
            data = parse_data_url(source.url, self._cfg, param=param, index=index)
        elif source.url is not None:
            data = await self._fetcher.fetch(source.url, param=param, index=index)
        else:
            raise InvalidRequest(f"image {index}: no data and no URL", param=param)
        # Decoding is CPU work on possibly large inputs: keep it off the event loop.
        return await asyncio.to_thread(decode_image, data, index, self._cfg, param=param)
