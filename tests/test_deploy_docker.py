"""deploy/docker: the Dockerfile and compose.yaml agree with the guard's code and with the
Kubernetes manifests. Neither can be built here (no Docker daemon), so both are parsed and
checked; ``dockerfile_problems`` and ``compose_problems`` return what is wrong, so that the
negative tests can show each check failing on a broken copy.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, cast

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from guard import __version__
from guard.config import ConfigError, GuardConfig
from guard.transport.http import create_app
from tests.kustomize import Obj, pod_spec
from tests.servers import AppServer
from tests.test_deploy_kubernetes import (
    DRAIN_PHASES,
    SAMPLE_API_KEYS,
    guard_config,
    guard_routes,
    load_guard_config,
    long_flags,
    named,
    one,
    parse_serve,
    rendered,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# vLLM's memory share may differ: on one GPU shared with the guard it must leave room.
MAY_DIFFER = {"gpu-memory-utilization"}
# The Compose Specification's top-level and service keys, as far as a file here may use them.
COMPOSE_TOP = {"name", "services", "networks", "volumes", "configs", "secrets"}
SERVICE_KEYS = {
    "build", "cap_drop", "command", "depends_on", "deploy", "entrypoint", "environment",
    "healthcheck", "image", "network_mode", "networks", "ports", "read_only", "restart",
    "security_opt", "shm_size", "stop_grace_period", "tmpfs", "user", "volumes",
}  # fmt: skip


# --- Dockerfile -----------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The build stages, each starting with its FROM (global ARGs resolved into it)."""
    args = {}
    out: list[list[tuple[str, str]]] = []
    for word, rest in steps:
        if word == "ARG" and not out:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            out.append([(word, re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest))])
        else:
            assert out, f"{word} before any FROM"
            out[-1].append((word, rest))
    return out


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return cast(list[str], value)


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    rest = next(r for w, r in stage if w == "HEALTHCHECK")
    _, _, command = rest.partition("CMD ")
    return exec_form(command)


def _urls(argv: list[str]) -> list[str]:
    return re.findall(r"https?://[^'\" ]+", " ".join(argv))


def dockerfile_problems(text: str) -> list[str]:
    out: list[str] = []
    built = stages(instructions(text))
    if len(built) < 2:
        return ["the Dockerfile must have a builder stage and a runtime stage"]
    builder_name = built[0][0][1].split(" AS ")[-1]
    final = built[-1]
    base = final[0][1].split(" AS ")[0]
    match = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", base)
    if match is None:
        out.append(f"the runtime stage must start from a slim python image, not {base}")
    else:
        if match[1] + ".0" not in SpecifierSet(PROJECT["requires-python"]):
            out.append(f"python {match[1]} does not satisfy requires-python")
    # Nothing is built or installed in the runtime stage: it only copies the builder's venv.
    for word, rest in final:
        if word == "RUN" and re.search(r"apt-get install|apk add|pip install|gcc|make ", rest):
            out.append(f"the runtime stage installs or builds something: {rest}")
        if word == "COPY" and f"--from={builder_name}" not in rest:
            out.append(f"the runtime stage copies from outside the builder: {rest}")
    users = [rest for word, rest in final if word == "USER"]
    if not users or users[-1].split(":")[0] in ("", "0", "root"):
        out.append("the runtime stage must end as a non-root USER")

    # The command line is `vlm-guard serve` with flags guard/cli.py knows.
    entrypoint = exec_form(next((r for w, r in final if w == "ENTRYPOINT"), "[]"))
    cmd = exec_form(next((r for w, r in final if w == "CMD"), "[]"))
    if entrypoint != ["vlm-guard"] or "vlm-guard" not in PROJECT["scripts"]:
        out.append(f"ENTRYPOINT {entrypoint} is not the vlm-guard script")
    args = parse_serve(cmd)
    if args is None:
        out.append(f"CMD {cmd} does not parse with guard/cli.py")
    elif args.host not in ("0.0.0.0", "::"):
        out.append("CMD must make the guard listen on all interfaces")

    # Exposed ports and the health check follow the guard's defaults and routes.
    defaults = GuardConfig().server
    exposed = {int(p) for w, r in final if w == "EXPOSE" for p in r.split()}
    if exposed != {defaults.http_port, defaults.grpc_port}:
        out.append(f"EXPOSE {sorted(exposed)} != the guard's default ports")
    check = healthcheck_command(final)
    urls = _urls(check)
    if check[:2] != ["python", "-c"] or "urllib" not in check[2] or len(urls) != 1:
        out.append(f"HEALTHCHECK {check} should fetch one URL with Python's urllib")
    else:
        url = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/\S*)", urls[0])
        if url is None or int(url[1]) != defaults.http_port:
            out.append(f"HEALTHCHECK URL {urls[0]} is not the guard's HTTP port on loopback")
        elif ("GET", url[2]) not in guard_routes() or url[2] == "/readyz":
            out.append(f"HEALTHCHECK path {url[2]} is not the guard's liveness route")
    return out


