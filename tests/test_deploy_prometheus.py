"""deploy/prometheus: the alert rules are valid, unit-tested by promtool, and name only metrics
and labels the guard really exposes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import promql
from tests.promql import exposed, metric_names, problems

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
RUNBOOK = "https://github.com/vlm-guard/vlm-guard/blob/main/README.md#runbook-"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


ALERTS = alerts()
NAMES = [a["alert"] for a in ALERTS]


@pytest.fixture(scope="module")
def promtool() -> str:
    return promql.promtool()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules(promtool: str) -> None:
    done = run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(ALERTS)} rules found" in done.stdout


@pytest.mark.slow  # four groups replay a day of samples (the 1d baselines): seconds
def test_promtool_unit_tests_pass(promtool: str) -> None:
    done = run(promtool, "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_fail_when_no_rule_fires(promtool: str, tmp_path: Path) -> None:
    """promtool really runs every firing case against alerts.yaml: with rules that never fire,
    each alert's tests fail and promtool says so in its exit status."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = "vector(1) < 0"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = run(promtool, "test", "rules", str(tmp_path / RULE_TESTS.name))
    assert done.returncode != 0, done.stdout + done.stderr
    failed = set(re.findall(r"alertname: (\w+)", done.stderr))  # promtool reports there
    assert failed == set(NAMES), done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [
        case
        for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
    ]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if c.get("exp_alerts") == []}
    assert set(NAMES) - firing == set(), "alerts without a case that fires"
    assert set(NAMES) - quiet == set(), "alerts without a case that stays quiet"
    assert {c["alertname"] for c in cases} <= set(NAMES), "tests for alerts that do not exist"


def test_alert_names_are_unique() -> None:
    assert len(set(NAMES)) == len(NAMES) == 7


@pytest.mark.parametrize("alert", ALERTS, ids=NAMES)
def test_alert_has_severity_and_annotations(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in ("critical", "warning")
    notes = alert["annotations"]
    assert notes["summary"].strip()
    assert notes["description"].strip()
    assert notes["runbook_url"] == RUNBOOK + alert["alert"].lower()


@pytest.mark.parametrize("alert", ALERTS, ids=NAMES)
def test_alert_names_only_real_metrics_and_labels(alert: dict[str, Any]) -> None:
    assert metric_names(alert["expr"]), "no vlm_guard metric in the expression"
    assert problems(alert["expr"], exposed()) == []


# Each breaks a real rule the way a rename in guard/metrics.py or a typo would.
BREAKS = [
    ("VlmGuardFailOpen", "vlm_guard_fail_open_total", "vlm_guard_fail_opens_total"),
    ("VlmGuardUpstreamUnavailable", 'outcome="upstream_error"', 'outcome="upstream_down"'),
    ("VlmGuardStageErrors", "sum by (stage)", "sum by (pod)"),
    ("VlmGuardStageLatencyHigh", 'bucket{stage="purify"}', 'bucket{stage="purifier"}'),
    ("VlmGuardBlockRateSpike", 'outcome=~"block|would_block"', 'outcome=~"block|would.*"'),
    ("VlmGuardBackdoorDetected", 'blocked_total{stage="backdoor"}', 'blocked_total{kind="x"}'),
    ("VlmGuardPurifyDrift", "purify_steps_sum[30m]", "purify_steps_total[30m]"),
]


@pytest.mark.parametrize(("name", "old", "new"), BREAKS, ids=[b[0] for b in BREAKS])
def test_metric_check_catches_a_broken_rule(name: str, old: str, new: str) -> None:
    expr = ALERTS[NAMES.index(name)]["expr"]
    assert old in expr
    assert problems(expr.replace(old, new, 1), exposed()) != []


def test_runbook_anchors_exist_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    if "## Operations" not in readme:
        pytest.skip("README.md has no Operations section yet")
    # GitHub's anchor for "#### Runbook: VlmGuardFailOpen" is "runbook-vlmguardfailopen".
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)
    }
    missing = {n for n in NAMES if f"runbook-{n.lower()}" not in anchors}
    assert missing == set(), "alerts without a runbook heading in README.md"
