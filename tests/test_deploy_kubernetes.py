"""deploy/kubernetes: every build renders, passes Kubernetes' own schemas, and agrees with the
guard's code (config keys, ports, routes, command-line flags, shutdown timing).

The checks that tie manifests to code live in ``problems()``, which returns what is wrong
instead of asserting, so that the negative tests can show each check failing on a broken copy.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, cast
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as kv

from guard.cli import _parser, _serve_overrides
from guard.config import ConfigError, GuardConfig, load_config
from guard.transport.http import create_app
from tests.kustomize import KustomizeError, Obj, containers, pod_spec, render

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
BUILDS = ("base", "overlays/gpu", "overlays/monitor-mode")
# The oldest release the manifests claim (native sidecars are on by default from 1.29), and
# the newest whose schemas the pinned kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kv.major_minor(kv.latest_version()))
CRD_GROUP = "monitoring.coreos.com/"
# guard/server.py drains HTTP and gRPC together, for up to server.drain_seconds in all
# (tests/test_shutdown.py).
DRAIN_PHASES = 1
SAMPLE_API_KEYS = '["test-key"]'


@cache
def _rendered(build: str) -> tuple[Obj, ...]:
    return tuple(render(K8S / build))


def rendered(build: str) -> list[Obj]:
    """A fresh copy of a build, for tests to read or break."""
    return copy.deepcopy(list(_rendered(build)))


def one(objs: list[Obj], kind: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def named(items: list[Obj], name: str) -> Obj:
    return next(i for i in items if i["name"] == name)


def long_flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a mapping (the manifests spell vLLM's flags that way)."""
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--"))


@cache
def guard_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route the guard's HTTP app serves."""
    # create_app only wires routes; the service is used when a request arrives.
    app = cast(Any, create_app(GuardConfig(), cast(Any, None))).app
    return frozenset((m, r.path) for r in app.routes for m in getattr(r, "methods", ()))


def parse_serve(argv: list[str]) -> Any:
    """Parse ``argv`` (after the program name) with guard/cli.py's parser; None if it fails."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args, extra = _parser().parse_known_args(argv)
        except SystemExit:
            return None
    return None if extra or args.command != "serve" else args


def container_env(container: Obj) -> dict[str, str]:
    """The environment the kubelet would give ``container``; Secret values are samples."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"]["secretKeyRef"]["key"] == "api_keys":
            env[var["name"]] = SAMPLE_API_KEYS
        else:
            raise AssertionError(f"no sample for {var}")
    return env


