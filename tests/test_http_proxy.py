"""The official openai client, unchanged, through a real guard (uvicorn on loopback)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest

from guard.config import ImagesConfig
from guard.intake.decode import decode_image, image_digest
from tests.images import data_url, encode, gradient, image_message
from tests.servers import AppServer, RunningGuard

IMAGE = gradient(64, 48)
PNG = encode(IMAGE)
DIGEST16 = image_digest(decode_image(PNG, 0, ImagesConfig(), param="x").image)[:16]


def _expected(text: str = "What is in this image?") -> str:
    return f"echo: {text} images=1 img:{DIGEST16}"


def test_sync_client_non_stream_with_image(guard: RunningGuard) -> None:
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="echo",
        messages=image_message(data_url(PNG)),
        max_tokens=64,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content == _expected()
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_sync_client_stream_with_usage(guard: RunningGuard) -> None:
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="echo",
        messages=image_message(data_url(PNG)),  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected()
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_async_client_stream_and_non_stream(guard: RunningGuard) -> None:
    client = openai.AsyncOpenAI(base_url=guard.url + "/v1", api_key="unused")
    jpeg = encode(IMAGE, "JPEG", quality=90)
    messages: Any = image_message(data_url(jpeg, "image/jpeg"), text="describe")
    reply = await client.chat.completions.create(model="echo", messages=messages)
    digest = image_digest(decode_image(jpeg, 0, ImagesConfig(), param="x").image)[:16]
    assert reply.choices[0].message.content == f"echo: describe images=1 img:{digest}"
    stream = await client.chat.completions.create(model="echo", messages=messages, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == reply.choices[0].message.content
    await client.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_response_bytes_pass_through_unchanged(
    guard: RunningGuard, upstream: AppServer, stream: bool
) -> None:
    body = {
        "model": "echo",
        "messages": image_message(data_url(PNG)),
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    via_guard = httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=10)
    forwarded = upstream.app.state.received[-1]  # exactly what the guard sent upstream
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=forwarded, timeout=10)
    assert via_guard.status_code == direct.status_code == 200
    assert via_guard.content == direct.content
    assert via_guard.headers["content-type"] == direct.headers["content-type"]
    if stream:
        assert via_guard.content.endswith(b"data: [DONE]\n\n")


def test_image_forwarded_as_png_data_url_of_checked_pixels(
    guard: RunningGuard, upstream: AppServer
) -> None:
    webp = encode(IMAGE, "WEBP", lossless=True)
    httpx.post(
        guard.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "echo", "messages": image_message(data_url(webp, "image/webp"))},
    )
    part = upstream.app.state.received[-1]["messages"][0]["content"][1]
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")

    forwarded = decode_image(base64.b64decode(url.split(",", 1)[1]), 0, ImagesConfig(), param="x")
    assert forwarded.digest == image_digest(IMAGE)


def test_unused_fields_pass_through_untouched(guard: RunningGuard, upstream: AppServer) -> None:
    extras: dict[str, Any] = {
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "n": 1,
        "logprobs": True,
        "top_logprobs": 2,
        "seed": 1234,
        "temperature": 0.7,
        "top_k": 5,  # vLLM extra sampling parameter
        "repetition_penalty": 1.05,
        "guided_choice": ["a", "b"],
        "user": "u-1",
    }
    messages = [
        {"role": "system", "content": "be brief", "name": "sys"},
        {"role": "user", "content": "hello there"},
    ]
    body = {"model": "echo", "messages": messages, **extras}
    reply = httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=10)
    assert reply.status_code == 200
    assert upstream.app.state.received[-1] == body


def test_completions_and_models_pass_through(guard: RunningGuard, upstream: AppServer) -> None:
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused")
    done = client.completions.create(model="echo", prompt="one two three", seed=3)
    assert done.choices[0].text == "echo: one two three images=0"
    assert upstream.app.state.received[-1] == {
        "model": "echo",
        "prompt": "one two three",
        "seed": 3,
    }
    streamed = client.completions.create(model="echo", prompt="four", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "echo: four images=0"
    via_guard = httpx.get(guard.url + "/v1/models", timeout=10)
    direct = httpx.get(upstream.url + "/v1/models", timeout=10)
    assert via_guard.status_code == 200 and via_guard.content == direct.content
    assert [m.id for m in client.models.list()] == ["echo"]


def test_upstream_client_errors_reach_the_client(guard: RunningGuard) -> None:
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert "does not exist" in str(info.value)
    # In the guard's own shape: vLLM's integer code becomes a string.
    assert info.value.body == {
        "message": "The model `no-such-model` does not exist.",
        "type": "invalid_request_error",
        "param": None,
        "code": "404",
    }
