"""The ``vlm-guard`` command as users run it: a real process, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.servers import AppServer

SERVE = [sys.executable, "-m", "guard", "serve"]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize(
    "extra,env,needle",
    [
        (["--config", "/nonexistent/guard.yaml"], {}, "cannot read config file"),
        (["--defenses", "purify,magic"], {}, "unknown defense(s) magic"),
        (["--defenses", "reasoner"], {}, "reasoner.model must name"),
        (["--defenses", "backdoor"], {}, "backdoor.model must name"),
        (["--defenses", "purify"], {}, "purify.diffusion must name"),
        (
            ["--defenses", "purify"],
            {
                "VLM_GUARD_PURIFY__DIFFUSION": "/nonexistent/ddpm",
                "VLM_GUARD_PURIFY__ENCODER_MODEL": "local-dir:/nonexistent/clip",
            },
            "purify.diffusion: no such file or directory: /nonexistent/ddpm",
        ),
        (
            ["--mode", "enforce", "--http-port", "99999", "--defenses", "none"],
            {},
            "server.http_port",
        ),
        (["--defenses", "none"], {"VLM_GUARD_SERVER__HTTP_PORT": "abc"}, "server.http_port"),
        (["--defenses", "none"], {"VLM_GUARD_UPSTREAM__URL": "not a url"}, "upstream.url"),
        (["--defenses", "none"], {"VLM_GUARD_SERVR__HOST": "x"}, "VLM_GUARD_SERVR__HOST"),
    ],
    ids=[
        "missing-file",
        "unknown-defense",
        "reasoner-without-model",
        "backdoor-without-model",
        "purify-without-models",
        "purify-missing-checkpoint",
        "bad-port",
        "bad-env",
        "bad-url",
        "misspelt-env",
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    extra: list[str], env: dict[str, str], needle: str
) -> None:
    done = _run([*SERVE, *extra], env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-guard: error: ")
    assert needle in lines[0]


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("server:\n  http_port: [\n")
    done = _run([*SERVE, "--config", str(path)])
    assert done.returncode == 2 and "not valid YAML" in done.stderr


def test_serve_proxies_and_stops_on_sigterm(upstream: AppServer, tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("server:\n  drain_seconds: 2\nlog_level: info\n")
    proc = subprocess.Popen(
        [
            *SERVE,
            "--config",
            str(path),
            "--upstream",
            upstream.url + "/v1",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--defenses",
            "none",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"serving HTTP on 127\.0\.0\.1:(\d+), gRPC on (\d+)", line)
            if match:
                port = int(match.group(1))
            elif not line and proc.poll() is not None:
                pytest.fail(f"guard exited early with {proc.returncode}")
        assert port is not None
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x") as client:
            reply = client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "ping"}]
            )
        assert reply.choices[0].message.content == "echo: ping images=0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
