"""Progress bars for the build: what a build step needs of a bar, and one task for a loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from rich.progress import Progress, TaskID


class Bar(Protocol):
    """rich's Progress, or a worker process's stand-in for it (``guard.toy.lanes``)."""

    @property
    def console(self) -> Any: ...  # .log(message)

    def add_task(self, description: str, *, total: float | None = ...) -> TaskID: ...

    def update(self, task_id: TaskID, **fields: Any) -> None: ...

    def advance(self, task_id: TaskID, advance: float = ...) -> None: ...


@contextmanager
def task(progress: Bar | None, description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yields ``advance(**fields)``, which moves the task one step and may update its fields."""
    if progress is None:  # a bar of its own, for the length of the loop
        with Progress() as own, task(own, description, total) as advance:
            yield advance
        return
    task_id = progress.add_task(description, total=total)
    yield lambda **fields: progress.update(task_id, advance=1, **fields)
