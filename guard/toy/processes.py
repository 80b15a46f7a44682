"""Run the stand-in upstream and the guard as separate processes on loopback, as deployed.

Used by ``make demo`` and the benchmarks: each server is a real ``python -m guard`` process,
started on a free port and waited for until its readiness URL answers 200.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import httpx

GUARD = [sys.executable, "-m", "guard"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(
    args: list[str], ready_url: str, *, timeout_s: float = 180
) -> Iterator[subprocess.Popen[str]]:
    """Start ``args``, wait until ``ready_url`` answers 200, stop it (SIGTERM) afterwards.

    Its stderr goes to a temporary file (a pipe nobody reads would fill up and stall the
    server), so that a server that exits early says why in the raised error.
    """
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            _wait_ready(proc, log, args, ready_url, timeout_s)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(
    proc: subprocess.Popen[str], log: IO[str], args: list[str], url: str, timeout_s: float
) -> None:
    name = " ".join(args[2:4])
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{name} exited early: {log.read()[-800:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not become ready in {timeout_s} s")
        time.sleep(0.2)
