"""schemathesis against the guard's own OpenAPI schema, served by a real guard on loopback in
front of the stand-in upstream: no server errors, status codes, content types and response
bodies as the schema declares them, and schema-violating (negative) data rejected.

The schema is the one the app serves at /openapi.json, built in-process at import (pytest
collects one test per operation from it); the calls go to the running guard over HTTP.
Example counts are kept small for `make test`; the phases and checks are schemathesis' own,
but one: schema-valid bodies are not all acceptable, since whether an image URL can be fetched
and decoded, or a model name is served, is not something OpenAPI can state (those answers are
the declared 400/404 with the guard's error body, which the other checks do verify).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis.specs.openapi.checks import positive_data_acceptance

from guard.config import load_config
from guard.server import build_service
from guard.transport.http import create_app
from tests.servers import AppServer, RunningGuard


def _openapi() -> dict[str, Any]:
    cfg = load_config(
        None, {"upstream": {"url": "http://127.0.0.1:9/v1"}, "pipeline": {"defenses": []}}
    )
    app: Any = create_app(cfg, build_service(cfg, registry=CollectorRegistry()))
    while not hasattr(app, "openapi"):  # through the middlewares to the FastAPI app
        app = app.app
    return dict(app.openapi())


schema = schemathesis.openapi.from_dict(_openapi())


@pytest.fixture(scope="module")
def api_guard(upstream: AppServer) -> Iterator[RunningGuard]:
    guard = RunningGuard(upstream.url + "/v1")
    yield guard
    guard.close()


def test_the_served_schema_is_the_one_fuzzed(api_guard: RunningGuard) -> None:
    served = httpx.get(api_guard.url + "/openapi.json", timeout=10).json()
    assert served["paths"] == _openapi()["paths"]
    body = served["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["required"] == ["model", "messages"]


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_schema(case: schemathesis.Case, api_guard: RunningGuard) -> None:
    case.call_and_validate(base_url=api_guard.url, excluded_checks=[positive_data_acceptance])
