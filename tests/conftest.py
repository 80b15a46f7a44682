from __future__ import annotations

import os

# Before torch loads: on a shared 2-core machine its OpenMP threads otherwise spin-wait on
# each other (a 7 ms UNet call measured 1 s under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from guard.toy.openai_server import EchoModel, create_app
from tests.servers import AppServer, RunningGuard

FIXED_CLOCK = 1_700_000_000.0


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a shared, busy CPU OpenMP's
    spin-waiting threads make each call up to 100× slower (unless OMP_WAIT_POLICY=passive)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def upstream() -> Iterator[AppServer]:
    """The stand-in OpenAI-compatible upstream (echo model), shared by the session."""
    server = AppServer(create_app(EchoModel("echo"), clock=lambda: FIXED_CLOCK))
    yield server
    server.close()


@pytest.fixture
def make_guard(upstream: AppServer) -> Iterator[Callable[..., RunningGuard]]:
    """Start guards in front of the stand-in upstream; all are stopped after the test."""
    started: list[RunningGuard] = []

    def make(overrides: dict[str, Any] | None = None, **kwargs: Any) -> RunningGuard:
        kwargs.setdefault("upstream_url", upstream.url + "/v1")
        guard = RunningGuard(overrides=overrides, **kwargs)
        started.append(guard)
        return guard

    yield make
    for guard in started:
        guard.close()


@pytest.fixture
def guard(make_guard: Callable[..., RunningGuard]) -> RunningGuard:
    """A guard with no defenses in front of the stand-in upstream."""
    return make_guard()
