"""Upstream faults (issue 8): a fault proxy between the guard and the stand-in upstream.

Every case runs over HTTP and gRPC Chat, non-streamed and streamed, against one guard and proxy
per case (each request meets the fault, kept-alive connection or not). What a client must see:

- before any byte of the answer was sent: an error status (502 upstream_unavailable, 503
  upstream_overloaded, 504 upstream_timeout) with Retry-After (<= 60 s) and never
  ``x-should-retry: false``; over gRPC UNAVAILABLE / DEADLINE_EXCEEDED with a retry-after
  trailer;
- after the stream started: the events so far, unchanged and whole, then an OpenAI-shaped
  ``error`` event and no ``data: [DONE]`` (gRPC: the chunks so far, then UNAVAILABLE);
- the POST reached the proxy at most once; no call outlives its timeout; no exception text,
  address, path or traceback in any answer.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import httpx
import openai
import pytest

from guard.sse import EventFramer, SSEError, SSEParser
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.faultproxy import PASS, Fault, FaultProxy
from tests.servers import AppServer, RunningGuard

TIMEOUT = 1.0  # the guard's connect and read timeouts in these tests
SLACK = 5.0  # generous: the suite must pass on a slow, shared 2-core machine
CONFIG = {
    "upstream": {
        "connect_timeout_s": TIMEOUT,
        "read_timeout_s": TIMEOUT,
        "ready_timeout_s": TIMEOUT,
    }
}
FOREVER = 60.0  # a delay no call may wait out: only the guard's own timeout can end it

CHAT_BODY: dict[str, Any] = {
    "model": "echo",
    "messages": [{"role": "user", "content": "tell me about faults"}],
}
TEXT = "echo: tell me about faults images=0"
LEAKS = re.compile(
    r"Traceback|Error\(|RuntimeError|CUDA|0x[0-9a-f]{4,}|/opt/|\.py\b|\bline \d|"
    r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|localhost|Errno|refused|reset by peer",
    re.I,
)

# Markers where the proxy cuts a response (bytes before the marker go through).
BODY_START = b'{"id"'  # after the headers (JSON), inside the first event (SSE)
MID_BODY = b'"finish_reason":"stop"'  # mid-body (JSON), inside the last content event (SSE)
DONE = b"data: [DONE]"  # SSE only: every event but the terminator


@dataclass(frozen=True)
class Expect:
    kind: Literal["ok", "error", "broken"]
    status: int = 200
    code: str = ""
    retry_after: str = "1"
    slow: bool = False  # ends by one of the guard's timeouts: takes at least TIMEOUT


OK = Expect("ok")
BROKEN = Expect("broken")
STALLED = Expect("broken", slow=True)
E502 = Expect("error", 502, "upstream_unavailable")
E503 = Expect("error", 503, "upstream_overloaded")
E504 = Expect("error", 504, "upstream_timeout", slow=True)


@dataclass(frozen=True)
class Case:
    fault: Fault
    json: Expect | None  # None: the fault has no meaning there (an SSE-only marker)
    sse: Expect | None


CASES: dict[str, Case] = {
    "pass": Case(PASS, OK, OK),
    "refuse": Case(Fault("refuse"), E502, E502),
    "blackhole": Case(Fault("blackhole"), E504, E504),  # connect timeout
    "slow-headers": Case(Fault("slow_headers", delay_s=FOREVER), E504, E504),
    "slow-within-timeout": Case(Fault("slow_headers", delay_s=0.2), OK, OK),
    "reset-before-response": Case(Fault("reset"), E502, E502),
    "reset-after-headers": Case(Fault("reset", at=BODY_START), E502, E502),
    "reset-mid-body": Case(Fault("reset", at=MID_BODY), E502, BROKEN),
    "reset-before-done": Case(Fault("reset", at=DONE), None, BROKEN),
    "stall-after-headers": Case(Fault("stall", at=BODY_START), E504, E504),
    "stall-mid-body": Case(Fault("stall", at=MID_BODY), E504, STALLED),
    "truncate-mid-body": Case(Fault("truncate", at=MID_BODY), E502, BROKEN),
    "truncate-before-done": Case(Fault("truncate", at=DONE), None, BROKEN),
    "clean-end-without-done": Case(Fault("drop_done"), None, BROKEN),
    "storm-500": Case(Fault("storm", statuses=(500,)), E502, E502),
    "storm-502": Case(Fault("storm", statuses=(502,)), E502, E502),
    "storm-503": Case(Fault("storm", statuses=(503,)), E503, E503),
    "storm-503-retry-after-7": Case(
        Fault("storm", statuses=(503,), retry_after="7"),
        Expect("error", 503, "upstream_overloaded", "7"),
        Expect("error", 503, "upstream_overloaded", "7"),
    ),
    "storm-503-retry-after-capped": Case(
        Fault("storm", statuses=(503,), retry_after="86400"),
        Expect("error", 503, "upstream_overloaded", "60"),
        Expect("error", 503, "upstream_overloaded", "60"),
    ),
    "storm-503-retry-after-date": Case(
        Fault("storm", statuses=(503,), retry_after="Wed, 21 Oct 2015 07:28:00 GMT"),
        E503,
        E503,
    ),
}

PARAMS = [
    pytest.param(name, stream, id=f"{name}-{'sse' if stream else 'json'}")
    for name, case in CASES.items()
    for stream in (False, True)
    if (case.sse if stream else case.json) is not None
]
GRPC_CODES = {
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass
class Rig:
    guard: RunningGuard
    proxy: FaultProxy
    upstream: AppServer


def _rig(upstream: AppServer) -> Iterator[Rig]:
    with FaultProxy(upstream.port) as proxy:
        guard = RunningGuard(proxy.url + "/v1", CONFIG)
        try:
            yield Rig(guard, proxy, upstream)
        finally:
            guard.close()


@pytest.fixture
def rig(upstream: AppServer) -> Iterator[Rig]:
    """A fault proxy in front of the stand-in upstream, and a fresh guard in front of both."""
    yield from _rig(upstream)


@pytest.fixture(scope="module")
def case_name(request: pytest.FixtureRequest) -> str:
    """The case (a key of CASES): parametrized indirectly, so that tests group by case."""
    return str(request.param)


@pytest.fixture(scope="module")
def case_rig(case_name: str, upstream: AppServer) -> Iterator[Rig]:
    """One guard and proxy for the four runs of a case (starting guards is the slow part)."""
    yield from _rig(upstream)


def chat_body(stream: bool) -> dict[str, Any]:
    if stream:
        return {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    return dict(CHAT_BODY)


def direct_events(upstream: AppServer) -> list[str]:
    """The whole SSE answer to what the guard last forwarded, straight from the upstream."""
    forwarded = upstream.app.state.received[-1]  # type: ignore[attr-defined]
    response = httpx.post(upstream.url + "/v1/chat/completions", json=forwarded, timeout=10)
    return parse_sse(response.content)


def parse_sse(raw: bytes) -> list[str]:
    parser = SSEParser()
    events = parser.feed(raw)
    parser.close()  # the guard's stream must end on an event boundary, whatever happened
    return events


def assert_bounds(elapsed: float, expect: Expect) -> None:
    if expect.slow:
        assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK, elapsed
    else:
        assert elapsed < SLACK, elapsed


def assert_no_leak(text: str, proxy: FaultProxy) -> None:
    assert not LEAKS.search(text), text
    assert str(proxy.port) not in text, text


def assert_attempts(rig: Rig, name: str, before: int) -> None:
    # Never a second POST once one was sent; a refused or blackholed port saw none at all.
    expected = 0 if name in ("refuse", "blackhole") else 1
    assert rig.proxy.attempts() - before == expected


# --- HTTP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("case_name", "stream"), PARAMS, indirect=["case_name"], scope="module")
def test_http(case_rig: Rig, case_name: str, stream: bool) -> None:
    rig, case = case_rig, CASES[case_name]
    expect = case.sse if stream else case.json
    assert expect is not None
    rig.proxy.set(case.fault)
    before = rig.proxy.attempts()
    start = time.perf_counter()
    response = httpx.post(
        rig.guard.url + "/v1/chat/completions", json=chat_body(stream), timeout=FOREVER
    )
    elapsed = time.perf_counter() - start
    assert_attempts(rig, case_name, before)
    assert_bounds(elapsed, expect)
    assert response.headers.get("x-should-retry") != "false"
    if expect.kind == "error":
        assert response.status_code == expect.status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("upstream_error", expect.code)
        assert response.headers["retry-after"] == expect.retry_after
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.headers["x-should-retry"] == "true"
        assert_no_leak(response.text, rig.proxy)
        return
    assert response.status_code == 200, response.text
    if not stream:
        assert response.json()["choices"][0]["message"]["content"] == TEXT
        return
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.content)
    direct = direct_events(rig.upstream)
    if expect.kind == "ok":
        assert events == direct and events[-1] == "[DONE]"
        return
    # Broken after the first bytes: what was relayed is a prefix of the true answer, whole
    # events only, then one error event, and no [DONE] pretending the answer was complete.
    *relayed, last = events
    assert relayed and relayed == direct[: len(relayed)]
    assert b"[DONE]" not in response.content
    error = json.loads(last)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error"
    assert_no_leak(last, rig.proxy)


# --- gRPC Chat ------------------------------------------------------------------------------


@pytest.mark.parametrize(("case_name", "stream"), PARAMS, indirect=["case_name"], scope="module")
async def test_grpc(case_rig: Rig, case_name: str, stream: bool) -> None:
    rig, case = case_rig, CASES[case_name]
    expect = case.sse if stream else case.json
    assert expect is not None
    rig.proxy.set(case.fault)
    before = rig.proxy.attempts()
    received: list[str] = []
    error: grpc.aio.AioRpcError | None = None
    start = time.perf_counter()
    async with grpc.aio.insecure_channel(rig.guard.grpc_target) as channel:
        call = pb_grpc.GuardStub(channel).Chat(
            pb.ChatRequest(json=json.dumps(chat_body(stream))), timeout=FOREVER
        )
        try:
            async for chunk in call:
                received.append(chunk.json)
        except grpc.aio.AioRpcError as e:
            error = e
    elapsed = time.perf_counter() - start
    assert_attempts(rig, case_name, before)
    assert_bounds(elapsed, expect)
    if expect.kind == "ok":
        assert error is None
        if stream:
            assert received == direct_events(rig.upstream)[:-1]  # [DONE] is not a chunk
        else:
            (only,) = received
            assert json.loads(only)["choices"][0]["message"]["content"] == TEXT
        return
    assert error is not None
    assert_no_leak(str(error.details()), rig.proxy)
    if expect.kind == "error":
        assert received == []
        assert error.code() == GRPC_CODES[expect.status]
        trailers = dict(error.trailing_metadata() or ())
        assert trailers.get("retry-after") == expect.retry_after
        return
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert received and received == direct_events(rig.upstream)[: len(received)]


# --- readiness ------------------------------------------------------------------------------

DOWN = {
    "refuse": Fault("refuse"),
    "blackhole": Fault("blackhole"),
    "slow-headers": Fault("slow_headers", delay_s=FOREVER),
    "reset": Fault("reset"),
    "storm-503": Fault("storm", statuses=(503,)),
}


@pytest.mark.parametrize("fault", DOWN.values(), ids=DOWN.keys())
def test_readiness_follows_the_upstream(rig: Rig, fault: Fault) -> None:
    readyz = rig.guard.url + "/readyz"
    assert httpx.get(readyz, timeout=FOREVER).status_code == 200
    rig.proxy.set(fault)
    start = time.perf_counter()
    down = httpx.get(readyz, timeout=FOREVER)
    assert time.perf_counter() - start < TIMEOUT + SLACK
    assert down.status_code == 503 and down.json() == {"status": "not ready"}
    rig.proxy.set(PASS)
    deadline = time.monotonic() + SLACK
    while (status := httpx.get(readyz, timeout=FOREVER).status_code) != 200:
        assert time.monotonic() < deadline, "readiness did not come back"
        time.sleep(0.05)
    assert status == 200


# --- pooled connections, the official client ------------------------------------------------


def test_post_on_a_pooled_connection_is_not_retried(rig: Rig) -> None:
    """aiohttp retries idempotent requests on a kept-alive connection that died; a POST may
    already be generating, so it must never be sent again."""
    url = rig.guard.url + "/v1/chat/completions"
    assert httpx.post(url, json=CHAT_BODY, timeout=FOREVER).status_code == 200
    rig.proxy.set(Fault("reset"))  # the same kept-alive connection, reset under the request
    response = httpx.post(url, json=CHAT_BODY, timeout=FOREVER)
    assert response.status_code == 502
    assert rig.proxy.attempts() == 2
    assert rig.proxy.connections() == 1  # the second POST did go out on the pooled connection


def test_official_client_retries_after_retry_after(rig: Rig) -> None:
    rig.proxy.set(Fault("storm", statuses=(503, 502), retry_after="1", times=2))
    client = openai.OpenAI(base_url=rig.guard.url + "/v1", api_key="unused", max_retries=2)
    start = time.perf_counter()
    reply = client.chat.completions.create(model="echo", messages=CHAT_BODY["messages"])
    elapsed = time.perf_counter() - start
    client.close()
    assert reply.choices[0].message.content == TEXT
    assert rig.proxy.attempts() == 3  # two storms, then the answer
    assert 1.8 <= elapsed < 2 + SLACK  # it waited the 1 s it was told, twice


def test_official_client_raises_on_a_broken_stream(rig: Rig) -> None:
    rig.proxy.set(Fault("reset", at=MID_BODY))
    client = openai.OpenAI(base_url=rig.guard.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="echo", messages=CHAT_BODY["messages"], stream=True
    )
    text = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            text.extend(c.delta.content or "" for c in chunk.choices)
    client.close()
    assert "".join(text) and TEXT.startswith("".join(text))
    assert info.value.message == "upstream stream interrupted"


# --- the relay's framing: whole events only -------------------------------------------------

STREAM = (
    b": keep-alive\r\n\r\n"
    b'data: {"a":"\xc3\xa9"}\r\n\r\n'
    b"event: x\nid: 1\ndata: one\ndata: two\n\n"
    b"data: cr\r\r"
    b"data: [DONE]\n\n"
)


def complete(prefix: bytes) -> bool:
    """True when ``prefix`` ends between events (a parser reaches its end without loss)."""
    try:
        parse_sse(prefix)
    except SSEError:
        return False
    return True


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_framer_cuts_only_at_event_boundaries(cut: int) -> None:
    for pieces in ([STREAM[:cut], STREAM[cut:]], [STREAM[i : i + 1] for i in range(len(STREAM))]):
        framer = EventFramer()
        out, ends = b"", []
        for piece in pieces:
            whole = framer.feed(piece)
            out += whole
            if whole:
                ends.append(len(out))
        out += framer.close()
        assert out == STREAM
        assert all(complete(STREAM[:end]) for end in ends)
        assert framer.done


@pytest.mark.parametrize(
    "tail", [b"data: cut", b"data: cut\n", b'data: {"x":1}\r\n', b"data: [DONE]\n"]
)
def test_framer_holds_back_an_unfinished_event(tail: bytes) -> None:
    framer = EventFramer()
    assert framer.feed(b"data: ok\n\n" + tail) == b"data: ok\n\n"
    assert not framer.done
    with pytest.raises(SSEError):
        framer.close()


def test_framer_event_limit() -> None:
    framer = EventFramer(max_event_bytes=64)
    with pytest.raises(SSEError):
        for _ in range(10):
            framer.feed(b"data: 0123456789\n")
