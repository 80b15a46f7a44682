"""Build lanes: jobs run in spawned worker processes, their progress reaches the parent's bar,
their records come back, and a failure anywhere stops the build with the worker's traceback."""

from __future__ import annotations

import io
import os
from functools import partial
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from guard.toy.lanes import LaneError, run_lanes
from guard.toy.progress import Bar, task


def _count(name: str, steps: int, progress: Bar) -> dict[str, Any]:
    progress.console.log(f"{name} starting")
    with task(progress, name, steps) as advance:
        for _ in range(steps):
            advance(description=f"{name} (working)")
    import torch

    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "steps": steps}


def _fail(progress: Bar) -> dict[str, Any]:
    raise ValueError("the loss is nan")


def _bar() -> Progress:
    return Progress(console=Console(file=io.StringIO()))


def test_lanes_run_in_parallel_processes_and_report_progress() -> None:
    lanes = [
        [("a", partial(_count, "a", 3))],
        [("b", partial(_count, "b", 2)), ("c", partial(_count, "c", 4))],
    ]
    with _bar() as progress:
        records = run_lanes(lanes, progress, cores=2)
    assert {name: r["steps"] for name, r in records.items()} == {"a": 3, "b": 2, "c": 4}
    pids = {name: r["pid"] for name, r in records.items()}
    assert pids["b"] == pids["c"] != pids["a"] and os.getpid() not in pids.values()
    assert {r["threads"] for r in records.values()} == {1}  # 2 cores shared by 2 lanes
    shown = {t.description: (t.completed, t.total) for t in progress.tasks}
    assert shown == {"a (working)": (3, 3), "b (working)": (2, 2), "c (working)": (4, 4)}


def test_one_core_runs_the_lanes_in_this_process() -> None:
    lanes = [[("a", partial(_count, "a", 1))], [("b", partial(_count, "b", 1))]]
    with _bar() as progress:
        records = run_lanes(lanes, progress, cores=1)
    assert {r["pid"] for r in records.values()} == {os.getpid()}


def test_a_failing_job_stops_the_build_with_its_traceback() -> None:
    lanes = [[("slow", partial(_count, "slow", 10**9))], [("bad", _fail)]]
    with _bar() as progress, pytest.raises(LaneError, match="ValueError: the loss is nan"):
        run_lanes(lanes, progress, cores=2)
