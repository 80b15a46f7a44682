"""Every Prometheus metric of the guard, bound to an injected registry.

Label values come from fixed sets only (DESIGN.md §8): transports, outcomes and actions are
closed vocabularies, stage names come from the configured pipeline, and categories outside
the known set are folded into ``other`` so that no client input can mint new series.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TRANSPORTS = ("http", "grpc")
OUTCOMES = (
    "allow",
    "block",
    "would_block",
    "error",
    "invalid",
    "unauthenticated",
    "upstream_error",
    "cancelled",
)
# Why a model request was refused for capacity: admission control (guard/admission.py), or no
# room for its decoded images (guard/intake/budget.py).
OVERLOAD_REASONS = ("queue_full", "queue_timeout", "draining", "pixel_budget")
ACTIONS = ("allow", "block", "rewrite", "would_block", "error", "fail_open")
STAGES = ("purify", "reasoner", "backdoor")
CATEGORIES = (
    # SSUI's nine categories (reasoner), then the guard's own.
    "dangerous_behavior",
    "violence",
    "pornography",
    "moral_violations",
    "illegal_crimes",
    "political_controversies",
    "discrimination_stereotypes",
    "offensive_religious_beliefs",
    "privacy",
    "backdoor",
    "adversarial",
    "unsafe",
    "other",
)

# Stage latencies run from a cache hit (sub-millisecond) to diffusion on CPU (seconds).
_STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The guard's metrics. Pass a fresh ``CollectorRegistry`` per guard (tests do)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        stages: Iterable[str] = STAGES,
        categories: Iterable[str] = CATEGORIES,
    ) -> None:
        self.registry = registry
        self._stages = frozenset(stages)
        self._categories = frozenset(categories) | {"other"}
        p = "vlm_guard_"
        self.requests = Counter(
            p + "requests",
            "Requests by transport and outcome.",
            ["transport", "outcome"],
            registry=registry,
        )
        self.decisions = Counter(
            p + "decisions", "Stage decisions.", ["stage", "action"], registry=registry
        )
        self.blocked = Counter(
            p + "blocked",
            "Blocks (enforce) and would-blocks (monitor) by stage and category.",
            ["stage", "category"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            p + "stage_seconds",
            "Time spent in each stage.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            p + "upstream_seconds",
            "Upstream time to response headers.",
            buckets=_UPSTREAM_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            p + "inflight_requests", "Requests being handled now.", registry=registry
        )
        self.queued = Gauge(
            p + "queued_requests",
            "Model requests waiting for an admission slot.",
            registry=registry,
        )
        self.pixels_inflight = Gauge(
            p + "image_pixels_inflight",
            "Decoded image pixels held by requests being screened (images.max_inflight_pixels).",
            registry=registry,
        )
        self.overload = Counter(
            p + "overload",
            "Model requests refused for capacity: admission control, or no room in the pixel "
            "budget (HTTP 429/503).",
            ["transport", "reason"],
            registry=registry,
        )
        self.stage_errors = Counter(
            p + "stage_errors", "Stage exceptions and timeouts.", ["stage"], registry=registry
        )
        self.fail_open = Counter(
            p + "fail_open",
            "Requests forwarded although a stage failed (fail mode open).",
            ["stage"],
            registry=registry,
        )
        self.purify_steps = Histogram(
            p + "purify_steps",
            "Purification noise steps t* per image.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 500, 1000),
            registry=registry,
        )
        self.backdoor_entropy = Histogram(
            p + "backdoor_entropy",
            "Attention entropy score per request (nats).",
            buckets=tuple(x / 4 for x in range(1, 33)),
            registry=registry,
        )
        self.cache_hits = Counter(
            p + "cache_hits", "Stage cache hits.", ["stage"], registry=registry
        )
        # ``field`` takes only the configured names (requests.risky_fields), a set the operator
        # chose, never one a client made up; ``action`` is reject or strip (requests.risky_action).
        # guard/intake/messages.py creates the configured series at start-up.
        self.risky_fields = Counter(
            p + "risky_fields",
            "Requests that carried a risky body field, by field and what was done (reject or "
            "strip).",
            ["field", "action"],
            registry=registry,
        )
        # Pre-create the closed label sets so dashboards and alerts see zeros, not gaps.
        for t in TRANSPORTS:
            for o in OUTCOMES:
                self.requests.labels(t, o)
            for r in OVERLOAD_REASONS:
                self.overload.labels(t, r)
        for s in self._stages:
            self.stage_errors.labels(s)
            self.fail_open.labels(s)

    def stage(self, name: str) -> str:
        return name if name in self._stages else "other"

    def category(self, name: str | None) -> str:
        return name if name in self._categories else "other"
