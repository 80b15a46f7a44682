"""The guard's own sections of the configuration: serving, upstream, image intake, request
fields and the audit log (the stages' sections are in ``guard.config.stages``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    field_validator,
    model_validator,
)

KiB = 1024
MiB = 1024 * KiB


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_port: int | None = Field(50051, ge=0, le=65535, description="null disables gRPC")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="accepted bearer keys; empty = no authentication"
    )
    max_body_bytes: int = Field(32 * MiB, gt=0)
    grpc_max_message_bytes: int = Field(32 * MiB, gt=0)
    block_response: Literal["error", "refusal"] = "error"
    refusal_message: str = "I can't help with that request."
    drain_seconds: float = Field(30.0, ge=0, description="grace for open requests at shutdown")
    max_inflight: int = Field(
        256,
        gt=0,
        description="model requests (HTTP chat/completions and completions, gRPC Chat, Check, "
        "Purify) admitted at once, both transports together; a stream holds its slot until it "
        "ends. Each may hold a body of max_body_bytes and its decoded images in memory",
    )
    max_queue: int = Field(
        512,
        ge=0,
        description="model requests waiting for a slot, first in first out; an HTTP body is "
        "not read while waiting (uvicorn buffers at most ~64 KiB of it); beyond max_queue: "
        "HTTP 429 / gRPC RESOURCE_EXHAUSTED at once",
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for a slot; then HTTP 503 / gRPC UNAVAILABLE"
    )
    retry_after_s: int = Field(
        1, ge=1, le=60, description="Retry-After (seconds) on overload refusals"
    )
    max_header_bytes: int = Field(
        64 * KiB,
        ge=1 * KiB,
        description="HTTP request line and headers together; beyond it 431 and the connection "
        "closes, before the headers are parsed whole",
    )
    max_headers: int = Field(100, ge=8, description="HTTP header fields per request; beyond: 431")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="longest time to receive a whole HTTP request body once admitted; a slower "
        "upload is answered 408 and its slot freed",
    )


class UpstreamConfig(_Section):
    url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000/v1")
    api_key: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(600.0, gt=0, description="per read; long generations stream")
    total_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="longest whole answer, from sending the request to the last byte; an "
        "upstream that trickles bytes is cut off (504 before the first event, an error event "
        "after it)",
    )
    ready_timeout_s: float = Field(2.0, gt=0)
    max_connections: int = Field(1000, gt=0)


class FetchConfig(_Section):
    timeout_s: float = Field(10.0, gt=0, description="total deadline for one image fetch")
    max_redirects: int = Field(3, ge=0, le=10)
    allow_domains: list[str] = Field(
        default_factory=list, description="if set, only these hosts (and their subdomains)"
    )
    allow_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="non-global networks that may be fetched from (e.g. an in-cluster store)",
    )
    user_agent: str = "vlm-guard"

    @field_validator("allow_domains")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [d.strip(".").lower() for d in v]


class ImagesConfig(_Section):
    max_images: int = Field(8, ge=0)
    max_image_bytes: int = Field(20 * MiB, gt=0, description="encoded size of one image")
    max_pixels: int = Field(50_000_000, gt=0)
    min_side: int = Field(8, ge=1)
    max_aspect: float = Field(50.0, ge=1)
    formats: list[Literal["JPEG", "PNG", "WEBP", "GIF"]] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF"]  # type: ignore[arg-type]
    )
    max_inflight_pixels: int = Field(
        150_000_000,
        gt=0,
        description="decoded pixels held by all requests together, from decoding to the end of "
        "screening (Pillow keeps RGB at 4 bytes a pixel; plan 7-8 bytes at peak, measured); a "
        "request whose images do not fit waits, first in first out. Never below max_pixels",
    )
    pixel_wait_s: float = Field(
        10.0, gt=0, description="longest wait for room in max_inflight_pixels; then 503"
    )
    fetch: FetchConfig = FetchConfig()

    @model_validator(mode="after")
    def _budget_fits_one_image(self) -> ImagesConfig:
        if self.max_inflight_pixels < self.max_pixels:
            raise ValueError("max_inflight_pixels must be at least max_pixels")
        return self


# Request-body fields with which a client changes how vLLM renders or embeds the prompt. The
# guard's checks assume the model sees the text and pixels the guard judged; with these it
# would not. Each is a top-level field of vLLM's OpenAI protocol:
RISKY_FIELDS = (
    "chat_template",  # a client's own Jinja template replaces the model's: any rendering at all
    # (and vLLM GHSA-6fvq-23cw-5628 / GHSA-4hw3-g54f-xfrj: templates as a denial of service)
    "chat_template_kwargs",  # variables the template reads: can switch its branches or be
    # rendered as text; older vLLM also took a whole template through it
    "documents",  # RAG documents the template renders into the prompt, never judged
    "mm_processor_kwargs",  # HF processor options (resize, crops, pixel budget): the model's
    # view of the image differs from the one the image stages checked
    "media_io_kwargs",  # per-request media decoder options (newer vLLM), the same concern
    "prompt_embeds",  # /v1/completions: embeddings go straight to the model, no text at all
    "kv_transfer_params",  # disaggregated prefill: KV state computed elsewhere stands in for
    # the prefill of the judged prompt (set by a P/D router, never by a client)
    "truncate_prompt_tokens",  # keeps the last N tokens only: the model sees part of what was
    # judged (a framing cut away, image placeholder tokens cut in half)
)
# Left out on purpose:
# - tools: function calling is ordinary OpenAI use; the names, descriptions and schemas the
#   template renders into the prompt are judged as text (guard/intake/messages.py). List it
#   where clients never need it.
# - add_generation_prompt, continue_final_message: they change the prompt's structure, not its
#   text (every message is judged, and /v1/completions already lets a client lay out a prompt).
# - guided_*, response_format, structural_tag: they shape the output, not the prompt.
# - logits_processors: vLLM refuses it unless its operator allows a pattern.
# Fields the guard itself reads cannot be listed.
_OWN_FIELDS = frozenset({"model", "messages", "prompt", "stream", "stream_options"})


class RequestsConfig(_Section):
    """Request-body fields an untrusted client may not set (checked on chat and completions,
    HTTP and gRPC alike, before anything else)."""

    risky_fields: list[str] = Field(
        default_factory=lambda: list(RISKY_FIELDS),
        description="top-level body fields that change prompt rendering or embedding; "
        "a field whose value is null counts as absent",
    )
    risky_action: Literal["reject", "strip"] = Field(
        "reject",
        description="reject: 400 invalid_request_error naming the field; strip: remove it "
        "before the request is judged and forwarded (logged, counted)",
    )

    @field_validator("risky_fields")
    @classmethod
    def _not_own(cls, v: list[str]) -> list[str]:
        own = sorted(_OWN_FIELDS.intersection(v))
        if own:
            raise ValueError(f"the guard needs these fields itself: {', '.join(own)}")
        if any(not name for name in v):
            raise ValueError("field names must not be empty")
        return list(dict.fromkeys(v))


class AuditConfig(_Section):
    path: Path | None = Field(None, description="JSON-lines file; null = standard error")
    include_prompt: bool = False
