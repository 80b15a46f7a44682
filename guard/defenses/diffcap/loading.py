"""The purifier a guard config names: models loaded once, settings from the config or its
calibration profile, and the identity a profile must match (DESIGN.md §4.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guard.config import ConfigError, PurifyConfig
from guard.defenses.diffcap.diffusion import load_diffusion
from guard.defenses.diffcap.encoders import load_encoder
from guard.defenses.diffcap.profile import PurifyProfile
from guard.defenses.diffcap.purifier import Purifier
from guard.defenses.diffcap.settings import PurifySettings

# Bump when load_purifier's identity gains or loses a field: a profile made before cannot match,
# and cached toy-world profiles are rebuilt (their component key includes it).
IDENTITY_VERSION = 2


def load_purifier(
    cfg: PurifyConfig, *, use_profile: bool = True
) -> tuple[Purifier, dict[str, Any], PurifyProfile | None]:
    """The purifier ``cfg`` names, its identity (what a profile must match) and its profile."""
    if cfg.diffusion is None:
        raise ConfigError("purify.diffusion must name a diffusers DDPM checkpoint (id or dir)")
    if cfg.encoder_model is None:
        raise ConfigError("purify.encoder_model must name the encoder (see purify.encoder)")
    profile = PurifyProfile.load(cfg.profile) if use_profile and cfg.profile else None
    for key in ("tau", "drift_tau", "confirm_tau"):
        if profile is not None and key in cfg.model_fields_set:
            raise ConfigError(f"set purify.{key} or purify.profile, not both (the profile has it)")
    identity = {
        "diffusion": cfg.diffusion,
        "encoder": cfg.encoder,
        "encoder_model": cfg.encoder_model,
        "encoder_pretrained": cfg.encoder_pretrained,
        "check_every": cfg.check_every,
        "t_max": cfg.t_max,
        "t_min": cfg.t_min,
        "signal": cfg.signal,
        "t_escalate": cfg.t_escalate,
    }
    if cfg.encoder_features != "pooled":
        # Only when set: profiles made before the option embedded pooled features and stay valid.
        identity["encoder_features"] = cfg.encoder_features
    if cfg.confirm_steps:
        # A confirm_tau holds for the span it was calibrated at; older profiles have no look.
        identity["confirm_steps"] = cfg.confirm_steps
    if profile is not None:  # before the models load: a wrong profile fails at once
        profile.check_matches(identity)
    for key, where in (("diffusion", cfg.diffusion), ("encoder_model", cfg.encoder_model)):
        local = where.removeprefix("local-dir:")
        # A hub id is "org/name"; a path that is plainly local and missing fails fast here
        # instead of after a hub lookup that cannot succeed.
        if local.startswith(("/", "./", "../", "~")) and not Path(local).expanduser().exists():
            raise ConfigError(f"purify.{key}: no such file or directory: {local}")
    try:
        unet, scheduler = load_diffusion(cfg.diffusion, device=cfg.device)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load purify.diffusion {cfg.diffusion!r}: {_line(e)}") from None
    try:
        encoder = load_encoder(
            cfg.encoder,
            cfg.encoder_model,
            cfg.encoder_pretrained,
            device=cfg.device,
            features=cfg.encoder_features,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"cannot load purify.encoder_model {cfg.encoder_model!r}: {_line(e)}"
        ) from None
    try:
        return _build(cfg, profile, unet, scheduler, encoder), identity, profile
    except ValueError as e:  # settings that only the loaded models show wrong (k_max vs T)
        raise ConfigError(f"purify: {_line(e)}") from None


def _build(
    cfg: PurifyConfig, profile: PurifyProfile | None, unet: Any, scheduler: Any, encoder: Any
) -> Purifier:
    settings = PurifySettings(
        tau=profile.tau if profile is not None else cfg.tau,
        check_every=cfg.check_every,
        t_max=cfg.t_max,
        t_min=cfg.t_min,
        signal=cfg.signal,
        t_escalate=cfg.t_escalate,
        drift_tau=profile.drift_tau if profile is not None else cfg.drift_tau,
        confirm_steps=cfg.confirm_steps,
        confirm_tau=profile.confirm_tau if profile is not None else cfg.confirm_tau,
        sampler=cfg.sampler,
        ddim_steps=cfg.ddim_steps,
        seed=cfg.seed,
    )
    return Purifier(unet, scheduler, encoder, settings)


def _line(error: BaseException) -> str:
    """The first line of an error, for a one-line start-up message (never sent to clients)."""
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
