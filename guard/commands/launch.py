"""``vlm-guard launch``: one node, one command — a vLLM child process with the guard in front.

Runs ``vllm serve MODEL --host 127.0.0.1 --port P [arguments after --]`` in its own process
group, waits until its ``GET /health`` answers 200, then serves the guard with the upstream
``http://127.0.0.1:P/v1``. The child listens on loopback only, so the guard cannot be bypassed
from the network. ``--child-command`` names another OpenAI-compatible server (the toy stand-in in
tests): a plain prefix gets vLLM's ``MODEL --host H --port P`` appended; a template with
``{model}``, ``{host}`` and ``{port}`` is used as written.

Signals: SIGINT or SIGTERM drains the guard first (readiness fails, open requests finish within
``server.drain_seconds``), then the child gets SIGTERM, and its process group SIGKILL after
``--stop-timeout``; a second signal skips that wait. On Linux the child also gets SIGTERM if the
guard itself dies (``PR_SET_PDEATHSIG``), so it is never left orphaned.

Exit codes: 0 stopped by a signal and the child ended in time; 1 the child died, never became
ready, had to be killed, or the guard failed to start; 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guard.commands.serving import add_guard_flags, guard_overrides
from guard.config import ConfigError, GuardConfig, load_config

log = logging.getLogger(__name__)

CHILD_HOST = "127.0.0.1"
PLACEHOLDERS = ("{model}", "{host}", "{port}")

# Runs between fork and exec of the child (a separate interpreter, so no preexec_fn in a
# process that may already run model threads): ask for SIGTERM when the guard dies, then exec.
_PDEATHSIG_SHIM = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the guard died before prctl took effect
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write(f"vlm-guard launch: cannot run {sys.argv[2]}: {e.strerror}\\n")
    os._exit(127)
"""


def add_parser(sub: Any) -> None:
    what = "start vLLM as a child process and serve the guard in front of it"
    launch = sub.add_parser("launch", help=what, description=what + "; args after -- go to it")
    launch.add_argument("--model", required=True, help="the model the child serves")
    add_guard_flags(launch)  # the guard's, as `serve` reads them; the upstream is the child
    launch.add_argument(
        "--child-command",
        default="vllm serve",
        help="the server to start: a prefix (default: 'vllm serve'), or a template using "
        "{model}, {host} and {port}",
    )
    launch.add_argument("--child-port", type=int, default=0, help="default: a free port")
    launch.add_argument("--ready-path", default="/health", help="polled until it answers 200")
    launch.add_argument(
        "--ready-timeout", type=float, default=1800.0, help="seconds the child may take to load"
    )
    launch.add_argument(
        "--stop-timeout", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL"
    )
    launch.add_argument("child_args", nargs=argparse.REMAINDER, help="-- then the child's own")


