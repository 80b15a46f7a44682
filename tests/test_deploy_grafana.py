"""deploy/grafana/vlm-guard.json: a well-formed dashboard whose queries name only metrics and
labels the guard really exposes."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import promql
from tests.promql import exposed, metric_names, problems

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "vlm-guard.json"
BOARD: dict[str, Any] = json.loads(DASHBOARD.read_text())
PANELS: list[dict[str, Any]] = BOARD["panels"]
TARGETS = [(p, t) for p in PANELS for t in p.get("targets", [])]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_datasource_is_a_template_variable() -> None:
    assert BOARD["schemaVersion"] >= 36
    (variable,) = [v for v in BOARD["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    # No hard-coded data source uid anywhere: the dashboard must import into any Grafana.
    assert all(p["datasource"] == DATASOURCE for p in PANELS)
    assert all(t["datasource"] == DATASOURCE for _, t in TARGETS)


def test_every_panel_has_a_query_and_a_unique_id() -> None:
    ids = [p["id"] for p in PANELS]
    assert len(set(ids)) == len(ids), ids
    for panel in PANELS:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), f"panel {panel['title']!r}: {refs}"
        assert all(t["expr"].strip() for t in panel["targets"])


def overlaps(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of panels whose grid rectangles intersect."""
    found = []
    for i, a in enumerate(panels):
        for b in panels[i + 1 :]:
            ga, gb = a["gridPos"], b["gridPos"]
            apart = (
                ga["x"] + ga["w"] <= gb["x"]
                or gb["x"] + gb["w"] <= ga["x"]
                or ga["y"] + ga["h"] <= gb["y"]
                or gb["y"] + gb["h"] <= ga["y"]
            )
            if not apart:
                found.append((a["title"], b["title"]))
    return found


def test_panels_fit_the_grid_without_overlap() -> None:
    for panel in PANELS:
        g = panel["gridPos"]
        assert min(g["x"], g["y"]) >= 0 and min(g["w"], g["h"]) > 0, panel["title"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']!r} is wider than Grafana's 24 columns"
    assert overlaps(PANELS) == []
    # The check itself: a panel moved one row up into its neighbour above is caught.
    moved = copy.deepcopy(PANELS)
    moved[-1]["gridPos"]["y"] -= 1
    assert overlaps(moved) != []


@pytest.mark.parametrize(
    ("panel", "target"), TARGETS, ids=[f"{p['id']}{t['refId']}" for p, t in TARGETS]
)
def test_queries_name_only_real_metrics_and_labels(
    panel: dict[str, Any], target: dict[str, Any]
) -> None:
    assert metric_names(target["expr"]), f"{panel['title']!r}: no vlm_guard metric"
    assert problems(target["expr"], exposed()) == []


def test_heatmaps_read_histogram_buckets() -> None:
    heatmaps = [p for p in PANELS if p["type"] == "heatmap"]
    assert {m for p in heatmaps for m in metric_names(p["targets"][0]["expr"])} == {
        "vlm_guard_purify_steps_bucket",
        "vlm_guard_backdoor_entropy_bucket",
    }
    for panel in heatmaps:
        # Prometheus buckets are cumulative: Grafana must de-accumulate them, not re-bucket.
        assert panel["options"]["calculate"] is False
        assert all(t["format"] == "heatmap" for t in panel["targets"])


def test_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every query, as a recording rule with Grafana's variables filled in."""
    promtool = promql.promtool()
    rules = [
        {
            "record": f"grafana:panel{p['id']}:{t['refId']}",
            "expr": re.sub(r"\$__(rate_)?interval", "5m", t["expr"]),
        }
        for p, t in TARGETS
    ]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
