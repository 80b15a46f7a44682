"""Configuration precedence and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.config import ConfigError, load_config


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guard.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_secure_starting_values() -> None:
    cfg = load_config()
    assert cfg.images.max_images == 8
    assert cfg.images.max_image_bytes == 20 * 1024 * 1024
    assert cfg.images.max_pixels == 50_000_000
    assert cfg.server.max_body_bytes == 32 * 1024 * 1024
    assert cfg.images.fetch.max_redirects == 3 and cfg.images.fetch.timeout_s == 10
    assert cfg.pipeline.mode == "enforce"
    assert all(cfg.stage(n).fail_mode == "closed" for n in ("purify", "reasoner", "backdoor"))


def test_precedence_flags_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _yaml(
        tmp_path,
        "server:\n  host: 0.0.0.0\n  http_port: 7000\n  grpc_port: 7001\n"
        "reasoner:\n  fail_mode: open\n",
    )
    monkeypatch.setenv("VLM_GUARD_SERVER__HTTP_PORT", "7100")
    monkeypatch.setenv("VLM_GUARD_SERVER__GRPC_PORT", "7101")
    cfg = load_config(path, {"server": {"grpc_port": 7201}})
    assert cfg.server.host == "0.0.0.0"  # file
    assert cfg.server.http_port == 7100  # environment over file
    assert cfg.server.grpc_port == 7201  # flag over environment
    assert cfg.reasoner.fail_mode == "open"


def test_secrets_from_environment_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_GUARD_SERVER__API_KEYS", '["s3cret"]')
    cfg = load_config()
    assert cfg.server.api_keys[0].get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(
    "text,message",
    [
        ("servr:\n  host: x\n", "servr"),
        ("server:\n  http_port: lots\n", "server.http_port"),
        ("server:\n  http_port: 70000\n", "server.http_port"),
        ("pipeline:\n  mode: maybe\n", "pipeline.mode"),
        ("images:\n  fetch:\n    allow_networks: [not-a-net]\n", "images.fetch.allow_networks"),
        ("server: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
    ],
    ids=["unknown-key", "bad-type", "out-of-range", "bad-enum", "bad-network", "yaml", "list"],
)
def test_bad_files_give_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_yaml(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_misspelt_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_GUARD_SERVERS__HTTP_PORT", "1")
    with pytest.raises(ConfigError, match="VLM_GUARD_SERVERS__HTTP_PORT"):
        load_config()
