"""The toy build's bookkeeping, without training: one build per directory at a time."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from rich.console import Console

from guard.toy.build import _exclusive


def test_a_second_build_in_the_same_directory_waits(tmp_path: Path) -> None:
    lock = tmp_path / ".build.lock"
    console = Console(file=io.StringIO())
    entered = threading.Event()

    def second() -> None:
        with _exclusive(lock, console):
            entered.set()

    with _exclusive(lock, console):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        assert not entered.is_set()  # blocked while the first build holds the lock
    thread.join(5)
    assert entered.is_set()
