"""The stages' sections of the configuration (DESIGN.md §4) and the pipeline's."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, Field, SecretStr, model_validator

from guard.config.sections import MiB, _Section

DEFENSES = ("purify", "reasoner", "backdoor")
FailMode = Literal["closed", "open"]
Screen = Literal["purified", "received", "both"]  # which images the backdoor stage screens
# How the monitored weights are loaded; "auto" keeps the checkpoint's, as vLLM's --dtype auto.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


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
    encoder_features: Literal["pooled", "patches"] = Field(
        "pooled",
        description="hf: embed the pooled CLS, or the patch tokens the VLM's projector reads",
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
    confirm_steps: int = Field(
        0,
        ge=0,
        description="look this many noise steps past a stop by tau before trusting it "
        "(a multiple of check_every; signal=denoised; 0 = no look)",
    )
    confirm_tau: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="at the look, escalate when cos(phi(x0 estimate), phi(input)) < this",
    )
    sampler: Literal["ddpm", "ddim"] = "ddim"
    ddim_steps: int = Field(10, ge=1)
    seed: int = 0
    block_score: float | None = Field(
        None, description="block when the adversarial score exceeds this; null = never block"
    )
    device: str = "cpu"
    max_batch: int = Field(
        16, ge=1, description="images in flight at once (one model call advances them all)"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long an idle worker waits for company")
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
        if self.encoder_features == "patches" and self.encoder != "hf":
            raise ValueError("encoder_features: patches needs encoder: hf (open_clip pools)")
        if self.drift_tau is not None and self.signal != "denoised":
            raise ValueError("drift_tau needs signal: denoised (x_k drifts for every image)")
        if self.confirm_steps % self.check_every:
            raise ValueError(
                f"confirm_steps ({self.confirm_steps}) must be a multiple of check_every "
                f"({self.check_every})"
            )
        if self.confirm_steps and self.signal != "denoised":
            raise ValueError("confirm_steps needs signal: denoised (the look reads x0 estimates)")
        if self.confirm_tau is not None and not self.confirm_steps:
            raise ValueError("confirm_tau needs confirm_steps > 0 (how far to look)")
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
    dtype: Dtype = Field(
        "auto",
        description="dtype the weights are loaded in (auto: the checkpoint's, as vLLM's --dtype "
        "auto); calibrate the profile with the same (vlm-guard backdoor calibrate --dtype)",
    )
    screen: Screen = Field(
        "both",
        description="which images to screen: those the model will see (purified), those the "
        "client sent, or both (a trigger the client sent is an attack even when purification "
        "defuses it; one more prefill per image)",
    )
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
