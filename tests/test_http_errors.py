"""Errors, headers, blocks, auth, readiness and metrics of the HTTP transport."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from guard.config import StageConfig
from tests.images import data_url, encode, gradient, image_message
from tests.servers import AppServer, RunningGuard
from tests.stages import Fixed, NotReady, Raises

PNG = encode(gradient(32, 32))
CHAT = {"model": "echo", "messages": image_message(data_url(PNG))}
LEAKS = re.compile(r"Traceback|Error\(|0x[0-9a-f]{6,}|/etc/|\.py\b|secret internal", re.I)


def _post(guard: RunningGuard, body: Any = CHAT, **kw: Any) -> httpx.Response:
    return httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=10, **kw)


def _assert_openai_error(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert not LEAKS.search(response.text), response.text
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    return dict(error)


def test_request_id_on_every_response(guard: RunningGuard) -> None:
    ok = _post(guard, headers={"x-request-id": "client-id-1"})
    assert ok.headers["x-request-id"] == "client-id-1"
    assert ok.headers["x-guard-decision"] == "allow"
    bad = _post(guard, headers={"x-request-id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])
    assert httpx.get(guard.url + "/healthz").headers["x-request-id"]


@pytest.mark.parametrize(
    "path,method",
    [
        ("/tokenize", "POST"),
        ("/v1/load_lora_adapter", "POST"),
        ("/invocations", "POST"),
        ("/pause", "POST"),
        ("/v1/embeddings", "POST"),
        ("/health", "GET"),
        ("/docs", "GET"),
        ("/v1/chat/completions/../../tokenize", "POST"),
        ("/v1/audio/transcriptions", "POST"),
    ],
)
def test_only_guard_routes_exist(
    guard: RunningGuard, upstream: AppServer, path: str, method: str
) -> None:
    before = len(upstream.app.state.received)
    response = httpx.request(method, guard.url + path, json={"model": "echo"}, timeout=10)
    error = _assert_openai_error(response, 404, "not_found_error")
    assert error["code"] == "not_found"
    assert len(upstream.app.state.received) == before


def test_wrong_method(guard: RunningGuard) -> None:
    response = httpx.get(guard.url + "/v1/chat/completions")
    _assert_openai_error(response, 405, "invalid_request_error")


@pytest.mark.parametrize(
    "content,status,param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (json.dumps({"model": "echo"}).encode(), 400, "messages"),
        (json.dumps({"model": "echo", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
        (
            json.dumps(
                {
                    "model": "echo",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "video_url",
                                    "video_url": {"url": "data:video/mp4;base64,AAAA"},
                                }
                            ],
                        }
                    ],
                }
            ).encode(),
            400,
            "messages[0].content[0]",
        ),
        (
            json.dumps(
                {
                    "model": "echo",
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": 5}}],
                        }
                    ],
                }
            ).encode(),
            400,
            "messages[0].content[0].image_url",
        ),
    ],
    ids=[
        "bad-json",
        "not-object",
        "not-utf8",
        "no-messages",
        "empty-messages",
        "no-model",
        "video-part",
        "url-not-string",
    ],
)
def test_malformed_bodies(guard: RunningGuard, content: bytes, status: int, param: str) -> None:
    response = httpx.post(
        guard.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    error = _assert_openai_error(response, status, "invalid_request_error")
    assert response.headers["x-should-retry"] == "false"
    if param is not None:
        assert error["param"] == param


def test_body_limit(make_guard: Any) -> None:
    guard = make_guard({"server": {"max_body_bytes": 50_000}})
    big = {"model": "echo", "messages": image_message(data_url(b"\0" * 60_000))}
    _assert_openai_error(_post(guard, big), 413, "invalid_request_error")
    # Chunked upload without Content-Length is cut off at the same limit.
    payload = json.dumps(big).encode()
    response = httpx.post(guard.url + "/v1/chat/completions", content=iter([payload]), timeout=10)
    _assert_openai_error(response, 413, "invalid_request_error")


@pytest.mark.parametrize(
    "url,status",
    [
        (data_url(PNG[: len(PNG) // 2]), 400),
        (data_url(encode(gradient(1, 1))), 400),
        (data_url(encode(gradient(400, 4))), 400),
        (data_url(b"hello world", "text/plain"), 400),
        ("data:image/png;base64,!!!notbase64", 400),
        ("http://127.0.0.1:1/secret.png", 400),
        ("http://169.254.169.254/latest/meta-data/", 400),
        ("file:///etc/passwd", 400),
        ("http://0x7f000001/x.png", 400),
    ],
    ids=[
        "truncated",
        "1x1",
        "aspect",
        "text",
        "bad-base64",
        "loopback",
        "metadata",
        "file",
        "hex-ip",
    ],
)
def test_bad_images_are_refused(guard: RunningGuard, url: str, status: int) -> None:
    response = _post(guard, {"model": "echo", "messages": image_message(url)})
    error = _assert_openai_error(response, status, "invalid_request_error")
    assert error["param"] == "messages[0].content[1].image_url.url"


def test_too_many_images(guard: RunningGuard) -> None:
    part = {"type": "image_url", "image_url": {"url": data_url(PNG)}}
    body = {"model": "echo", "messages": [{"role": "user", "content": [part] * 9}]}
    error = _assert_openai_error(_post(guard, body), 400, "invalid_request_error")
    assert "too many images" in error["message"]


def test_api_keys(make_guard: Any) -> None:
    guard = make_guard({"server": {"api_keys": ["k-one", "k-two"]}})
    _assert_openai_error(_post(guard), 401, "authentication_error")
    _assert_openai_error(
        _post(guard, headers={"authorization": "Bearer nope"}), 401, "authentication_error"
    )
    assert _post(guard, headers={"authorization": "Bearer k-two"}).status_code == 200
    assert httpx.get(guard.url + "/v1/models").status_code == 401
    assert httpx.get(guard.url + "/healthz").status_code == 200
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="k-one")
    assert (
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
        .choices[0]
        .message.content
        == "echo: hi images=0"
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guard.url + "/v1", api_key="k-three").models.list()


def test_block_as_error_and_audit_line(
    make_guard: Any, upstream: AppServer, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    guard = make_guard(
        {"audit": {"path": str(audit)}}, stages=[Fixed("reasoner", "block", category="violence")]
    )
    before = len(upstream.app.state.received)
    response = _post(guard, headers={"x-request-id": "req-42"})
    error = _assert_openai_error_any_id(response, 400)
    assert error["code"] == "content_policy_violation"
    assert response.headers["x-guard-decision"] == "block"
    assert response.headers["x-request-id"] == "req-42"
    assert len(upstream.app.state.received) == before  # never forwarded
    [line] = audit.read_text().splitlines()
    record = json.loads(line)
    assert record["request_id"] == "req-42" and record["outcome"] == "block"
    assert record["blocking"][0]["stage"] == "reasoner"
    assert record["blocking"][0]["category"] == "violence"
    assert len(record["image_digests"]) == 1 and "prompt" not in record
    assert (
        guard.metric("vlm_guard_blocked_total", {"stage": "reasoner", "category": "violence"}) == 1
    )
    assert guard.metric("vlm_guard_requests_total", {"transport": "http", "outcome": "block"}) == 1


def _assert_openai_error_any_id(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert not LEAKS.search(response.text)
    return dict(response.json()["error"])


def test_block_as_refusal(make_guard: Any) -> None:
    guard = make_guard(
        {"server": {"block_response": "refusal", "refusal_message": "No."}},
        stages=[Fixed("reasoner", "block")],
    )
    client = openai.OpenAI(base_url=guard.url + "/v1", api_key="unused")
    messages: Any = image_message(data_url(PNG))
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=messages)
    assert raw.headers["x-guard-decision"] == "block"
    reply = raw.parse()
    assert reply.choices[0].message.content == "No."
    assert reply.choices[0].finish_reason == "content_filter"
    chunks = list(
        client.chat.completions.create(
            model="echo", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "No."
    assert chunks[-2].choices[0].finish_reason == "content_filter"
    assert chunks[-1].usage is not None
    done = client.completions.create(model="echo", prompt="hi")
    assert done.choices[0].finish_reason == "content_filter"


def test_monitor_mode_forwards(make_guard: Any, upstream: AppServer) -> None:
    guard = make_guard({"pipeline": {"mode": "monitor"}}, stages=[Fixed("reasoner", "block")])
    response = _post(guard)
    assert response.status_code == 200
    assert response.headers["x-guard-decision"] == "would_block"
    assert (
        guard.metric("vlm_guard_requests_total", {"transport": "http", "outcome": "would_block"})
        == 1
    )


def test_stage_failure_closed_is_503(make_guard: Any, upstream: AppServer) -> None:
    guard = make_guard(
        stages=[Raises("backdoor")], stage_configs={"backdoor": StageConfig(fail_mode="closed")}
    )
    before = len(upstream.app.state.received)
    response = _post(guard)
    error = _assert_openai_error(response, 503, "guard_unavailable")
    assert error["code"] == "guard_unavailable"
    assert response.headers["x-guard-decision"] == "error"
    assert response.headers["retry-after"] == "1"
    assert len(upstream.app.state.received) == before


def test_stage_failure_open_forwards(make_guard: Any) -> None:
    guard = make_guard(
        stages=[Raises("backdoor")], stage_configs={"backdoor": StageConfig(fail_mode="open")}
    )
    assert _post(guard).status_code == 200
    assert guard.metric("vlm_guard_fail_open_total", {"stage": "backdoor"}) == 1


def test_config_fail_mode_reaches_the_pipeline(make_guard: Any) -> None:
    guard = make_guard({"backdoor": {"fail_mode": "open"}}, stages=[Raises("backdoor")])
    assert _post(guard).status_code == 200
    guard = make_guard({"backdoor": {"fail_mode": "closed"}}, stages=[Raises("backdoor")])
    assert _post(guard).status_code == 503


def test_upstream_down(make_guard: Any) -> None:
    guard = make_guard(upstream_url="http://127.0.0.1:9/v1")
    response = _post(guard)
    _assert_openai_error(response, 502, "upstream_error")
    assert response.headers["retry-after"] == "1"
    assert httpx.get(guard.url + "/readyz").status_code == 503
    assert (
        guard.metric("vlm_guard_requests_total", {"transport": "http", "outcome": "upstream_error"})
        == 1
    )


def test_readiness(make_guard: Any) -> None:
    assert httpx.get(make_guard().url + "/readyz").json() == {"status": "ready"}
    not_ready = make_guard(stages=[NotReady("reasoner")])
    assert httpx.get(not_ready.url + "/readyz").status_code == 503


def test_metrics_endpoint(guard: RunningGuard) -> None:
    _post(guard)
    _post(guard, {"model": "echo"})
    text = httpx.get(guard.url + "/metrics").text
    assert 'vlm_guard_requests_total{outcome="allow",transport="http"} 1.0' in text
    assert 'vlm_guard_requests_total{outcome="invalid",transport="http"} 1.0' in text
    assert "vlm_guard_inflight_requests 0.0" in text
    for name in (
        "vlm_guard_upstream_seconds",
        "vlm_guard_stage_seconds",
        "vlm_guard_purify_steps",
        "vlm_guard_backdoor_entropy",
        "vlm_guard_fail_open_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text
