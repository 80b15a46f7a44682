"""Checks PromQL in deploy/ (alert rules, Grafana panels) against the guard's real metrics.

A regex reading of PromQL, not a parser: it finds ``vlm_guard_*`` selectors with their label
matchers and ``by``/``without`` groupings, which is all the deploy files use. The names come
from a live ``Metrics`` exposition, so a renamed metric or label breaks the tests, not a
dashboard in production.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from guard.metrics import ACTIONS, CATEGORIES, OUTCOMES, STAGES, TRANSPORTS, Metrics

SELECTOR = re.compile(r"\b(vlm_guard_[a-z_]+)\b(\s*\{[^}]*\})?")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*,?')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# The closed label vocabularies of guard/metrics.py: a matcher on a value outside them never
# matches anything. Stage names outside STAGES are exposed as "other".
VOCABULARY = {
    "transport": set(TRANSPORTS),
    "outcome": set(OUTCOMES),
    "action": set(ACTIONS),
    "stage": {*STAGES, "other"},
    "category": set(CATEGORIES),
}


def promtool() -> str:
    """promtool's path; skips the test when it is missing, or fails it under CI (.ci/run
    installs promtool and sets CI_REQUIRE_TOOLS=1: there a missing tool is a broken
    setup, not a reason to skip)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI_REQUIRE_TOOLS") == "1":
            pytest.fail("promtool is not on PATH and CI_REQUIRE_TOOLS=1")
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    return path


def exposed() -> dict[str, set[str]]:
    """Sample name -> label names, as /metrics shows them once every metric has a sample."""
    metrics = Metrics(CollectorRegistry())
    for metric in vars(metrics).values():
        # A labelled metric shows no samples until a child exists; make one so that its
        # sample names (_total, _bucket, ...) and label names appear.
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*("x" for _ in metric._labelnames))
    return {
        sample.name: set(sample.labels)
        for family in metrics.registry.collect()
        for sample in family.samples
    }


def metric_names(expr: str) -> set[str]:
    return {m.group(1) for m in SELECTOR.finditer(expr)}


def problems(expr: str, metrics: dict[str, set[str]]) -> list[str]:
    """What in ``expr`` does not exist in ``metrics`` (see ``exposed``); empty when all does."""
    found: list[str] = []
    for m in SELECTOR.finditer(expr):
        name, braces = m.group(1), m.group(2)
        if name not in metrics:
            found.append(f"unknown metric {name}")
            continue
        inner = braces.strip()[1:-1] if braces else ""
        if MATCHER.sub("", inner).strip():
            found.append(f"unparsed matchers in {name}{braces}")
        for label, op, value in MATCHER.findall(inner):
            if label not in metrics[name]:
                found.append(f"{name} has no label {label}")
            elif label in VOCABULARY:
                found += _value_problems(name, label, op, value)
    for g in GROUPING.finditer(expr):
        labels = {x.strip() for x in g.group(1).split(",") if x.strip()}
        names = metric_names(_aggregated(expr, g.start(), g.end()))
        if not names:
            found.append(f"no vlm_guard metric under {g.group(0)}")
        for name in sorted(names & metrics.keys()):
            found += [
                f"{name} has no label {x} ({g.group(0)})" for x in sorted(labels - metrics[name])
            ]
    return found


def _value_problems(name: str, label: str, op: str, value: str) -> list[str]:
    if op in ("=~", "!~") and not re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", value):
        return [f"{name}: regex {value!r} on {label} is not a plain alternation"]
    values = value.split("|") if op in ("=~", "!~") else [value]
    return [f"{name}: {label}={v!r} never occurs" for v in values if v not in VOCABULARY[label]]


def _aggregated(expr: str, start: int, end: int) -> str:
    """The argument of the aggregation whose ``by (...)`` spans [start, end): the parenthesised
    group right after it (``sum by (x) (...)``) or right before it (``sum(...) by (x)``)."""
    after = expr[end:].lstrip()
    if after.startswith("("):
        i = len(expr) - len(after)
        return expr[i : _match(expr, i, +1) + 1]
    before = expr[:start].rstrip()
    if before.endswith(")"):
        j = len(before) - 1
        return expr[_match(expr, j, -1) : j + 1]
    return ""


def _match(expr: str, i: int, step: int) -> int:
    """Index of the parenthesis matching the one at ``i`` (step +1: forwards, -1: backwards)."""
    depth = 0
    while 0 <= i < len(expr):
        depth += {"(": step, ")": -step}.get(expr[i], 0)
        if depth == 0:
            return i
        i += step
    raise ValueError(f"unbalanced parentheses in {expr!r}")