def test_dockerfile_agrees_with_the_guard() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text(encoding="utf-8")) == []


def test_dockerfile_image_matches_the_kubernetes_pod() -> None:
    final = stages(instructions(DOCKERFILE.read_text(encoding="utf-8")))[-1]
    spec = pod_spec(one(rendered("base"), "Deployment"))
    assert spec is not None
    guard = named(spec["containers"], "guard")
    assert {p["containerPort"] for p in guard["ports"]} == {
        int(p) for w, r in final if w == "EXPOSE" for p in r.split()
    }
    user = next(r for w, r in reversed(final) if w == "USER")
    assert user == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    assert guard["image"].split(":")[0] == "vlm-guard"


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    rules = [
        line
        for line in (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "an allowlist: .venv and caches are gigabytes"
    admitted = {r[1:] for r in rules if r.startswith("!")}
    copied = {
        src
        for stage in stages(instructions(DOCKERFILE.read_text(encoding="utf-8")))
        for word, rest in stage
        if word == "COPY" and not rest.startswith("--from")
        for src in rest.split()[:-1]
    }
    assert copied == admitted
    assert all((ROOT / src).exists() for src in copied)


def test_healthcheck_command_runs() -> None:
    final = stages(instructions(DOCKERFILE.read_text(encoding="utf-8")))[-1]
    code = healthcheck_command(final)[2]
    port = str(GuardConfig().server.http_port)

    def run(new_port: int) -> int:
        moved = code.replace(f":{port}/", f":{new_port}/")
        return subprocess.run(
            [sys.executable, "-c", moved], capture_output=True, timeout=30
        ).returncode

    # /healthz needs no service: the bare app answers it.
    server = AppServer(create_app(GuardConfig(), cast(Any, None)))
    try:
        assert run(server.port) == 0
    finally:
        server.close()
    assert run(server.port) != 0  # nothing listening any more: unhealthy


# --- compose.yaml ---------------------------------------------------------------------------


def load_compose() -> Obj:
    return cast(Obj, yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} and ${VAR:?error}, with samples for the required ones."""

    def sub(m: re.Match[str]) -> str:
        if m[1] == "VLM_GUARD_API_KEYS":
            return SAMPLE_API_KEYS
        assert m[2] == ":-", f"${{{m[1]}}} has no default"
        return m[3]

    return re.sub(r"\$\{(\w+)(:[-?])([^}]*)\}", sub, value)


def _seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts is not None and duration, duration
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


def _published(ports: list[str]) -> set[int]:
    return {int(p.split(":")[-1].split("/")[0]) for p in ports}


def compose_problems(compose: Obj) -> list[str]:
    out: list[str] = []
    if set(compose) - COMPOSE_TOP:
        out.append(f"unknown top-level keys {sorted(set(compose) - COMPOSE_TOP)}")
    services = compose.get("services", {})
    if set(services) != {"vllm", "guard"}:
        return [*out, f"services {sorted(services)} != vllm, guard"]
    for name, service in services.items():
        if set(service) - SERVICE_KEYS:
            out.append(f"service {name}: unknown keys {sorted(set(service) - SERVICE_KEYS)}")
    vllm, guard = services["vllm"], services["guard"]

    # vLLM: the Kubernetes sidecar's image and flags, loopback only, with a GPU.
    objs = rendered("overlays/gpu")
    spec = pod_spec(one(objs, "Deployment"))
    assert spec is not None
    sidecar = named(spec["initContainers"], "vllm")
    if vllm.get("image") != sidecar["image"]:
        out.append(f"vllm image {vllm.get('image')} != the pod's {sidecar['image']}")
    flags, pod_flags = long_flags(vllm.get("command", [])), long_flags(sidecar["args"])
    if vllm.get("entrypoint") != sidecar["command"]:
        out.append("vllm entrypoint differs from the pod's command")
    differ = {k for k in flags.keys() | pod_flags.keys() if flags.get(k) != pod_flags.get(k)}
    if differ - MAY_DIFFER or vllm.get("command", [])[:1] != sidecar["args"][:1]:
        out.append(f"vllm flags differ from the pod's: {sorted(differ - MAY_DIFFER)}")
    if flags.get("host") != "127.0.0.1":
        out.append("vllm must listen on 127.0.0.1 only")
    for name, service in services.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        gpus = [d for d in devices.get("devices", []) if "gpu" in d.get("capabilities", [])]
        if not gpus:
            out.append(f"{name} reserves no GPU")

    # The guard: inside vLLM's network namespace, started once vLLM is healthy.
    if guard.get("network_mode") != "service:vllm":
        out.append("the guard must share vllm's network namespace (network_mode: service:vllm)")
    if guard.get("ports"):
        out.append("ports of a service:vllm guard are published on the vllm service")
    depends = guard.get("depends_on", {})  # the short syntax, a list, waits for no health
    if not isinstance(depends, dict) or depends.get("vllm", {}).get("condition") != (
        "service_healthy"
    ):
        out.append("the guard must start once vllm is healthy")
    build = guard.get("build", {})
    context = (COMPOSE.parent / build.get("context", ".")).resolve()
    if context != ROOT or (context / build.get("dockerfile", "")).resolve() != DOCKERFILE:
        out.append(f"guard build {build} is not this Dockerfile with the repository as context")

    # Its command, config and environment load as `vlm-guard serve` would load them.
    args = parse_serve(guard.get("command", []))  # after the image's ENTRYPOINT vlm-guard
    if args is None:
        return [*out, f"guard command {guard.get('command')} does not parse with guard/cli.py"]
    mounts = {
        PurePosixPath(target): (COMPOSE.parent / source).resolve()
        for source, target, *_ in (interpolate(v).split(":") for v in guard.get("volumes", []))
    }
    config_file = mounts.get(PurePosixPath(args.config or "/nonexistent"))
    if config_file is None or not config_file.is_file():
        return [*out, f"--config {args.config} is not a mounted file"]
    env = {k: interpolate(str(v)) for k, v in guard.get("environment", {}).items()}
    try:
        cfg = load_guard_config(config_file.read_text(encoding="utf-8"), env)
    except ConfigError as e:
        return [*out, f"guard config: {e}"]
    if cfg != guard_config(objs):
        out.append("the guard's configuration differs from the gpu overlay's")
    published = _published(vllm.get("ports", []))
    if published != {cfg.server.http_port, cfg.server.grpc_port}:
        out.append(f"published ports {sorted(published)} are not exactly the guard's")

    # Shutdown: compose stops the guard first (it depends on vllm), then vllm.
    guard_stop = _seconds(guard.get("stop_grace_period", "10s"))
    if guard_stop < DRAIN_PHASES * cfg.server.drain_seconds:
        out.append(f"guard stop_grace_period {guard_stop}s < {DRAIN_PHASES} x drain_seconds")
    if _seconds(vllm.get("stop_grace_period", "10s")) <= int(flags.get("shutdown-timeout", 0)):
        out.append("vllm stop_grace_period must exceed --shutdown-timeout")
    return out


def test_compose_agrees_with_the_guard_and_the_pod() -> None:
    assert compose_problems(load_compose()) == []


def test_images_carry_the_guard_version() -> None:
    spec = pod_spec(one(rendered("base"), "Deployment"))
    assert spec is not None
    images = {
        named(spec["containers"], "guard")["image"],
        load_compose()["services"]["guard"]["image"],
    }
    assert images == {f"vlm-guard:{__version__}"}


def test_compose_uses_the_kubernetes_config_file() -> None:
    volumes = load_compose()["services"]["guard"]["volumes"]
    source = (COMPOSE.parent / volumes[0].split(":")[0]).resolve()
    assert source == ROOT / "deploy" / "kubernetes" / "base" / "guard.yaml"


# --- the checks can fail --------------------------------------------------------------------


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)

    return edit


DOCKERFILE_BREAKAGES: dict[str, tuple[Callable[[str], str], str]] = {
    "health path": (_replace("8080/healthz", "8080/health"), "HEALTHCHECK path /health"),
    "health on readiness": (_replace("8080/healthz", "8080/readyz"), "liveness route"),
    "health port": (_replace("127.0.0.1:8080", "127.0.0.1:8000"), "HEALTHCHECK URL"),
    "exposed port": (_replace("EXPOSE 8080 50051", "EXPOSE 8000"), "EXPOSE [8000]"),
    "root": (_replace("USER 10001:10001", "USER root"), "non-root USER"),
    "unknown flag": (_replace('"--host", "0.0.0.0"', '"--listen", "0.0.0.0"'), "does not parse"),
    "loopback": (_replace('"--host", "0.0.0.0"', '"--host", "127.0.0.1"'), "all interfaces"),
    "compiler": (
        _replace("USER 10001", "RUN apt-get install -y gcc\nUSER 10001"),
        "installs or builds",
    ),
    "one stage": (
        lambda t: re.sub(r"(?s)FROM \$\{PYTHON_IMAGE\} AS builder.*?(?=FROM)", "", t),
        "builder stage",
    ),
}


@pytest.mark.parametrize("name", DOCKERFILE_BREAKAGES)
def test_dockerfile_checks_catch_a_broken_copy(name: str) -> None:
    edit, message = DOCKERFILE_BREAKAGES[name]
    found = dockerfile_problems(edit(DOCKERFILE.read_text(encoding="utf-8")))
    assert any(message in p for p in found), found


def _service(name: str, **changes: Any) -> Callable[[Obj], None]:
    def edit(compose: Obj) -> None:
        for key, value in changes.items():
            if value is None:
                del compose["services"][name][key]
            else:
                compose["services"][name][key] = value

    return edit


def _vllm_flag(flag: str, value: str) -> Callable[[Obj], None]:
    def edit(compose: Obj) -> None:
        command = compose["services"]["vllm"]["command"]
        [i] = [i for i, a in enumerate(command) if a.startswith(f"--{flag}=")]
        command[i] = f"--{flag}={value}"

    return edit


COMPOSE_BREAKAGES: dict[str, tuple[Callable[[Obj], None], str]] = {
    "own network": (_service("guard", network_mode=None), "network_mode: service:vllm"),
    "vLLM everywhere": (_vllm_flag("host", "0.0.0.0"), "127.0.0.1 only"),
    "vLLM port": (_vllm_flag("port", "8001"), "flags differ from the pod's: ['port']"),
    "vLLM published": (_service("vllm", ports=["8000:8000"]), "published ports [8000]"),
    "no GPU": (_service("vllm", deploy=None), "vllm reserves no GPU"),
    "short grace": (_service("guard", stop_grace_period="20s"), "stop_grace_period 20s"),
    "env typo": (
        _service("guard", environment={"VLM_GUARD_PURIFY__DEVISE": "cuda"}),
        "invalid configuration at purify.devise",
    ),
    "unknown flag": (_service("guard", command=["serve", "--cfg", "x.yaml"]), "does not parse"),
    "config not mounted": (_service("guard", volumes=[]), "is not a mounted file"),
    "starts too early": (_service("guard", depends_on=["vllm"]), "once vllm is healthy"),
    "unknown key": (_service("guard", healthcheck_test=True), "unknown keys ['healthcheck_test']"),
}


@pytest.mark.parametrize("name", COMPOSE_BREAKAGES)
def test_compose_checks_catch_a_broken_copy(name: str) -> None:
    compose = copy.deepcopy(load_compose())
    edit, message = COMPOSE_BREAKAGES[name]
    edit(compose)
    found = compose_problems(compose)
    assert any(message in p for p in found), found
