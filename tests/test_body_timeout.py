"""A slow request body: ``server.body_timeout_s`` bounds the whole upload (not each read), the
client gets a 408 in the guard's shape and its connection closes, and the admission slot the
request held is free again at once."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from guard.metrics import OUTCOMES
from tests.servers import RunningGuard, eventually

TIMEOUT_S = 0.5
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}
BODY = json.dumps(CHAT).encode()


@pytest.fixture
def guard(make_guard: Callable[..., RunningGuard]) -> RunningGuard:
    """One slot, no queue: a request left holding its slot would refuse every other one."""
    server = {"body_timeout_s": TIMEOUT_S, "max_inflight": 1, "max_queue": 0}
    return make_guard({"server": server})


@pytest.fixture
def connect(guard: RunningGuard) -> Iterator[Callable[[], socket.socket]]:
    sockets: list[socket.socket] = []

    def open_one() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", guard.server.http_port), timeout=5)
        sockets.append(sock)
        return sock

    yield open_one
    for sock in sockets:
        sock.close()


def _head(path: str = "/v1/chat/completions", length: int | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: guard\r\ncontent-type: application/json\r\n"
    if length is None:
        head += "transfer-encoding: chunked\r\n"
    else:
        head += f"content-length: {length}\r\n"
    return (head + "\r\n").encode()


def _send(sock: socket.socket, data: bytes) -> None:
    # The guard closes the connection after its 408: what matters is what it answered.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the guard sent, and whether it closed the connection (within 5 s)."""
    sock.settimeout(5)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return data, False
    return data, True


def _assert_408(raw: bytes) -> None:
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), raw[:300]
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    )
    assert headers[b"connection"] == b"close"
    assert headers[b"retry-after"] == b"1"
    assert headers[b"x-should-retry"] == b"true"
    assert headers[b"x-request-id"]
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_timeout"
    assert error["message"] == f"request body not received within {TIMEOUT_S:g} s"


def _requests(guard: RunningGuard) -> dict[str, float]:
    counts = {
        o: guard.metric("vlm_guard_requests_total", {"transport": "http", "outcome": o})
        for o in OUTCOMES
    }
    return {o: n for o, n in counts.items() if n}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stalled_body_gets_408_and_frees_its_slot(
    guard: RunningGuard, connect: Callable[[], socket.socket], path: str
) -> None:
    sock = connect()
    began = time.monotonic()
    _send(sock, _head(path, len(BODY)) + BODY[:10])  # then nothing more
    eventually(lambda: guard.server.admission.inflight == 1)  # it holds the only slot
    raw, closed = _until_closed(sock)
    elapsed = time.monotonic() - began
    _assert_408(raw)
    assert closed, "the connection stayed open after the 408"
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 2, elapsed

    # The slot is free and the request counted once, as the client's fault.
    eventually(lambda: guard.server.admission.inflight == 0)
    assert guard.metric("vlm_guard_inflight_requests") == 0
    assert _requests(guard) == {"invalid": 1}
    response = httpx.post(guard.url + "/v1/chat/completions", json=CHAT, timeout=5)
    assert response.status_code == 200, response.text
    assert _requests(guard) == {"invalid": 1, "allow": 1}


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_trickled_body_gets_408_at_the_deadline_for_the_whole_body(
    guard: RunningGuard, connect: Callable[[], socket.socket], chunked: bool
) -> None:
    # A byte every 0.1 s: each read comes well within the deadline, the whole body never does.
    sock = connect()
    began = time.monotonic()
    _send(sock, _head(length=None if chunked else 1000))
    while time.monotonic() - began < 5:
        if select.select([sock], [], [], 0.1)[0]:
            break  # the guard answered: stop sending
        _send(sock, b"1\r\n \r\n" if chunked else b" ")
    raw, closed = _until_closed(sock)
    elapsed = time.monotonic() - began
    _assert_408(raw)
    assert closed
    assert elapsed < TIMEOUT_S + 1, elapsed
    eventually(lambda: guard.server.admission.inflight == 0)
    assert _requests(guard) == {"invalid": 1}


def test_upload_within_the_deadline_is_unaffected(guard: RunningGuard) -> None:
    def slow_body() -> Iterator[bytes]:  # sent chunked, in three pieces, within the deadline
        yield BODY[:10]
        time.sleep(TIMEOUT_S / 4)
        yield BODY[10:20]
        time.sleep(TIMEOUT_S / 4)
        yield BODY[20:]

    with httpx.Client(base_url=guard.url, timeout=5) as client:
        for _ in range(2):  # the connection stays usable: kept alive, no close
            response = client.post("/v1/chat/completions", content=slow_body())
            assert response.status_code == 200, response.text
            assert response.headers.get("connection") != "close"
            response = client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
    assert _requests(guard) == {"allow": 4}