def load_guard_config(
    text: str, env: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> GuardConfig:
    """``load_config`` as `vlm-guard serve` runs it, seeing only ``env``'s VLM_GUARD_* vars."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ):
        for name in [n for n in os.environ if n.startswith("VLM_GUARD_")]:
            del os.environ[name]
        os.environ.update({k: v for k, v in env.items() if k.startswith("VLM_GUARD_")})
        path = Path(tmp) / "guard.yaml"
        path.write_text(text, encoding="utf-8")
        return load_config(path, overrides)


def guard_config(objs: list[Obj]) -> GuardConfig:
    """The configuration the guard container of a build starts with (raises ConfigError)."""
    spec = pod_spec(one(objs, "Deployment"))
    assert spec is not None
    guard = named(spec["containers"], "guard")
    args = parse_serve(guard["command"][1:])
    assert args is not None, "the guard's command does not parse"
    text = config_text(objs, spec, guard, PurePosixPath(args.config))
    return load_guard_config(text, container_env(guard), _serve_overrides(args))


def config_text(objs: list[Obj], spec: Obj, container: Obj, path: PurePosixPath) -> str:
    """The file at ``path`` in ``container``, looked up through its mounts and config maps."""
    mount = next(
        m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent
    )
    volume = named(spec["volumes"], mount["name"])
    maps = [o for o in objs if o["kind"] == "ConfigMap"]
    cm = next(o for o in maps if o["metadata"]["name"] == volume["configMap"]["name"])
    return str(cm["data"][path.name])


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def problems(objs: list[Obj]) -> list[str]:
    """What in a rendered build disagrees with the guard's code or with itself ([] = nothing)."""
    out: list[str] = []
    deployment = one(objs, "Deployment")
    spec = pod_spec(deployment)
    assert spec is not None
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    guard = named(spec["containers"], "guard")
    vllm = named(spec.get("initContainers", []), "vllm")

    # The command must be `vlm-guard serve` with flags guard/cli.py knows.
    args = parse_serve(guard["command"][1:])
    if guard["command"][0] != "vlm-guard" or args is None:
        return [f"guard command {guard['command']} does not parse with guard/cli.py"]
    try:
        cfg = guard_config(objs)
    except ConfigError as e:
        return [f"guard config: {e}"]

    # Ports: the container declares what the configuration listens on, on all interfaces.
    guard_ports = {p["name"]: p["containerPort"] for p in guard.get("ports", [])}
    wanted = {"http": cfg.server.http_port, "grpc": cfg.server.grpc_port}
    if guard_ports != wanted:
        out.append(f"guard container ports {guard_ports} != configured {wanted}")
    if cfg.server.host not in ("0.0.0.0", "::"):
        out.append(f"guard listens on {cfg.server.host}: the Service cannot reach it")

    # Probes: HTTP paths are real GET routes, gRPC goes to the configured gRPC port.
    routes = guard_routes()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = guard.get(kind)
        if probe is None:
            out.append(f"guard has no {kind}")
        elif "httpGet" in probe:
            path, port = probe["httpGet"]["path"], probe["httpGet"]["port"]
            if ("GET", path) not in routes:
                out.append(f"guard {kind} path {path} is not a GET route of the guard")
            if port not in guard_ports and port not in guard_ports.values():
                out.append(f"guard {kind} port {port} is not a guard port")
        elif "grpc" in probe:
            if cfg.server.grpc_port is None or probe["grpc"]["port"] != cfg.server.grpc_port:
                out.append(f"guard {kind} gRPC port {probe['grpc']['port']} is not the gRPC port")
        else:
            out.append(f"guard {kind} is neither httpGet nor grpc")
    readiness = guard.get("readinessProbe", {})
    if readiness.get("httpGet", {}).get("path") != "/readyz":
        out.append("guard readinessProbe must be /readyz (upstream ready, not draining)")
    elif readiness.get("timeoutSeconds", 1) <= cfg.upstream.ready_timeout_s:
        out.append("guard readinessProbe timeoutSeconds must exceed upstream.ready_timeout_s")
    if guard.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/readyz":
        out.append("guard livenessProbe on /readyz would restart the guard when vLLM is down")

    # vLLM: a native sidecar on loopback, at the port the guard forwards to.
    flags = long_flags(vllm.get("args", []))
    if vllm.get("restartPolicy") != "Always":
        out.append("vLLM must be a native sidecar (restartPolicy: Always) to outlive the guard")
    if flags.get("host") != "127.0.0.1" or vllm.get("ports"):
        out.append("vLLM must listen on 127.0.0.1 only and declare no ports")
    upstream = urlsplit(str(cfg.upstream.url))
    if upstream.hostname != "127.0.0.1" or str(upstream.port) != flags.get("port"):
        out.append(f"upstream.url {cfg.upstream.url} is not vLLM's 127.0.0.1:{flags.get('port')}")
    reasoner = urlsplit(str(cfg.reasoner.url))
    if "reasoner" in cfg.pipeline.defenses and reasoner.netloc == upstream.netloc:
        served = flags.get("served-model-name", "").split(",")
        if cfg.reasoner.model not in served:
            out.append(f"reasoner.model {cfg.reasoner.model} is not served by vLLM ({served})")

    # Shutdown: preStop sleep, then the guard drains, then (sidecar) vLLM shuts down.
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = guard.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    drain = cfg.server.drain_seconds
    vllm_stop = int(flags.get("shutdown-timeout", 0))
    if grace < sleep + DRAIN_PHASES * drain + vllm_stop:
        out.append(
            f"terminationGracePeriodSeconds {grace} < preStop {sleep} + "
            f"{DRAIN_PHASES} x drain_seconds {drain} + vLLM --shutdown-timeout {vllm_stop}"
        )
    if spec.get("enableServiceLinks", True):
        out.append("enableServiceLinks must be false: service variables break the guard's config")

    # Only the guard's ports are reachable from outside the pod.
    guard_port_refs = {*guard_ports, *guard_ports.values()}
    for svc in (o for o in objs if o["kind"] == "Service"):
        if not _selects(svc["spec"]["selector"], pod_labels):
            out.append(f"Service {svc['metadata']['name']} does not select the pod")
        for port in svc["spec"]["ports"]:
            if port.get("targetPort", port["port"]) not in guard_port_refs:
                out.append(f"Service port {port['name']} targets {port.get('targetPort')}")
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        if not _selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels):
            out.append("NetworkPolicy does not select the pod")
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if not ports or not ports <= guard_port_refs:
                out.append(f"NetworkPolicy admits more than the guard's ports: {rule}")
    pdb = one(objs, "PodDisruptionBudget")
    if not _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        out.append("PodDisruptionBudget does not select the pod")
    for monitor in (o for o in objs if o["kind"] == "ServiceMonitor"):
        services = [
            s
            for s in objs
            if s["kind"] == "Service"
            and _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        names = {p["name"] for s in services for p in s["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in names:
                out.append(f"ServiceMonitor port {endpoint['port']} is no selected Service's")
            if ("GET", endpoint.get("path", "/metrics")) not in routes:
                out.append(f"ServiceMonitor path {endpoint.get('path')} is not a guard route")

    # Hardening: non-root, no privilege escalation, read-only root, no capabilities.
    pod_security = spec.get("securityContext", {})
    if not pod_security.get("runAsNonRoot") or pod_security.get("runAsUser", 0) == 0:
        out.append("the pod must run as a non-root user")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        out.append("the pod must use the RuntimeDefault seccomp profile")
    if spec.get("automountServiceAccountToken", True):
        out.append("no container needs a service account token")
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers(spec):
        sc = c.get("securityContext", {})
        hardened = (
            sc.get("allowPrivilegeEscalation") is False
            and sc.get("readOnlyRootFilesystem") is True
            and sc.get("capabilities", {}).get("drop") == ["ALL"]
            and sc.get("runAsUser", 1) != 0
        )
        if not hardened:
            out.append(f"container {c['name']} is not hardened: {sc}")
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volumes:
                out.append(f"container {c['name']} mounts undeclared volume {mount['name']}")
        tag = c["image"].rpartition(":")[2]
        if ":" not in c["image"] or tag == "latest":
            out.append(f"container {c['name']} image {c['image']} is not pinned")
    return out


# --- every build renders and validates ----------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_build_validates_strictly(build: str, version: str) -> None:
    objs = rendered(build)
    assert {o["kind"] for o in objs} >= {"Deployment", "Service", "ConfigMap", "NetworkPolicy"}
    for obj in objs:
        if obj["apiVersion"].startswith(CRD_GROUP):
            continue  # not in Kubernetes' schemas: test_monitoring_objects checks them
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{build}: {obj['kind']} {obj['metadata']['name']}: {where}: {e.message}")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
@pytest.mark.parametrize("build", BUILDS)
def test_renderer_matches_kubectl_kustomize(build: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / build)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    def key(o: Obj) -> tuple[str, str, str]:
        return o["apiVersion"], o["kind"], o["metadata"]["name"]

    real = {key(o): o for o in yaml.safe_load_all(result.stdout) if o}
    assert {key(o): o for o in rendered(build)} == real


@pytest.mark.parametrize("build", BUILDS)
def test_build_agrees_with_the_guard(build: str) -> None:
    assert problems(rendered(build)) == []


def test_overlays_do_what_they_say() -> None:
    base, gpu, monitor = (guard_config(rendered(b)) for b in BUILDS)
    assert (base.purify.device, base.backdoor.device) == ("cpu", "cpu")
    assert (gpu.purify.device, gpu.backdoor.device) == ("cuda", "cuda")
    assert (base.pipeline.mode, gpu.pipeline.mode, monitor.pipeline.mode) == (
        "enforce",
        "enforce",
        "monitor",
    )
    # Environment overrides leave the rest of guard.yaml alone.
    assert gpu.purify.diffusion == base.purify.diffusion == "/models/purify/ddpm"
    assert [k.get_secret_value() for k in gpu.server.api_keys] == ["test-key"]
    for build in BUILDS[1:]:
        objs = rendered(build)
        assert {o["metadata"].get("namespace") for o in objs} == {"vlm-guard"}
        spec = pod_spec(one(objs, "Deployment"))
        assert spec is not None
        for c in containers(spec):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, c["name"]
        assert named(spec["containers"], "guard")["image"].startswith("registry.example.com/")


def test_service_links_would_stop_the_guard() -> None:
    """Why enableServiceLinks is false: the kubelet's variables for a Service named vlm-guard
    look like misspelt guard settings, and the guard refuses to start on those."""
    objs = rendered("overlays/gpu")
    spec = pod_spec(one(objs, "Deployment"))
    assert spec is not None
    svc = one(objs, "Service")
    prefix = svc["metadata"]["name"].upper().replace("-", "_")
    links = {f"{prefix}_SERVICE_HOST": "10.0.0.1", f"{prefix}_PORT": "tcp://10.0.0.1:8080"}
    guard = named(spec["containers"], "guard")
    text = config_text(objs, spec, guard, PurePosixPath("/etc/vlm-guard/guard.yaml"))
    with pytest.raises(ConfigError, match="unknown environment variable VLM_GUARD_"):
        load_guard_config(text, {**container_env(guard), **links})


# --- prometheus-operator objects (not in Kubernetes' schemas) -----------------------------


@pytest.mark.parametrize("build", BUILDS[1:])
def test_monitoring_objects(build: str) -> None:
    objs = rendered(build)
    monitor, rule = one(objs, "ServiceMonitor"), one(objs, "PrometheusRule")
    for obj in (monitor, rule):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "vlm-guard"
    # The CRD requires selector and endpoints; problems() checks they point at the guard.
    assert monitor["spec"]["selector"]["matchLabels"]
    assert all(e["port"] for e in monitor["spec"]["endpoints"])
    groups = rule["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert group["rules"], group["name"]
        for r in group["rules"]:
            assert r["expr"] and (("alert" in r) != ("record" in r)), r


@pytest.mark.skipif(not ALERTS.exists(), reason="deploy/prometheus/alerts.yaml not written yet")
def test_prometheus_rule_holds_the_alerts_file() -> None:
    rule = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text(encoding="utf-8"))
    alerts = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == alerts["groups"], (
        "run: python deploy/kubernetes/monitoring/sync_alerts.py"
    )


# --- the checks can fail ------------------------------------------------------------------


def _guard(objs: list[Obj]) -> Obj:
    return named(one(objs, "Deployment")["spec"]["template"]["spec"]["containers"], "guard")


def _vllm(objs: list[Obj]) -> Obj:
    return named(one(objs, "Deployment")["spec"]["template"]["spec"]["initContainers"], "vllm")


def _set_vllm_flag(objs: list[Obj], flag: str, value: str) -> None:
    args = _vllm(objs)["args"]
    args[:] = [a for a in args if not a.startswith(f"--{flag}=")] + [f"--{flag}={value}"]


def _edit_config(objs: list[Obj], old: str, new: str) -> None:
    data = one(objs, "ConfigMap")["data"]
    assert old in data["guard.yaml"]
    data["guard.yaml"] = data["guard.yaml"].replace(old, new)


BREAKAGES: dict[str, tuple[Callable[[list[Obj]], None], str]] = {
    "readiness path": (
        lambda o: _guard(o)["readinessProbe"]["httpGet"].update(path="/ready"),
        "path /ready is not a GET route",
    ),
    "startup path": (
        lambda o: _guard(o)["startupProbe"]["httpGet"].update(path="/v1/completions"),
        "path /v1/completions is not a GET route",
    ),
    "liveness on readiness": (
        lambda o: _guard(o).update(livenessProbe={"httpGet": {"path": "/readyz", "port": "http"}}),
        "would restart the guard",
    ),
    "grpc probe port": (
        lambda o: _guard(o)["livenessProbe"]["grpc"].update(port=50052),
        "gRPC port 50052 is not the gRPC port",
    ),
    "container port": (
        lambda o: _guard(o)["ports"][0].update(containerPort=9090),
        "guard container ports",
    ),
    "config key typo": (
        lambda o: _edit_config(o, "drain_seconds:", "drain_second:"),
        "guard config: invalid configuration at server.drain_second",
    ),
    "env override typo": (
        lambda o: _guard(o)["env"].append({"name": "VLM_GUARD_PURIFY__DEVISE", "value": "cuda"}),
        "guard config: invalid configuration at purify.devise",
    ),
    "unknown CLI flag": (
        lambda o: _guard(o)["command"].append("--drain-seconds=30"),
        "does not parse with guard/cli.py",
    ),
    "vLLM on all interfaces": (
        lambda o: _set_vllm_flag(o, "host", "0.0.0.0"),
        "must listen on 127.0.0.1 only",
    ),
    "vLLM port": (
        lambda o: _set_vllm_flag(o, "port", "8001"),
        "is not vLLM's 127.0.0.1:8001",
    ),
    "vLLM as a regular container": (
        lambda o: _vllm(o).pop("restartPolicy"),
        "native sidecar",
    ),
    "grace period": (
        lambda o: one(o, "Deployment")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=45
        ),
        "terminationGracePeriodSeconds 45 < preStop 10 + 1 x drain_seconds 30.0",
    ),
    "service links": (
        lambda o: one(o, "Deployment")["spec"]["template"]["spec"].pop("enableServiceLinks"),
        "enableServiceLinks must be false",
    ),
    "service exposes vLLM": (
        lambda o: one(o, "Service")["spec"]["ports"].append(
            {"name": "vllm", "port": 8000, "targetPort": 8000}
        ),
        "Service port vllm targets 8000",
    ),
    "network policy wide open": (
        lambda o: one(o, "NetworkPolicy")["spec"]["ingress"][0].pop("ports"),
        "NetworkPolicy admits more than the guard's ports",
    ),
    "scrape path": (
        lambda o: one(o, "ServiceMonitor")["spec"]["endpoints"][0].update(path="/metric"),
        "ServiceMonitor path /metric is not a guard route",
    ),
    "writable root": (
        lambda o: _vllm(o)["securityContext"].update(readOnlyRootFilesystem=False),
        "container vllm is not hardened",
    ),
    "reasoner model": (
        lambda o: _edit_config(o, "model: llava-1.5-7b", "model: llava-7b"),
        "reasoner.model llava-7b is not served by vLLM",
    ),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_checks_catch_a_broken_copy(name: str) -> None:
    objs = rendered("overlays/gpu")
    breakage, message = BREAKAGES[name]
    breakage(objs)
    found = problems(objs)
    assert any(message in p for p in found), found


def test_validator_catches_a_misspelt_field() -> None:
    deployment = one(rendered("overlays/gpu"), "Deployment")
    _vllm([deployment])["livenesProbe"] = _vllm([deployment]).pop("livenessProbe")
    with pytest.raises(kv.ValidationError, match="'livenesProbe' was unexpected"):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = one(rendered("overlays/gpu"), "Deployment")
    _guard([deployment])["livenessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take numbers
    with pytest.raises(kv.ValidationError, match="is not of type 'integer'"):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)


def _kustomization(root: Path, body: str, patch: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{K8S / 'base'}]\n{body}",
        encoding="utf-8",
    )
    if patch is not None:
        (root / "patch.yaml").write_text(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: vlm-guard}\n" + patch,
            encoding="utf-8",
        )
    return root


@pytest.mark.parametrize(
    "body,patch,message",
    [
        ("commonLabels: {team: ml}\n", None, "unsupported kustomization keys ['commonLabels']"),
        ("patches: [{path: patch.yaml}]\n", "$patch: delete\n", "patch directive"),
        (
            "patches: [{path: patch.yaml}]\n",
            "spec: {template: {spec: {volumes: [{name: x, emptyDir: {}}]}}}\n",
            "no strategic-merge rule for this list",
        ),
        (
            "patches: [{path: patch.yaml, target: {kind: Deployment}}]\n",
            "spec: {}\n",
            "only `patches: - path: FILE`",
        ),
        ("images: [{name: vlm-guard, digest: 'sha256:00'}]\n", None, "unsupported images keys"),
    ],
)
def test_renderer_refuses_what_it_does_not_implement(
    tmp_path: Path, body: str, patch: str | None, message: str
) -> None:
    with pytest.raises(KustomizeError) as raised:
        render(_kustomization(tmp_path / "overlay", body, patch))
    assert message in str(raised.value)
