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
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from guard.config.sections import (
    RISKY_FIELDS,
    AuditConfig,
    FetchConfig,
    ImagesConfig,
    RequestsConfig,
    ServerConfig,
    UpstreamConfig,
)
from guard.config.stages import (
    DEFENSES,
    BackdoorConfig,
    PipelineConfig,
    PurifyConfig,
    ReasonerConfig,
    StageConfig,
)

__all__ = [
    "DEFENSES",
    "RISKY_FIELDS",
    "AuditConfig",
    "BackdoorConfig",
    "ConfigError",
    "FetchConfig",
    "GuardConfig",
    "ImagesConfig",
    "PipelineConfig",
    "PurifyConfig",
    "ReasonerConfig",
    "RequestsConfig",
    "ServerConfig",
    "StageConfig",
    "UpstreamConfig",
    "load_config",
    "read_yaml",
]


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
