"""Pure parts of launcher/k8s/: failure reasons from pod status and events,
Ray node -> pod mapping, the keeper loop and its probe."""

from __future__ import annotations

import os
import sys
import time

import pytest
from k8s_fake import objects as o

from launcher.k8s import cli as k8s_cli
from launcher.k8s.client import KubeClient
from launcher.k8s.pods import map_ray_nodes_to_pods
from launcher.k8s.reasons import FailureReason as R
from launcher.k8s.reasons import classify_event, classify_pod


@pytest.mark.parametrize(("pod", "reason", "exit_code"), [
    (o.oom_killed("w"), R.OOM_KILLED, 137),
    (o.evicted("w"), R.EVICTED, None),
    (o.node_lost("w"), R.NODE_NOT_READY, None),
    (o.device_unhealthy("w"), R.DEVICE_UNHEALTHY, 86),
    (o.admission_device_error("w"), R.DEVICE_UNHEALTHY, None),
    (o.image_pull("w"), R.IMAGE_PULL, None),
    (o.crash_loop("w"), R.CRASH_LOOP, 1),
])
def test_pod_status_gives_the_reason(pod, reason, exit_code):
    failure = classify_pod(pod)
    assert failure is not None
    assert (failure.reason, failure.exit_code, failure.pod) == (reason, exit_code, "w")
    assert failure.message


def test_messages_say_what_happened():
    assert "low on resource: memory" in classify_pod(o.evicted("w")).message
    assert "not-ready" in classify_pod(o.node_lost("w")).message
    assert "chip 3" in classify_pod(o.device_unhealthy("w")).message
    assert "huawei.com/Ascend910" in classify_pod(o.admission_device_error("w")).message
    assert "0.1.0-typo" in classify_pod(o.image_pull("w")).message
    assert "invalid resources" in classify_pod(o.crash_loop("w")).message


def test_device_fault_wins_over_the_exit_it_caused():
    pod = o.device_unhealthy("w")
    pod["status"]["containerStatuses"][0]["lastState"] = {
        "terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    assert classify_pod(pod).reason == R.DEVICE_UNHEALTHY


@pytest.mark.parametrize("pod", [
    o.pod("w"),
    o.pod("w", phase="Pending", ready=False, container={"state": {"waiting": {
        "reason": "ContainerCreating"}}}),
    o.pod("w", phase="Succeeded", ready=False, container={"state": {"terminated": {
        "exitCode": 0, "reason": "Completed"}}}),
])
def test_healthy_or_starting_pods_are_no_failure(pod):
    assert classify_pod(pod) is None


@pytest.mark.parametrize(("event", "reason"), [
    (o.event("e", "w", "Evicted", "The node was low on resource: ephemeral-storage."),
     R.EVICTED),
    (o.event("e", "w", "NodeNotReady", "Node is not ready"), R.NODE_NOT_READY),
    (o.event("e", "w", "TaintManagerEviction", "Marking for deletion Pod ascend-fleet/w"),
     R.NODE_NOT_READY),
    (o.event("e", "w", "Failed", 'Failed to pull image "ascend-fleet:bad": not found',
             host="atlas-02"), R.IMAGE_PULL),
    (o.event("e", "w", "BackOff", 'Back-off pulling image "ascend-fleet:bad"'), R.IMAGE_PULL),
    (o.event("e", "w", "FailedScheduling",
             "0/4 nodes are available: 4 Insufficient huawei.com/Ascend910."), R.UNSCHEDULABLE),
    (o.event("e", "w", "DeviceFault", "Ascend910-3 is unhealthy: HBM ECC error"),
     R.DEVICE_UNHEALTHY),
])
def test_pod_events_give_the_reason(event, reason):
    failure = classify_event(event)
    assert failure is not None and (failure.pod, failure.reason) == ("w", reason)
    assert failure.source == "event"


@pytest.mark.parametrize("event", [
    o.event("e", "w", "Pulled", "Successfully pulled image", type_="Normal"),
    o.event("e", "w", "BackOff", "Back-off restarting failed container"),  # the pod says why
    o.event("e", "atlas-01", "NodeNotReady", "Node is not ready", kind="Node"),
])
def test_other_events_are_no_failure(event):
    assert classify_event(event) is None


def _ray_node(node_id, ip, host, alive=True):
    # The keys ray.nodes() returns that the mapping uses.
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip,
            "NodeManagerHostname": host, "Resources": {"NPU": 8.0, "CPU": 160.0}}


