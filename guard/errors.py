"""Every error the guard reports to a client, with its HTTP status and gRPC code.

::

    GuardError                      500 internal_error           INTERNAL
    ├── InvalidRequest              400 invalid_request_error    INVALID_ARGUMENT
    │   └── PolicyViolation         400 content_policy_violation PERMISSION_DENIED
    ├── PayloadTooLarge             413 invalid_request_error    RESOURCE_EXHAUSTED
    ├── RequestTimeout              408 invalid_request_error    DEADLINE_EXCEEDED
    ├── Unauthenticated             401 authentication_error     UNAUTHENTICATED
    ├── NotFound                    404 not_found_error          NOT_FOUND
    ├── StageDisabled               400 invalid_request_error    FAILED_PRECONDITION
    ├── Overloaded                  429 rate_limit_error         RESOURCE_EXHAUSTED
    │   └── NotAdmitted             503 overloaded               UNAVAILABLE
    ├── GuardUnavailable            503 guard_unavailable        UNAVAILABLE
    ├── UpstreamRejected            4xx (the upstream's)         INVALID_ARGUMENT
    ├── UpstreamUnavailable         502 upstream_error           UNAVAILABLE
    │   └── UpstreamOverloaded      503 upstream_overloaded      UNAVAILABLE
    └── UpstreamTimeout             504 upstream_timeout         DEADLINE_EXCEEDED

The three upstream errors share the type ``upstream_error``; their ``code`` tells them apart.

``retryable`` errors are transient: they carry ``Retry-After`` (seconds, at most
``MAX_RETRY_AFTER``) and never ``x-should-retry: false``. Messages are written for clients:
they never carry exception text, paths or addresses. The transports translate these in exactly
one place each (``transport/http.py``'s exception handler, ``transport/grpc.py``'s interceptor).
"""

from __future__ import annotations

import grpc

# The longest Retry-After the guard ever sends: clients (the openai SDKs among them) ignore
# longer ones, and an upstream that asks for more is clamped to it.
MAX_RETRY_AFTER = 60


class GuardError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = "internal_error"
    grpc_code = grpc.StatusCode.INTERNAL
    retryable = False
    retry_after: int | None = None

    def __init__(self, message: str = "internal error", *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GuardError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class PolicyViolation(InvalidRequest):
    """The request was blocked by a stage in enforce mode."""

    code = "content_policy_violation"
    type = "invalid_request_error"
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class PayloadTooLarge(GuardError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(GuardError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(GuardError):
    status = 404
    type = "not_found_error"
    code = "not_found"
    grpc_code = grpc.StatusCode.NOT_FOUND


class StageDisabled(GuardError):
    """An operation needs a stage this guard was started without."""

    status = 400
    type = "invalid_request_error"
    code = "stage_disabled"
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class RequestTimeout(GuardError):
    """The client took longer than ``server.body_timeout_s`` to send its body (HTTP only: gRPC
    reads whole messages itself). Retryable, as the OpenAI SDKs treat 408: a slow link is
    usually transient, and the slot it held is free again."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True
    retry_after = 1


class Overloaded(GuardError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True
    retry_after = 1


class NotAdmitted(Overloaded):
    """No slot for the request: its wait in the queue timed out (code ``queue_timeout``) or
    the guard is shutting down (code ``draining``). Not a stage failure, so not
    ``GuardUnavailable``: clients and alerts tell the two apart."""

    status = 503
    type = "overloaded"
    grpc_code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class GuardUnavailable(GuardError):
    """A stage failed (exception or timeout) under fail mode ``closed``."""

    status = 503
    type = "guard_unavailable"
    code = "guard_unavailable"
    grpc_code = grpc.StatusCode.UNAVAILABLE
    retryable = True
    retry_after = 1


class UpstreamRejected(GuardError):
    """The upstream refused the request as the client's fault (a 4xx: unknown model, prompt
    too long): its status, and its message once scrubbed, are the client's to read."""

    type = "invalid_request_error"
    code = None
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        status: int,
        param: str | None,
        code: str | None,
        retry_after: int | None,
    ) -> None:
        super().__init__(message, param=param)
        self.status, self.code = status, code
        if status == 429:  # the upstream's own rate limit: transient
            self.grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.retryable = True
            self.retry_after = min(max(retry_after or 1, 1), MAX_RETRY_AFTER)


class UpstreamUnavailable(GuardError):
    """The upstream refused the connection, reset it, broke off or answered a 5xx."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"
    grpc_code = grpc.StatusCode.UNAVAILABLE
    retryable = True
    retry_after = 1


class UpstreamOverloaded(UpstreamUnavailable):
    """The upstream answered 503: passed on as 503, with its Retry-After within bounds."""

    status = 503
    code = "upstream_overloaded"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = min(max(retry_after, 1), MAX_RETRY_AFTER)


class UpstreamTimeout(GuardError):
    """Connecting to the upstream, or waiting for its next bytes, took too long."""

    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True
    retry_after = 1
