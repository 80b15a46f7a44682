"""Configuration: one pydantic model per component, loaded once by ``cli.py`` and passed down.

Precedence, highest first: command-line flags, ``VLM_GUARD_*`` environment variables (``__``
separates nesting levels, e.g. ``VLM_GUARD_SERVER__HTTP_PORT=9000``), the YAML file, defaults.
Unknown keys are errors everywhere, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

KiB = 1024
MiB = 1024 * KiB
DEFENSES = ("purify", "reasoner", "backdoor")
FailMode = Literal["closed", "open"]


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
        "screening (about 3 bytes each, more while the stages work); a request whose images do "
        "not fit waits, first in first out. Never below max_pixels",
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


class StageConfig(_Section):
    """What the pipeline needs to know about any stage."""

    timeout_s: float = Field(30.0, gt=0)
    fail_mode: FailMode = "closed"


class PurifyConfig(StageConfig):
    """DiffCAP purification (DESIGN.md §4.1): models, adaptive stop, batching and cache."""

    diffusion: str | None = Field(
        None, description="DDPMPipeline-layout diffusers checkpoint: hub id or local directory"
    )
    encoder: Literal["open_clip", "hf"] = Field(
        "open_clip", description="open_clip model, or a Hugging Face CLIP vision tower / LLaVA"
    )
    encoder_model: str | None = Field(
        None, description="open_clip model name or local-dir:PATH; HF repo id or directory"
    )
    encoder_pretrained: str | None = Field(
        None, description="open_clip pretrained tag or checkpoint file"
    )
    profile: Path | None = Field(
        None, description="calibration profile (vlm-guard purify calibrate): tau + clean t*"
    )
    tau: float = Field(0.999, ge=-1, le=1, description="stop when cos(e_k, e_prev) >= tau")
    check_every: int = Field(5, ge=1, description="noise steps between encoder checks")
    t_max: float = Field(0.3, gt=0, le=1, description="noise cap, fraction of T")
    t_min: float = Field(
        0.0, ge=0, le=1, description="noise floor, fraction of T: no stop before it"
    )
    t_escalate: float | None = Field(
        None, ge=0, le=1, description="depth for images still moving at t_max (>= t_max)"
    )
    signal: Literal["noisy", "denoised"] = Field(
        "noisy", description="embed x_k (DiffCAP) or the UNet's x0 estimate (+1 UNet call/check)"
    )
    drift_tau: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="escalate when cos(phi(x0 estimate), phi(input)) < this (signal=denoised)",
    )
    sampler: Literal["ddpm", "ddim"] = "ddim"
    ddim_steps: int = Field(10, ge=1)
    seed: int = 0
    block_score: float | None = Field(
        None, description="block when the adversarial score exceeds this; null = never block"
    )
    device: str = "cpu"
    max_batch: int = Field(16, ge=1, description="images per model call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for company")
    max_queue: int = Field(256, ge=1, description="waiting images before requests are refused")
    cache_bytes: int = Field(64 * MiB, ge=0, description="purified-image cache; 0 disables")

    @model_validator(mode="after")
    def _floor_within_cap(self) -> PurifyConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        if self.t_escalate is not None and self.t_escalate < self.t_max:
            raise ValueError(
                f"t_escalate ({self.t_escalate}) must be at least t_max ({self.t_max})"
            )
        if self.drift_tau is not None and self.signal != "denoised":
            raise ValueError("drift_tau needs signal: denoised (x_k drifts for every image)")
        return self


class ReasonerConfig(StageConfig):
    """Cross-modal safety reasoner behind an OpenAI-compatible endpoint (DESIGN.md §4.3)."""

    url: AnyHttpUrl = Field(
        AnyHttpUrl("http://127.0.0.1:8000/v1"), description="the reasoner's base URL (…/v1)"
    )
    model: str | None = Field(None, description="the reasoner's model name on that server")
    api_key: SecretStr | None = None
    protocol: Literal["reasoning-json", "llama-guard"] = "reasoning-json"
    policy: Path | None = Field(None, description="policy YAML; null = SSUI's nine categories")
    structured_output: Literal["auto", "always", "never"] = Field(
        "auto", description="send a response_format JSON schema (auto: until the server refuses)"
    )
    max_tokens: int = Field(512, ge=1, description="room for the reasoning and the verdict")
    max_concurrency: int = Field(16, ge=1, description="reasoner calls in flight")
    cache_bytes: int = Field(16 * MiB, ge=0, description="verdict cache; 0 disables")


class BackdoorConfig(StageConfig):
    """BYE attention-entropy monitor + cross-view check (DESIGN.md §4.2)."""

    model: str | None = Field(
        None, description="the served model's weights: hub id or local directory (transformers)"
    )
    profile: Path | None = Field(
        None, description="calibration profile (vlm-guard backdoor calibrate): layers, thresholds"
    )
    device: str = "cpu"
    max_batch: int = Field(8, ge=1, description="(image, prompt) pairs per prefill")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for company")
    max_queue: int = Field(256, ge=1, description="waiting pairs before requests are refused")


class PipelineConfig(_Section):
    mode: Literal["enforce", "monitor"] = "enforce"
    gating: Literal["sequential", "parallel"] = Field(
        "sequential",
        description="parallel: start the upstream call after purification, while the other "
        "stages run; nothing reaches the client before the verdict, a block cancels it",
    )
    defenses: list[Literal["purify", "reasoner", "backdoor"]] = Field(
        default_factory=lambda: list(DEFENSES)  # type: ignore[arg-type]
    )


class AuditConfig(_Section):
    path: Path | None = Field(None, description="JSON-lines file; null = standard error")
    include_prompt: bool = False


class GuardConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VLM_GUARD_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    images: ImagesConfig = ImagesConfig()
    requests: RequestsConfig = RequestsConfig()
    pipeline: PipelineConfig = PipelineConfig()
    purify: PurifyConfig = PurifyConfig()
    reasoner: ReasonerConfig = ReasonerConfig()
    backdoor: BackdoorConfig = BackdoorConfig()
    audit: AuditConfig = AuditConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def stage(self, name: str) -> StageConfig:
        section = getattr(self, name)
        assert isinstance(section, StageConfig)
        return section

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


# The YAML file's contents for the load in progress: pydantic-settings builds sources per
# class, so the per-call file travels in a context variable rather than a global.
_yaml_data: ContextVar[Mapping[str, Any]] = ContextVar(
    "vlm_guard_yaml", default=MappingProxyType({})
)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get())


class ConfigError(Exception):
    """Bad configuration: the message is one line, fit for stderr."""


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> GuardConfig:
    """Build the configuration from file, environment and ``overrides`` (command-line flags)."""
    _check_environment()
    token = _yaml_data.set(read_yaml(path) if path is not None else {})
    try:
        return GuardConfig(**dict(overrides or {}))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"invalid configuration at {where}: {first['msg']}{more}") from None
    finally:
        _yaml_data.reset(token)


# Read by other parts of vlm-guard (the toy world's cache), not by GuardConfig.
_OTHER_VARIABLES = frozenset({"VLM_GUARD_HOME"})


def _check_environment() -> None:
    """pydantic-settings ignores unknown variables; a misspelt override must not be ignored."""
    sections = {name.upper() for name in GuardConfig.model_fields}
    for name in os.environ:
        if not name.startswith("VLM_GUARD_") or name in _OTHER_VARIABLES:
            continue
        top = name.removeprefix("VLM_GUARD_").split("__", 1)[0]
        if top not in sections:
            raise ConfigError(f"unknown environment variable {name}")
