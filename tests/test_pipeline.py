"""Pipeline semantics with test-only stages: order, rewrite, concurrency, fail modes, monitor."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from guard.config import StageConfig
from guard.intake.decode import image_digest
from guard.metrics import Metrics
from guard.pipeline import Pipeline
from guard.types import GuardRequest, ImageInput, Stage
from tests.images import gradient
from tests.stages import Fixed, Inverts, Raises, Rendezvous, Sleeps


def _request() -> GuardRequest:
    im = gradient(16, 16)
    return GuardRequest("r1", "hello", (ImageInput(0, im, image_digest(im)),), {})


def _pipeline(
    stages: list[Any], mode: str = "enforce", **configs: StageConfig
) -> tuple[Pipeline, Metrics]:
    metrics = Metrics(CollectorRegistry(), stages=[s.name for s in stages])
    cfgs = {s.name: configs.get(s.name, StageConfig(timeout_s=1)) for s in stages}
    return Pipeline(stages, cfgs, metrics, mode=mode), metrics  # type: ignore[arg-type]


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_stages_satisfy_protocol() -> None:
    for stage in (Fixed("a"), Raises("b"), Sleeps("c", 0), Inverts()):
        assert isinstance(stage, Stage)


async def test_allow_when_every_stage_allows() -> None:
    pipe, metrics = _pipeline([Fixed("a"), Fixed("b")])
    verdict = await pipe.run(_request())
    assert verdict.outcome == "allow" and verdict.forward
    assert [d.stage for d in verdict.decisions] == ["a", "b"]
    assert _value(metrics, "vlm_guard_decisions_total", stage="a", action="allow") == 1


async def test_rewrite_reaches_later_stages() -> None:
    rewriter, checker = Inverts(), Fixed("reasoner")
    pipe, _ = _pipeline([checker, rewriter])  # config order does not matter: rewriters first
    request = _request()
    verdict = await pipe.run(request)
    seen = checker.seen[0].images[0]
    assert seen.digest != request.images[0].digest
    assert seen.digest == verdict.request.images[0].digest == image_digest(seen.image)
    # What the client sent stays with the request, for stages that screen it too (backdoor).
    assert checker.seen[0].received == request.images
    assert checker.seen[0].images_as_received == request.images


async def test_a_request_nobody_rewrote_has_only_its_images() -> None:
    checker = Fixed("reasoner")
    pipe, _ = _pipeline([checker])
    request = _request()
    await pipe.run(request)
    assert checker.seen[0].received == () and checker.seen[0].images_as_received == request.images


async def test_checkers_run_concurrently() -> None:
    barrier = asyncio.Barrier(2)
    pipe, _ = _pipeline([Rendezvous("a", barrier), Rendezvous("b", barrier)])
    # Each stage waits for the other to start: run one after the other, this would time out.
    verdict = await pipe.run(_request())
    assert verdict.outcome == "allow"


async def test_block_in_enforce_mode_is_counted() -> None:
    pipe, metrics = _pipeline([Fixed("a", "block", category="violence"), Fixed("b")])
    verdict = await pipe.run(_request())
    assert verdict.outcome == "block" and not verdict.forward
    assert [d.stage for d in verdict.blocking] == ["a"]
    assert _value(metrics, "vlm_guard_blocked_total", stage="a", category="violence") == 1


async def test_rewriter_block_stops_before_checkers() -> None:
    checker = Fixed("b")
    pipe, _ = _pipeline([Fixed("a", "block", may_rewrite=True), checker])
    assert (await pipe.run(_request())).outcome == "block"
    assert checker.seen == []


async def test_unknown_category_is_folded_into_other() -> None:
    pipe, metrics = _pipeline([Fixed("a", "block", category="attacker-chosen-label")])
    await pipe.run(_request())
    assert _value(metrics, "vlm_guard_blocked_total", stage="a", category="other") == 1


async def test_monitor_mode_forwards_would_block() -> None:
    pipe, metrics = _pipeline([Fixed("a", "block"), Fixed("b")], mode="monitor")
    verdict = await pipe.run(_request())
    assert verdict.outcome == "would_block" and verdict.forward
    assert _value(metrics, "vlm_guard_decisions_total", stage="a", action="would_block") == 1


@pytest.mark.parametrize(
    "failing",
    [Raises("a"), Sleeps("a", 5)],
    ids=["exception", "timeout"],
)
async def test_fail_closed(failing: Any, caplog: pytest.LogCaptureFixture) -> None:
    pipe, metrics = _pipeline([failing, Fixed("b")], a=StageConfig(timeout_s=0.2))
    verdict = await pipe.run(_request())
    assert verdict.outcome == "error" and not verdict.forward
    assert verdict.failed == ("a",)
    assert _value(metrics, "vlm_guard_stage_errors_total", stage="a") == 1
    assert _value(metrics, "vlm_guard_fail_open_total", stage="a") == 0


@pytest.mark.parametrize(
    "failing",
    [Raises("a"), Sleeps("a", 5), Raises("a", error=MemoryError)],
    ids=["exception", "timeout", "memory"],
)
async def test_fail_open_forwards_and_logs_critical(
    failing: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pipe, metrics = _pipeline([failing, Fixed("b")], a=StageConfig(timeout_s=0.2, fail_mode="open"))
    with caplog.at_level(logging.CRITICAL, logger="guard.pipeline"):
        verdict = await pipe.run(_request())
    assert verdict.outcome == "allow" and verdict.forward
    assert _value(metrics, "vlm_guard_fail_open_total", stage="a") == 1
    assert any(
        r.levelno == logging.CRITICAL and "fail mode open" in r.message for r in caplog.records
    )


async def test_block_wins_over_failure() -> None:
    pipe, _ = _pipeline([Raises("a"), Fixed("b", "block")])
    assert (await pipe.run(_request())).outcome == "block"


async def test_failed_rewriter_closed_stops_pipeline() -> None:
    checker = Fixed("b")
    pipe, _ = _pipeline([Raises("purify", may_rewrite=True), checker])
    verdict = await pipe.run(_request())
    assert verdict.outcome == "error" and checker.seen == []


async def test_monitor_mode_forwards_failures() -> None:
    pipe, metrics = _pipeline([Raises("a"), Fixed("b")], mode="monitor")
    verdict = await pipe.run(_request())
    assert verdict.outcome == "allow" and verdict.failed == ("a",)
    assert _value(metrics, "vlm_guard_stage_errors_total", stage="a") == 1


def test_duplicate_or_unconfigured_stages_are_refused() -> None:
    metrics = Metrics(CollectorRegistry())
    with pytest.raises(ValueError, match="duplicate"):
        Pipeline([Fixed("a"), Fixed("a")], {"a": StageConfig()}, metrics)
    with pytest.raises(ValueError, match="no stage configuration"):
        Pipeline([Fixed("a")], {}, metrics)
