"""Stage failures through a whole guard (HTTP and gRPC): every stage, every way to fail, both
fail modes, enforce and monitor (DESIGN.md §3, §7).

A failed stage under fail mode ``closed`` refuses the request (503 ``guard_unavailable``, gRPC
UNAVAILABLE) and nothing reaches the upstream; under ``open`` the request is forwarded,
``vlm_guard_fail_open_total{stage}`` counts it and a CRITICAL line says so. Monitor mode never
refuses: a closed failure is forwarded too, counted in ``stage_errors_total`` and audited.
Clients never read the exception's text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from guard.batching import BatchWorker, QueueFull, submit_all
from guard.config import GuardConfig, StageConfig, load_config
from guard.server import GuardServer, build_service
from guard.toy.openai_server import EchoModel, create_app
from guard.types import Decision, GuardRequest, Stage
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from tests.images import data_url, encode, gradient, image_message
from tests.servers import AppServer, LoopThread, RunningGuard
from tests.stages import Raises, Sleeps

SECRET = "secret internal detail /etc/passwd 0xdeadbeef"
# Nothing of the exception may reach a client: its text, its type, a traceback, a path.
LEAKS = ("secret", "/etc/passwd", "0xdeadbeef", "Traceback", "Error", "Memory", ".py", "Queue")
STAGE_TIMEOUT_S = 0.2
STAGES = ("purify", "reasoner", "backdoor")
KINDS = ("exception", "timeout", "memory", "queue_full", "memory_in_worker", "worker_closed")
BODY = {"model": "echo", "messages": image_message(data_url(encode(gradient(16, 16))))}


class Workers:
    """Real BatchWorkers in the states a model-backed stage can find its own in: queue full,
    a model call that runs out of memory (on its thread), and a worker that is closed."""

    def __init__(self) -> None:
        self.release = threading.Event()
        entered = threading.Event()

        def gated(items: list[int]) -> list[int]:
            entered.set()
            self.release.wait(60)
            return items

        def oom(items: list[int]) -> list[int]:
            raise MemoryError(f"CUDA out of memory: {SECRET}")

        self.full: BatchWorker[int, int] = BatchWorker(
            gated, name="full", max_batch=1, max_wait_s=0, max_queue=1
        )
        self.oom: BatchWorker[int, int] = BatchWorker(oom, name="oom", max_wait_s=0)
        self.closed: BatchWorker[int, int] = BatchWorker(lambda x: x, name="closed")
        for worker in (self.full, self.oom, self.closed):
            worker.start()
        self.closed.close()
        # One item inside the model call, one waiting: the queue (max_queue=1) is full.
        self._waiters = [threading.Thread(target=self.full.submit_sync, args=(0,), daemon=True)]
        self._waiters[0].start()
        assert entered.wait(10)
        self._waiters.append(threading.Thread(target=self.full.submit_sync, args=(1,), daemon=True))
        self._waiters[1].start()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.full.submit_sync(2, timeout=0)
            except QueueFull:
                break
            except TimeoutError:  # the second item had not joined the queue yet
                assert time.monotonic() < deadline
                time.sleep(0.01)

    def close(self) -> None:
        self.release.set()
        for worker in (self.full, self.oom):
            worker.close(5)
        for waiter in self._waiters:
            waiter.join(5)


@dataclass
class Failing:
    """A stage that allows, or fails in the way ``kind`` names (set per test)."""

    name: str
    workers: Workers
    may_rewrite: bool = False
    kind: str | None = None
    calls: int = 0
    seen: list[str] = field(default_factory=list)

    async def check(self, request: GuardRequest) -> Decision:
        self.calls += 1
        if self.kind == "exception":
            raise RuntimeError(SECRET)
        if self.kind == "timeout":
            await asyncio.sleep(30)
        if self.kind == "memory":
            raise MemoryError(SECRET)
        if self.kind == "queue_full":  # a model-backed stage's queue: Overloaded
            await submit_all(self.workers.full, [3], "test model")
        if self.kind == "memory_in_worker":  # the model thread's MemoryError, re-raised here
            await submit_all(self.workers.oom, [3], "test model")
        if self.kind == "worker_closed":  # its thread is gone: GuardUnavailable
            await submit_all(self.workers.closed, [3], "test model")
        return Decision(self.name, "allow")

    def ready(self) -> bool:
        return True


@dataclass
class Setup:
    guard: RunningGuard
    stages: dict[str, Failing]
    audit: Path


@pytest.fixture(scope="module")
def echo() -> Iterator[AppServer]:
    server = AppServer(create_app(EchoModel("echo")))
    yield server
    server.close()


@pytest.fixture(scope="module")
def setups(
    echo: AppServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str, str], Setup]]:
    """One guard per (fail mode, pipeline mode), started on first use: all three stages, each
    configured with that fail mode; a test makes one of them fail."""
    workers = Workers()
    made: dict[tuple[str, str], Setup] = {}

    def get(fail_mode: str, mode: str) -> Setup:
        if (fail_mode, mode) not in made:
            stages = {n: Failing(n, workers, may_rewrite=n == "purify") for n in STAGES}
            audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
            cfg = StageConfig(timeout_s=STAGE_TIMEOUT_S, fail_mode=fail_mode)  # type: ignore[arg-type]
            guard = RunningGuard(
                echo.url + "/v1",
                {"pipeline": {"mode": mode}, "audit": {"path": str(audit)}},
                stages=list(stages.values()),
                stage_configs=dict.fromkeys(STAGES, cfg),
            )
            made[fail_mode, mode] = Setup(guard, stages, audit)
        return made[fail_mode, mode]

    yield get
    for setup in made.values():
        setup.guard.close()
    workers.close()


def _grpc_chat(target: str, body: dict[str, Any]) -> tuple[grpc.StatusCode, str, list[Any]]:
    """(status, details, chunks) of a streamed gRPC Chat."""
    request = pb.ChatRequest(json=json.dumps({**body, "stream": True}))
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.GuardStub(channel).Chat(request, timeout=30)
        try:
            chunks = list(call)
        except grpc.RpcError as e:
            return e.code(), e.details() or "", []
        return grpc.StatusCode.OK, "", chunks


def _metrics(guard: RunningGuard, stage: str) -> dict[str, float]:
    def get(name: str, **labels: str) -> float:
        return guard.metric(f"vlm_guard_{name}", {"stage": stage, **labels})

    return {
        "errors": get("stage_errors_total"),
        "fail_open": get("fail_open_total"),
        "decided_error": get("decisions_total", action="error"),
        "decided_fail_open": get("decisions_total", action="fail_open"),
    }


def _no_leak(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, leak


# The table: what a failing stage means, by fail mode and pipeline mode. Every stage and every
# kind of failure (exception, timeout, MemoryError, a full model queue, an out-of-memory model
# thread, a dead model thread) must land in the same row.
EXPECTED = {
    # (fail_mode, mode): (forwarded, fail_open counted, CRITICAL line, audited as failed)
    ("closed", "enforce"): (False, False, False, True),
    ("open", "enforce"): (True, True, True, False),
    ("closed", "monitor"): (True, False, False, True),
    ("open", "monitor"): (True, True, True, False),
}


@pytest.mark.parametrize(
    ("fail_mode", "mode"), list(EXPECTED), ids=[f"{f}-{m}" for f, m in EXPECTED]
)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_failing_stage(
    setups: Callable[[str, str], Setup],
    echo: AppServer,
    caplog: pytest.LogCaptureFixture,
    stage: str,
    kind: str,
    fail_mode: str,
    mode: str,
) -> None:
    forwarded, counted, critical, audited = EXPECTED[fail_mode, mode]
    setup = setups(fail_mode, mode)
    guard, failing = setup.guard, setup.stages[stage]
    others = [s for n, s in setup.stages.items() if n != stage]
    before, calls, received = (
        _metrics(guard, stage),
        [s.calls for s in others],
        len(echo.app.state.received),
    )
    failing.kind = kind
    try:
        with caplog.at_level(logging.ERROR, logger="guard.pipeline"):
            http = httpx.post(guard.url + "/v1/chat/completions", json=BODY, timeout=30)
            code, details, chunks = _grpc_chat(guard.grpc_target, BODY)
    finally:
        failing.kind = None
    after = _metrics(guard, stage)
    delta = {k: after[k] - before[k] for k in after}
    sent = len(echo.app.state.received) - received

    _no_leak(http.text)
    _no_leak(details)
    assert delta["errors"] == 2  # one request per transport
    if forwarded:
        assert http.status_code == 200, http.text
        assert http.headers["x-guard-decision"] == "allow"
        assert code == grpc.StatusCode.OK and chunks[0].decision == "allow"
        assert sent == 2
    else:
        assert http.status_code == 503
        assert http.json()["error"]["code"] == http.json()["error"]["type"] == "guard_unavailable"
        assert http.headers["x-guard-decision"] == "error"
        assert http.headers["retry-after"] == "1"
        assert code == grpc.StatusCode.UNAVAILABLE
        assert sent == 0  # never forwarded
    assert delta["fail_open"] == delta["decided_fail_open"] == (2 if counted else 0)
    assert delta["decided_error"] == (0 if counted else 2)
    lines = [r for r in caplog.records if r.name == "guard.pipeline" and stage in r.getMessage()]
    assert len(lines) == 2
    assert all(r.levelno == (logging.CRITICAL if critical else logging.ERROR) for r in lines)
    if critical:
        assert all("fail mode open" in r.getMessage() for r in lines)
    elif forwarded:  # monitor mode: the line must not read as a refusal
        assert all("monitor mode" in r.getMessage() for r in lines)
    if stage == "purify" and not forwarded:
        # Images that could not be purified reach nothing after purify, not even the checks.
        assert [s.calls for s in others] == calls
    rid = http.headers["x-request-id"]
    records = [json.loads(line) for line in setup.audit.read_text().splitlines()]
    failed = [r["failed_stages"] for r in records if r["request_id"] == rid]
    assert failed == ([[stage]] if audited else [])


# --- the configured fail mode reaches the pipeline ---------------------------------------------


class Served:
    """A guard built from a config loaded the way the CLI loads it (file, environment)."""

    def __init__(self, cfg: GuardConfig, stages: list[Stage]) -> None:
        self._thread = LoopThread()

        async def start() -> GuardServer:
            server = GuardServer(cfg, build_service(cfg, stages=stages))
            await server.start()
            return server

        self.server = self._thread.call(start)
        self.url = f"http://127.0.0.1:{self.server.http_port}"
        self.grpc_target = f"127.0.0.1:{self.server.grpc_port}"

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.server.service.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self._thread.call(self.server.stop)
        self._thread.close()


def _outcome(
    tmp_path: Path, yaml_text: str, stage: Stage, echo: AppServer
) -> tuple[int, grpc.StatusCode, float, int]:
    """HTTP status, gRPC status, fail_open_total and requests forwarded, for one request per
    transport through a guard configured by ``yaml_text`` (and the environment)."""
    path = tmp_path / "guard.yaml"
    path.write_text(yaml_text)
    cfg = load_config(
        path,
        {
            "server": {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "drain_seconds": 1},
            "upstream": {"url": echo.url + "/v1"},
            "audit": {"path": str(tmp_path / "audit.jsonl")},
        },
    )
    received = len(echo.app.state.received)
    served = Served(cfg, [stage])
    try:
        http = httpx.post(served.url + "/v1/chat/completions", json=BODY, timeout=30)
        code, details, _ = _grpc_chat(served.grpc_target, BODY)
        fail_open = served.metric("vlm_guard_fail_open_total", {"stage": stage.name})
    finally:
        served.close()
    _no_leak(http.text + details)
    return http.status_code, code, fail_open, len(echo.app.state.received) - received


OK, DOWN = (200, grpc.StatusCode.OK), (503, grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected", "fail_open"),
    [
        ("{}", {}, DOWN, 0),  # the default is closed
        ("reasoner: {fail_mode: open}", {}, OK, 2),
        ("{}", {"VLM_GUARD_REASONER__FAIL_MODE": "open"}, OK, 2),
        ("reasoner: {fail_mode: open}", {"VLM_GUARD_REASONER__FAIL_MODE": "closed"}, DOWN, 0),
        ("pipeline: {mode: monitor}", {}, OK, 0),  # closed, but monitor mode refuses nothing
        ("{}", {"VLM_GUARD_PIPELINE__MODE": "monitor"}, OK, 0),
    ],
    ids=["default", "yaml-open", "env-open", "env-beats-yaml", "yaml-monitor", "env-monitor"],
)
def test_the_configured_fail_mode_decides(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    echo: AppServer,
    yaml_text: str,
    env: dict[str, str],
    expected: tuple[int, grpc.StatusCode],
    fail_open: int,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    status, code, counted, sent = _outcome(tmp_path, yaml_text, Raises("reasoner"), echo)
    assert (status, code) == expected
    assert sent == (2 if expected == OK else 0)
    assert counted == fail_open


def test_the_configured_timeout_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, echo: AppServer
) -> None:
    # Without the override the stage's 30 s default lets a slow stage finish and allow.
    slow = Sleeps("backdoor", 0.6)
    assert _outcome(tmp_path, "{}", slow, echo)[:2] == OK
    monkeypatch.setenv("VLM_GUARD_BACKDOOR__TIMEOUT_S", "0.2")
    assert _outcome(tmp_path, "{}", slow, echo)[:2] == DOWN
    assert _outcome(tmp_path, "backdoor: {fail_mode: open}", slow, echo)[:3] == (*OK, 2)


# --- the real reasoner stage's own failures ----------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once it is closed


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
@pytest.mark.parametrize("reasoner", ["refused", "silent"])
def test_the_reasoner_stage_unreachable_or_silent(
    echo: AppServer,
    silent_port: int,
    caplog: pytest.LogCaptureFixture,
    reasoner: str,
    fail_mode: str,
) -> None:
    port = silent_port if reasoner == "silent" else _closed_port()
    received = len(echo.app.state.received)
    guard = RunningGuard(
        echo.url + "/v1",
        {
            "pipeline": {"defenses": ["reasoner"]},
            "reasoner": {
                "url": f"http://127.0.0.1:{port}/v1",
                "model": "judge",
                "fail_mode": fail_mode,
                "timeout_s": 0.3,
            },
        },
    )
    try:
        with caplog.at_level(logging.ERROR, logger="guard.pipeline"):
            start = time.monotonic()
            http = httpx.post(guard.url + "/v1/chat/completions", json=BODY, timeout=30)
            took = time.monotonic() - start
            code, details, _ = _grpc_chat(guard.grpc_target, BODY)
        errors = guard.metric("vlm_guard_stage_errors_total", {"stage": "reasoner"})
        fail_open = guard.metric("vlm_guard_fail_open_total", {"stage": "reasoner"})
    finally:
        guard.close()
    _no_leak(http.text + details)
    assert "127.0.0.1" not in http.text + details and str(port) not in http.text + details
    assert took < 5  # the stage's timeout, not the client's
    sent = len(echo.app.state.received) - received
    assert errors == 2
    levels = {r.levelno for r in caplog.records if "reasoner" in r.getMessage()}
    if fail_mode == "closed":
        assert http.status_code == 503 and code == grpc.StatusCode.UNAVAILABLE
        assert http.json()["error"]["code"] == "guard_unavailable"
        assert sent == 0 and fail_open == 0 and levels == {logging.ERROR}
    else:
        assert http.status_code == 200 and code == grpc.StatusCode.OK
        assert sent == 2 and fail_open == 2 and levels == {logging.CRITICAL}
