"""An OpenAI-compatible server that speaks like vLLM, for any small model (the CPU stand-in).

It serves ``/v1/models``, ``/v1/chat/completions`` (non-streaming and SSE streaming with
``stream_options.include_usage`` and ``[DONE]``) and ``/v1/completions``. Images arrive as
``data:`` URLs; a plain http(s) image URL is refused, because the guard must never forward
one. The model is anything with ``name`` and ``generate``; ``EchoModel`` is a deterministic
one for tests and benchmarks of the proxy itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image


class ChatModel(Protocol):
    name: str

    def generate(
        self, texts: Sequence[str], images: Sequence[Image.Image], params: dict[str, Any]
    ) -> Iterator[str]:
        """Yield the answer in pieces (tokens)."""
        ...


class EchoModel:
    """Answers with what it received: the last text and a digest of each image's pixels.

    The pixel digest is the guard's own (mode, size, pixels), so a test can prove the model saw
    exactly the pixels the guard checked.
    """

    def __init__(self, name: str = "echo") -> None:
        self.name = name

    def generate(
        self, texts: Sequence[str], images: Sequence[Image.Image], params: dict[str, Any]
    ) -> Iterator[str]:
        words = ["echo:", *(texts[-1].split() if texts else [])]
        words.append(f"images={len(images)}")
        words.extend(f"img:{pixel_digest(im)[:16]}" for im in images)
        max_tokens = params.get("max_tokens") or params.get("max_completion_tokens")
        if isinstance(max_tokens, int):
            words = words[:max_tokens]
        for i, word in enumerate(words):
            yield word if i == 0 else " " + word


def pixel_digest(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class BadRequest(Exception):
    """An error answer in vLLM's shape (its ``code`` is the status, an integer)."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        self.message, self.status, self.kind = message, status, kind


def create_app(
    model: ChatModel,
    *,
    token_delay_s: float = 0.0,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The stand-in server. ``app.state.received`` records every request body it was sent."""
    app = FastAPI(title="vlm-guard stand-in upstream", docs_url=None, redoc_url=None)
    app.state.received = []

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> Response:
        error = {"message": exc.message, "type": exc.kind, "param": None, "code": exc.status}
        return JSONResponse({"error": error}, status_code=exc.status)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model.name,
            "object": "model",
            "created": int(clock()),
            "owned_by": "vlm-guard",
            "root": model.name,
            "parent": None,
            "max_model_len": 2048,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        app.state.received.append(body)
        _check_model(body, model)
        texts, images = _read_messages(body.get("messages"))
        pieces = await asyncio.to_thread(lambda: list(model.generate(texts, images, body)))
        return await _answer(
            body,
            pieces,
            "chat",
            model.name,
            clock(),
            token_delay_s,
            prompt_tokens=sum(len(t.split()) for t in texts) + 16 * len(images),
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        app.state.received.append(body)
        _check_model(body, model)
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        pieces = await asyncio.to_thread(lambda: list(model.generate(texts, [], body)))
        return await _answer(
            body,
            pieces,
            "text",
            model.name,
            clock(),
            token_delay_s,
            prompt_tokens=sum(len(t.split()) for t in texts),
        )

    return app


def _check_model(body: dict[str, Any], model: ChatModel) -> None:
    if body.get("model") != model.name:
        # vLLM answers an unknown model with 404 NotFoundError.
        raise BadRequest(f"The model `{body.get('model')}` does not exist.", 404, "NotFoundError")


def _read_messages(messages: Any) -> tuple[list[str], list[Image.Image]]:
    texts: list[str] = []
    images: list[Image.Image] = []
    for message in messages or []:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if not url.startswith("data:"):
                    raise BadRequest("this stand-in only accepts data: image URLs")
                data = base64.b64decode(url.split(",", 1)[1])
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return texts, images


async def _answer(
    body: dict[str, Any],
    pieces: list[str],
    kind: str,
    name: str,
    now: float,
    delay: float,
    *,
    prompt_tokens: int,
) -> Response:
    seed = json.dumps(body, sort_keys=True).encode()
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    rid = prefix + hashlib.sha256(seed).hexdigest()[:24]
    created = int(now)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(pieces),
        "total_tokens": prompt_tokens + len(pieces),
    }
    if not body.get("stream"):
        return await _complete(pieces, kind, rid, created, name, usage, delay)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(
        _stream(pieces, kind, rid, created, name, usage if include_usage else None, delay),
        media_type="text/event-stream",
    )


async def _complete(
    pieces: list[str],
    kind: str,
    rid: str,
    created: int,
    name: str,
    usage: dict[str, int],
    delay: float,
) -> Response:
    if delay:
        await asyncio.sleep(delay * len(pieces))  # the same generation time as streaming
    text = "".join(pieces)
    choice: dict[str, Any] = {
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
    }
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
        obj = "chat.completion"
    else:
        choice["text"] = text
        obj = "text_completion"
    return JSONResponse(
        {
            "id": rid,
            "object": obj,
            "created": created,
            "model": name,
            "choices": [choice],
            "usage": usage,
        }
    )


async def _stream(
    pieces: list[str],
    kind: str,
    rid: str,
    created: int,
    name: str,
    usage: dict[str, int] | None,
    delay: float,
) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": name,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {"content": text} if text or finish else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if kind == "chat":
        yield event(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    for i, piece in enumerate(pieces):
        if delay:
            await asyncio.sleep(delay)
        last = i == len(pieces) - 1
        yield event([choice(piece, "stop" if last else None)])
    if not pieces:
        yield event([choice("", "stop")])
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"
