"""One progress-bar task for a training loop: on the caller's bar, or on a bar of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import Progress


@contextmanager
def task(progress: Progress | None, description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yields ``advance(**fields)``, which moves the task one step and may update its fields."""
    own = progress is None
    bar = progress or Progress()
    if own:
        bar.start()
    task_id = bar.add_task(description, total=total)
    try:
        yield lambda **fields: bar.update(task_id, advance=1, **fields)
    finally:
        if own:
            bar.stop()