def test_ray_nodes_map_to_pods_by_ip_then_name():
    pods = [o.pod("fleet-ray-head-x", group=None, ip="10.42.0.2", node="cpu-01"),
            o.pod("fleet-ray-npu-worker-a", ip="10.42.0.11", node="atlas-01"),
            o.pod("fleet-ray-npu-worker-b", ip="10.42.0.12", node="atlas-02"),
            o.pod("fleet-ray-npu-worker-new", ip="10.42.0.13", node="atlas-03")]
    nodes = [_ray_node("head", "10.42.0.2", "fleet-ray-head-x"),
             _ray_node("n-a", "10.42.0.11", "fleet-ray-npu-worker-a"),
             # Hostname truncated or odd: the IP still finds the pod.
             _ray_node("n-b", "10.42.0.12", "localhost"),
             # A dead node whose IP now belongs to a new pod: matched by name only.
             _ray_node("n-dead", "10.42.0.13", "fleet-ray-npu-worker-gone", alive=False),
             _ray_node("n-laptop", "192.0.2.7", "laptop")]
    m = map_ray_nodes_to_pods(nodes, pods)
    assert {k: v.name for k, v in m.by_node_id.items()} == {
        "head": "fleet-ray-head-x", "n-a": "fleet-ray-npu-worker-a",
        "n-b": "fleet-ray-npu-worker-b"}
    assert m.by_node_id["n-b"].node_name == "atlas-02" and m.by_node_id["n-b"].group == "npu"
    assert m.unmatched_nodes == ["n-dead", "n-laptop"]
    assert m.pods_without_node == ["fleet-ray-npu-worker-new"]


def test_keeper_runs_the_ensure_command_and_touches_its_alive_file(tmp_path):
    alive = tmp_path / "alive"
    marker = tmp_path / "runs"
    argv = [sys.executable, "-c",
            f"open({str(marker)!r}, 'a').write('x')"]
    assert k8s_cli.keep_controller("ray://unused:10001", 0.01, alive, max_loops=2,
                                   ensure_argv=argv) == 0
    assert marker.read_text() == "xx"
    assert k8s_cli.probe(alive, max_age_s=60) == 0
    old = time.time() - 600
    os.utime(alive, (old, old))
    assert k8s_cli.probe(alive, max_age_s=60) == 1
    assert k8s_cli.probe(tmp_path / "missing", max_age_s=60) == 1


def test_keeper_reports_a_failing_ensure_command(tmp_path):
    alive = tmp_path / "alive"
    rc = k8s_cli.keep_controller("x", 0.01, alive, max_loops=1,
                                 ensure_argv=[sys.executable, "-c", "raise SystemExit(3)"])
    assert rc == 1 and '"failures": 1' in alive.read_text()
    # The loop is alive even while the head is not reachable: the probe passes.
    assert k8s_cli.probe(alive, max_age_s=60) == 0


def test_keeper_stops_on_a_corrupt_store(tmp_path):
    """No retry can read a corrupt fleet.db: the keeper stops with the store's exit code
    instead of looping, so the pod's restarts show it."""
    alive = tmp_path / "alive"
    marker = tmp_path / "runs"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(5)"]
    rc = k8s_cli.keep_controller("x", 0.01, alive, max_loops=5, ensure_argv=argv)
    assert rc == 5 and marker.read_text() == "x"
    assert '"ok": false' in alive.read_text()


def test_every_call_path_is_checked_against_required_rbac(monkeypatch):
    kube = KubeClient.for_url("http://127.0.0.1:9", "ns")
    with pytest.raises(AssertionError, match="delete pods is not in"):
        kube.call("delete", "pods", lambda **_: None)


def test_keeper_command_is_one_the_fleet_cli_accepts(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from launcher import cli

    seen: list[list[str]] = []

    def fake_run(argv, **kwargs):
        seen.append(argv)
        return k8s_cli.subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(k8s_cli.subprocess, "run", fake_run)
    k8s_cli.main(["keep-controller", "--ray-address=ray://fleet-ray-head-svc:10001",
                  "--home=/var/lib/fleet", f"--alive-file={tmp_path / 'alive'}", "--max-loops=1"])
    (argv,) = seen
    assert argv == ["fleet", "--address", "ray://fleet-ray-head-svc:10001",
                    "--home", "/var/lib/fleet", "up"]
    # The same words, parsed by the real CLI (--help stops before any connection).
    result = CliRunner().invoke(cli.cli, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "or check --address" in result.output
