"""``vlm-guard launch`` as users run it: real processes on loopback, real signals.

The child is the toy stand-in upstream (``vlm-guard toy upstream``) in place of ``vllm serve``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from guard.cli import main

LAUNCH = [sys.executable, "-m", "guard", "launch", "--http-port", "0", "--grpc-port", "-1"]
TOY = [sys.executable, "-m", "guard", "toy", "upstream", "--model", "{model}"]
TOY_CHILD = shlex.join([*TOY, "--host", "{host}", "--port", "{port}"])
SERVING = r"serving HTTP on 127\.0\.0\.1:(\d+)"


def _python(code: str) -> str:
    """A child that is no server: it gets the port as an argument and runs ``code``."""
    return shlex.join([sys.executable, "-c", code, "{port}"])


class Launched:
    """One ``vlm-guard launch`` process; its output and its child's go to one log file."""

    def __init__(self, tmp: Path, args: list[str], drain_seconds: float = 5) -> None:
        self.log = tmp / f"launch-{time.monotonic_ns()}.log"
        env = {**os.environ, "VLM_GUARD_SERVER__DRAIN_SECONDS": str(drain_seconds)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*LAUNCH, "--defenses", "none", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.child_pid: int | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text())
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(f"launch exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        pytest.fail(f"no {pattern!r} in {timeout} s:\n{self.text()}")

    def serving(self, timeout: float = 60) -> str:
        """Wait until the guard serves; its base URL (the child's pid is noted)."""
        self.child_pid = int(self.wait_for(r"started child \S+ \(pid (\d+)\)", timeout)[1])
        return f"http://127.0.0.1:{self.wait_for(SERVING, timeout)[1]}/v1"

    def exit_code(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launch still running after {timeout} s:\n{self.text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.child_pid is not None and not _gone(self.child_pid, 0):
            with contextlib.suppress(ProcessLookupError):  # never leave one behind, even failing
                os.killpg(self.child_pid, signal.SIGKILL)


def _gone(pid: int, timeout: float = 15) -> bool:
    """The process has ended (a zombie waiting for a reaper that never comes counts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        except OSError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """Start ``vlm-guard launch``; every launcher and child is gone after the test."""
    started: list[Launched] = []

    def start(args: list[str], drain_seconds: float = 5) -> Launched:
        run = Launched(tmp_path, args, drain_seconds)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_llava  # torch and diffusers: only when needed

    path = tmp_path_factory.mktemp("vlm") / "tiny-vlm"
    save_tiny_llava(path)
    return path


def _echo(launch: Callable[..., Launched], *extra: str, drain_seconds: float = 5) -> Launched:
    """launch with the stand-in's built-in echo model as the child."""
    return launch(["--model", "echo", "--child-command", TOY_CHILD, *extra], drain_seconds)


def test_guard_answers_through_the_child_then_stops_on_sigterm(
    launch: Callable[..., Launched], tiny_vlm: Path
) -> None:
    run = launch(["--model", str(tiny_vlm), "--child-command", TOY_CHILD])
    url = run.serving(120)
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(
            model="tiny-vlm", messages=[{"role": "user", "content": "what digit?"}], max_tokens=3
        )
    assert reply.model == "tiny-vlm" and isinstance(reply.choices[0].message.content, str)
    run.proc.send_signal(signal.SIGTERM)
    assert run.exit_code() == 0, run.text()
    assert run.child_pid is not None and _gone(run.child_pid)


def test_sigterm_drains_the_guard_before_the_child_stops(
    launch: Callable[..., Launched],
) -> None:
    # 8 streamed tokens, 0.3 s apart: SIGTERM lands mid-stream, the stream still completes
    # (it needs the child alive until the guard has drained), then the child is stopped.
    run = _echo(launch, "--", "--token-delay", "0.3", drain_seconds=20)
    pieces: list[str] = []
    with openai.OpenAI(base_url=run.serving(), api_key="x", max_retries=0, timeout=60) as client:
        stream = client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "one two three four five six"}],
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not pieces:
                    run.proc.send_signal(signal.SIGTERM)
                pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "echo: one two three four five six images=0"
    assert run.exit_code() == 0, run.text()
    assert run.child_pid is not None and _gone(run.child_pid)
    log = run.text()
    assert log.index("draining the guard") < log.index("stopping child")


def test_child_death_stops_launch_with_an_error(launch: Callable[..., Launched]) -> None:
    run = _echo(launch)
    run.serving()
    assert run.child_pid is not None
    started = time.monotonic()
    os.kill(run.child_pid, signal.SIGKILL)
    assert run.exit_code() == 1, run.text()
    assert time.monotonic() - started < 15
    assert re.search(r"child python\S* \(pid \d+\) was killed by SIGKILL; stopping", run.text())


def test_child_dying_before_ready_is_an_error(launch: Callable[..., Launched]) -> None:
    run = launch(["--model", "m", "--child-command", _python("import sys; sys.exit(3)")])
    assert run.exit_code() == 1, run.text()
    assert "exited with code 3 before it became ready" in run.text()


def test_child_never_ready_times_out_and_is_killed(launch: Callable[..., Launched]) -> None:
    # It ignores SIGTERM too, so the stop ends in SIGKILL.
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    timeouts = ["--ready-timeout", "2", "--stop-timeout", "1"]
    run = launch(["--model", "m", "--child-command", _python(code), *timeouts])
    pid = int(run.wait_for(r"started child \S+ \(pid (\d+)\)")[1])
    assert run.exit_code() == 1, run.text()
    log = run.text()
    assert "not ready after" in log and "still running: SIGKILL" in log
    assert _gone(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_child_stops_when_launch_is_killed(launch: Callable[..., Launched]) -> None:
    run = _echo(launch)
    run.serving()
    run.proc.kill()  # no chance to clean up: the kernel tells the child
    run.proc.wait()
    assert run.child_pid is not None and _gone(run.child_pid)


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--child-command", "no-such-server-xyz"], "cannot find 'no-such-server-xyz' on PATH"),
        (["--child-command", TOY_CHILD, "--", "--port", "9"], "do not pass --port"),
        (["--child-command", TOY_CHILD, "--", "--host=0.0.0.0"], "do not pass --host"),
        (["--child-command", "python -m x --model {model}"], "must pass {port}"),
        (["--child-command", TOY_CHILD, "--child-port", "BUSY"], "cannot listen on 127.0.0.1:"),
        (["--child-command", TOY_CHILD, "--http-port", "BUSY"], "cannot listen on 127.0.0.1:"),
        (["--child-command", TOY_CHILD, "--ready-timeout", "0"], "--ready-timeout"),
    ],
    ids=["unknown-command", "child-port", "child-host", "no-port", "child-busy", "http-busy", "t"],
)
def test_bad_input_is_refused_with_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with _busy_port() as busy:
        port = str(busy.getsockname()[1])
        args = [port if a == "BUSY" else a for a in args]
        assert main(["launch", "--model", "echo", "--grpc-port", "-1", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-guard: error: "), lines
    assert needle in lines[0]


@pytest.mark.skipif(shutil.which("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_names_the_extra(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--model", "some/model"]) == 2
    err = capsys.readouterr().err
    assert "cannot find 'vllm' on PATH (pip install 'vlm-guard[vllm]')" in err
