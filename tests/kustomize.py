"""A small, strict Kustomize renderer for deploy/kubernetes/, so its tests need no binary.

It implements exactly what those kustomization files use, the way kustomize v5 does it:
``resources`` (files and directories), ``configMapGenerator`` (``files`` only, with
kustomize's name hash), ``patches`` (``path`` to a strategic-merge patch of a Deployment),
``namespace`` and ``images``. Anything else (a key, a patch directive, a list it does not know
how to merge) raises KustomizeError instead of rendering something kustomize would not.
tests/test_deploy_kubernetes.py compares its output with ``kubectl kustomize`` where that
binary exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches", "images", "configMapGenerator"}
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Strategic merge: lists merged item by item on a key (the Kubernetes schema's patchMergeKey),
# and lists replaced whole. A list in neither set is an error, not a guess.
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name"}
_REPLACED_LISTS = {"tolerations", "command", "args"}


class KustomizeError(Exception):
    pass


def render(directory: Path) -> list[Obj]:
    """Build the kustomization in ``directory`` as ``kubectl kustomize`` would (order aside)."""
    objs, generated = _build(directory.resolve())
    for cm in generated:
        _add_name_hash(cm, objs)
    return objs


def _build(root: Path) -> tuple[list[Obj], list[Obj]]:
    spec = _load_one(root / "kustomization.yaml")
    unknown = set(spec) - _KEYS
    if unknown:
        raise KustomizeError(f"{root}: unsupported kustomization keys {sorted(unknown)}")
    if (spec.get("apiVersion"), spec.get("kind")) != (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    ):
        raise KustomizeError(f"{root}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    objs: list[Obj] = []
    generated: list[Obj] = []
    for entry in spec.get("resources", []):
        path = root / entry
        if path.is_dir():
            sub, sub_generated = _build(path.resolve())
            objs += sub
            generated += sub_generated
        elif path.is_file():
            objs += _load_all(path)
        else:
            raise KustomizeError(f"{root}: resource {entry} does not exist")
    for gen in spec.get("configMapGenerator", []):
        cm = _generate_config_map(root, gen)
        objs.append(cm)
        generated.append(cm)
    ids = [_id(o) for o in objs]
    for dup in {i for i in ids if ids.count(i) > 1}:
        raise KustomizeError(f"{root}: {dup} defined twice")
    for patch in spec.get("patches", []):
        _apply_patch(root, patch, objs, generated)
    if "namespace" in spec:
        for obj in objs:
            obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        _set_image(image, objs)
    return objs, generated


def _load_one(path: Path) -> Obj:
    docs = _load_all(path)
    if len(docs) != 1:
        raise KustomizeError(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


def _load_all(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc:
            raise KustomizeError(f"{path}: every document must be an object with a kind")
        if doc["kind"] not in ("Kustomization",) and not doc.get("metadata", {}).get("name"):
            raise KustomizeError(f"{path}: a {doc['kind']} without metadata.name")
    return docs


def _id(obj: Obj) -> str:
    return f"{obj['apiVersion']}/{obj['kind']}/{obj['metadata']['name']}"


def _generate_config_map(root: Path, gen: Obj) -> Obj:
    if set(gen) - {"name", "files"}:
        raise KustomizeError(f"{root}: unsupported configMapGenerator keys {sorted(set(gen))}")
    data = {}
    for entry in gen["files"]:
        if "=" in entry:
            raise KustomizeError(f"{root}: key=path file entries are not supported ({entry})")
        path = root / entry
        data[path.name] = path.read_text(encoding="utf-8")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": gen["name"]},
        "data": data,
    }


def _apply_patch(root: Path, entry: Obj, objs: list[Obj], generated: list[Obj]) -> None:
    if set(entry) != {"path"}:
        raise KustomizeError(f"{root}: only `patches: - path: FILE` is supported, got {entry}")
    patch = _load_one(root / entry["path"])
    targets = [o for o in objs if _id(o) == _id(patch)]
    if len(targets) != 1:
        raise KustomizeError(f"{root}: patch {entry['path']} matches {len(targets)} resources")
    target = targets[0]
    if target["kind"] != "Deployment" or any(target is g for g in generated):
        raise KustomizeError(f"{root}: strategic merge is supported on Deployments only")
    _merge(target, patch, entry["path"])


def _merge(orig: Obj, patch: Obj, where: str) -> None:
    for key, value in patch.items():
        if key.startswith("$") or value is None:
            raise KustomizeError(f"{where}: patch directive or deletion at {key} not supported")
        old = orig.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            _merge(old, value, f"{where}.{key}")
        elif isinstance(value, list) and key in _MERGE_KEYS:
            orig[key] = _merge_list(old or [], value, _MERGE_KEYS[key], f"{where}.{key}")
        elif isinstance(value, list) and key not in _REPLACED_LISTS:
            raise KustomizeError(f"{where}.{key}: no strategic-merge rule for this list")
        else:
            orig[key] = copy.deepcopy(value)


def _merge_list(orig: list[Obj], patch: list[Obj], key: str, where: str) -> list[Obj]:
    """kustomize's order: the patch's items (merged into their originals), then the rest."""
    by_key = {item[key]: item for item in orig}
    out = []
    for item in patch:
        merged = copy.deepcopy(by_key.get(item[key], {}))
        _merge(merged, item, f"{where}[{item[key]}]")
        out.append(merged)
    patched = {item[key] for item in patch}
    return out + [item for item in orig if item[key] not in patched]


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in _WORKLOADS:
        return obj["spec"]["template"]["spec"]
    return None


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _set_image(entry: Obj, objs: list[Obj]) -> None:
    if set(entry) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"unsupported images keys {sorted(entry)}")
    for obj in objs:
        spec = pod_spec(obj)
        for container in containers(spec) if spec is not None else []:
            name, tag = _split_image(container["image"])
            if name == entry["name"]:
                tag = entry.get("newTag", tag)
                container["image"] = entry.get("newName", name) + (f":{tag}" if tag else "")


def _split_image(image: str) -> tuple[str, str | None]:
    if "@" in image:
        raise KustomizeError(f"image digests are not supported ({image})")
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag, or the colon was a registry's port
        return image, None
    return name, tag


def _add_name_hash(cm: Obj, objs: list[Obj]) -> None:
    """Suffix a generated ConfigMap's name with kustomize's content hash, and every reference."""
    # What kustomize hashes: Go's json.Marshal (sorted keys, HTML-safe escapes) of kind, data
    # and an empty name (kustomize v5 looks the name up where it is not, so it is always "").
    encoded = json.dumps(
        {"data": cm["data"], "kind": "ConfigMap", "name": ""},
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
    )
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    suffix = digest.translate(str.maketrans("013ae", "ghkmt"))
    old = cm["metadata"]["name"]
    new = cm["metadata"]["name"] = f"{old}-{suffix}"
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            if volume.get("configMap", {}).get("name") == old:
                volume["configMap"]["name"] = new
        for container in containers(spec):
            refs = [e.get("valueFrom", {}).get("configMapKeyRef") for e in container.get("env", [])]
            refs += [e.get("configMapRef") for e in container.get("envFrom", [])]
            for ref in refs:
                if ref is not None and ref.get("name") == old:
                    ref["name"] = new