def main(args: argparse.Namespace) -> int:
    if args.ready_timeout <= 0 or args.stop_timeout < 0:
        raise ConfigError("--ready-timeout must be positive and --stop-timeout not negative")
    if not 0 <= args.child_port <= 65535:
        raise ConfigError(f"--child-port {args.child_port} is not a port number")
    extra = list(args.child_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    port = args.child_port or _free_port(CHILD_HOST)
    argv = child_argv(args.child_command, args.model, port, extra)
    cfg = load_config(args.config, guard_overrides(args, f"http://{CHILD_HOST}:{port}/v1"))
    _check_ports(cfg, port, child_port_given=args.child_port != 0)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    child_env = dict(os.environ)  # vLLM keeps its own threading settings
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `serve`, before torch loads
    launcher = _Launcher(cfg, argv, child_env, port, args)
    try:
        return asyncio.run(launcher.run())
    finally:
        launcher.kill_if_running()  # whatever ended the event loop, no orphan stays behind


def child_argv(template: str, model: str, port: int, extra: Sequence[str]) -> list[str]:
    """The child's argv: the command with placeholders filled, then the pass-through args."""
    words = shlex.split(template)
    if not words:
        raise ConfigError("--child-command is empty")
    if not any(p in w for w in words for p in PLACEHOLDERS):
        words += ["{model}", "--host", "{host}", "--port", "{port}"]  # vLLM's own flags
    elif not any("{port}" in w for w in words):
        raise ConfigError("--child-command must pass {port} to the child")
    for arg in extra:
        if arg in ("--host", "--port") or arg.startswith(("--host=", "--port=")):
            raise ConfigError(
                f"do not pass {arg.split('=')[0]} to the child: it listens on "
                f"{CHILD_HOST}, choose its port with --child-port"
            )
    values = {"{model}": model, "{host}": CHILD_HOST, "{port}": str(port)}
    filled = []
    for word in words:
        for key, value in values.items():
            word = word.replace(key, value)
        filled.append(word)
    executable = shutil.which(filled[0])
    if executable is None:
        hint = " (pip install 'vlm-guard[vllm]')" if filled[0] == "vllm" else ""
        raise ConfigError(
            f"cannot find {filled[0]!r} on PATH{hint}; name the server with --child-command"
        )
    return [executable, *filled[1:], *extra]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_ports(cfg: GuardConfig, child_port: int, *, child_port_given: bool) -> None:
    """Refuse ports in use now, before a child spends minutes loading a model."""
    wanted = [(CHILD_HOST, child_port)] if child_port_given else []
    for port in (cfg.server.http_port, cfg.server.grpc_port):
        if port == child_port:
            raise ConfigError(f"the guard and the child cannot both listen on port {port}")
        if port:
            wanted.append((cfg.server.host, port))
    for host, port in wanted:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            with socket.socket(family) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
                s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class _Launcher:
    """The child's supervisor and the guard's server, in one event loop."""

    def __init__(
        self, cfg: GuardConfig, argv: list[str], env: dict[str, str], port: int, args: Any
    ) -> None:
        self.cfg, self.argv, self.env = cfg, argv, env
        self.ready_url = f"http://{CHILD_HOST}:{port}{args.ready_path}"
        self.ready_timeout: float = args.ready_timeout
        self.stop_timeout: float = args.stop_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.label = f"child {Path(argv[0]).name}"
        self.stop = asyncio.Event()  # SIGINT or SIGTERM
        self.hurry = asyncio.Event()  # the same again: SIGKILL the child without waiting

    async def run(self) -> int:
        from guard.server import GuardServer, build_service

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # Defenses load before the child: bad guard configuration fails before a long load.
        service = build_service(self.cfg)
        exited: asyncio.Task[int] | None = None
        server: GuardServer | None = None
        code = 1
        try:
            exited = await self._start_child()
            code = await self._wait_ready(exited)
            if code < 0:
                server = GuardServer(self.cfg, service)
                try:
                    await server.start()
                except OSError as e:
                    server = None
                    log.error("the guard could not start: %s", e)
                    return 1
                code = await self._serve(exited)
        finally:
            await (server.stop() if server is not None else service.aclose())  # drain first
            if exited is not None and not await self._stop_child(exited):
                code = max(code, 1)
        return code

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.warning("%s received again: the child gets SIGKILL without waiting", sig.name)
            self.hurry.set()
        else:
            log.info("%s received: stopping", sig.name)
            self.stop.set()

    async def _start_child(self) -> asyncio.Task[int]:
        argv = self.argv
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
        # A session of its own: a terminal's Ctrl-C reaches the guard only (which drains
        # first), and killpg reaches the child's workers too.
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, env=self.env, start_new_session=True
        )
        self.label += f" (pid {self.proc.pid})"
        log.info("started %s: %s", self.label, shlex.join(self.argv))
        return asyncio.create_task(self.proc.wait())

    async def _wait_ready(self, exited: asyncio.Task[int]) -> int:
        """-1 once the child answers 200; otherwise the exit code for launch."""
        import aiohttp

        clock = asyncio.get_running_loop().time
        start = clock()
        report, every = start + 5.0, 5.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.ready_url) as response:
                        if response.status == 200:
                            log.info("%s ready after %.1f s", self.label, clock() - start)
                            return -1
                if await self._until(exited, 0.25):
                    why = _describe(exited.result())
                    log.error("%s %s before it became ready", self.label, why)
                    return 1
                if self.stop.is_set():
                    return 0
                waited = clock() - start
                if waited >= self.ready_timeout:
                    log.error(
                        "%s not ready after %g s (GET %s)", self.label, waited, self.ready_url
                    )
                    return 1
                if clock() >= report:
                    log.info("waiting for the %s to load: %.0f s so far", self.label, waited)
                    every = min(every * 2, 60.0)
                    report = clock() + every

    async def _serve(self, exited: asyncio.Task[int]) -> int:
        if await self._until(exited, None):
            log.error("%s %s; stopping the guard", self.label, _describe(exited.result()))
            return 1
        seconds = self.cfg.server.drain_seconds
        log.info("draining the guard for up to %ss, then stopping the child", seconds)
        return 0

    async def _until(self, exited: asyncio.Task[int], at_most: float | None) -> bool:
        """Wait for the child to exit, a stop signal, or `at_most` seconds; True if it exited."""
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({exited, stopping}, timeout=at_most, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        return exited.done() and not self.stop.is_set()

    async def _stop_child(self, exited: asyncio.Task[int]) -> bool:
        """SIGTERM, then SIGKILL to its process group; True if SIGKILL was not needed."""
        assert self.proc is not None
        clean = True
        if not exited.done():
            log.info("stopping %s: SIGTERM, SIGKILL after %g s", self.label, self.stop_timeout)
            self.proc.send_signal(signal.SIGTERM)  # vLLM stops its own workers
            hurry = asyncio.create_task(self.hurry.wait())
            await asyncio.wait(
                {exited, hurry}, timeout=self.stop_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            hurry.cancel()
            if not exited.done():
                log.warning("%s still running: SIGKILL", self.label)
                self._kill_group()
                clean = False
            log.info("%s %s", self.label, _describe(await exited))
        self._kill_group()  # workers it left behind (the group outlives its leader)
        return clean

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def kill_if_running(self) -> None:
        """Last resort, outside the event loop (e.g. an error escaped it)."""
        if self.proc is not None and self.proc.returncode is None:
            self._kill_group()
