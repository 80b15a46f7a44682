"""Run the configured stages over a request and reduce their decisions to one Verdict.

Order: stages that may rewrite images (purify) run first, one after another, each seeing the
previous rewrite; every other stage then runs concurrently on the final request. Each stage has
a timeout and a fail mode: ``closed`` refuses the request (503 guard_unavailable), ``open``
forwards it, counts ``fail_open_total`` and logs at critical. In ``monitor`` mode nothing is
ever refused: blocks become would-blocks and failures are counted, logged and forwarded, so a
guard can be rolled out without touching traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from guard.config import StageConfig
from guard.metrics import Metrics
from guard.types import Decision, GuardRequest, Stage, Verdict

log = logging.getLogger(__name__)


@dataclass
class Rewritten:
    """The pipeline between its two halves (parallel gating forwards in between)."""

    request: GuardRequest
    decisions: list[Decision] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    final: Verdict | None = None  # set when a rewriting stage already decided


class Pipeline:
    def __init__(
        self,
        stages: Sequence[Stage],
        configs: Mapping[str, StageConfig],
        metrics: Metrics,
        *,
        mode: Literal["enforce", "monitor"] = "enforce",
    ) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names: {names}")
        missing = [n for n in names if n not in configs]
        if missing:
            raise ValueError(f"no stage configuration for: {missing}")
        self.stages = tuple(stages)
        self.mode = mode
        self._configs = configs
        self._metrics = metrics
        self._rewriters = [s for s in stages if s.may_rewrite]
        self._checkers = [s for s in stages if not s.may_rewrite]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def ready(self) -> bool:
        return all(s.ready() for s in self.stages)

    async def run(self, request: GuardRequest) -> Verdict:
        return await self.check(await self.rewrite(request))

    async def rewrite(self, request: GuardRequest) -> Rewritten:
        """The rewriting stages (purify), one after another: the request as the model will
        see it, or a final verdict when one of them ended the pipeline."""
        done = Rewritten(request)
        for stage in self._rewriters:
            decision = await self._run_stage(stage, done.request)
            if decision is None:
                done.failed.append(stage.name)
                if self.mode == "enforce":
                    # The images were not purified: nothing after this may see them as if
                    # they had been, so a closed failure of a rewriter ends the pipeline.
                    done.final = self._verdict(done.request, done.decisions, done.failed)
                    return done
                continue
            done.decisions.append(decision)
            if decision.action == "rewrite" and decision.images is not None:
                received = done.request.images_as_received
                done.request = replace(done.request, images=decision.images, received=received)
            if decision.action == "block" and self.mode == "enforce":
                done.final = self._verdict(done.request, done.decisions, done.failed)
                return done
        return done

    async def check(self, done: Rewritten) -> Verdict:
        """The other stages, concurrently, on the rewritten request; then the verdict."""
        if done.final is not None:
            return done.final
        if self._checkers:
            results = await asyncio.gather(
                *(self._run_stage(s, done.request) for s in self._checkers)
            )
            for stage, result in zip(self._checkers, results, strict=True):
                if result is None:
                    done.failed.append(stage.name)
                else:
                    done.decisions.append(result)
        return self._verdict(done.request, done.decisions, done.failed)

    def _verdict(
        self, request: GuardRequest, decisions: list[Decision], failed: list[str]
    ) -> Verdict:
        blocking = tuple(d for d in decisions if d.action == "block")
        outcome: Literal["allow", "block", "would_block", "error"]
        if self.mode == "monitor":
            outcome = "would_block" if blocking else "allow"
        elif blocking:
            outcome = "block"  # a definite block wins over another stage's failure
        elif failed:
            outcome = "error"
        else:
            outcome = "allow"
        for d in blocking:
            self._metrics.blocked.labels(
                self._metrics.stage(d.stage), self._metrics.category(d.category)
            ).inc()
        return Verdict(outcome, request, tuple(decisions), blocking, tuple(failed))

    async def _run_stage(self, stage: Stage, request: GuardRequest) -> Decision | None:
        """Run one stage; None means it failed under fail mode ``closed``."""
        cfg = self._configs[stage.name]
        label = self._metrics.stage(stage.name)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(cfg.timeout_s):
                decision = await stage.check(request)
        except Exception as e:
            why = "timeout" if isinstance(e, TimeoutError) else type(e).__name__
            self._metrics.stage_errors.labels(label).inc()
            if cfg.fail_mode == "open":
                self._metrics.fail_open.labels(label).inc()
                self._metrics.decisions.labels(label, "fail_open").inc()
                log.critical(
                    "stage %s failed (%s) on request %s; forwarding (fail mode open)",
                    stage.name,
                    why,
                    request.id,
                    exc_info=not isinstance(e, TimeoutError),
                )
                return Decision(stage.name, "allow", reason=f"fail_open: {why}")
            self._metrics.decisions.labels(label, "error").inc()
            log.error(
                "stage %s failed (%s) on request %s (fail mode closed%s)",
                stage.name,
                why,
                request.id,
                "; forwarded all the same: monitor mode" if self.mode == "monitor" else "",
                exc_info=not isinstance(e, TimeoutError),
            )
            return None
        finally:
            self._metrics.stage_seconds.labels(label).observe(time.perf_counter() - start)
        action = (
            "would_block"
            if decision.action == "block" and self.mode == "monitor"
            else (decision.action)
        )
        self._metrics.decisions.labels(label, action).inc()
        return decision
