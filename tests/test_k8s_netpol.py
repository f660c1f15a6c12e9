"""k8s/netpol.py: the NetworkPolicy semantics k8s/validate.py checks the manifests with."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
netpol = sys.modules.get("k8s_netpol")
if netpol is None:
    _spec = importlib.util.spec_from_file_location("k8s_netpol", ROOT / "k8s" / "netpol.py")
    netpol = importlib.util.module_from_spec(_spec)
    sys.modules["k8s_netpol"] = netpol  # dataclasses look their module up there
    _spec.loader.exec_module(netpol)

E = netpol.Endpoint
NS = "team"


def pod(name, labels, namespace=NS):
    return E(name, namespace, labels, {"kubernetes.io/metadata.name": namespace})


def policy(selector, types, ingress=None, egress=None, namespace=NS):
    spec = {"podSelector": selector, "policyTypes": types}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": namespace},
            "spec": spec}


A, B, C = pod("a", {"app": "a"}), pod("b", {"app": "b"}), pod("c", {"app": "c", "tier": "x"})


def test_unselected_pods_are_open_and_selected_ones_closed():
    assert netpol.allowed([], A, B, 80)
    only_b = [policy({"matchLabels": {"app": "b"}}, ["Ingress"])]
    assert not netpol.allowed(only_b, A, B, 80)
    assert netpol.allowed(only_b, B, A, 80)  # a's ingress and b's egress are unrestricted


def test_both_ends_must_agree():
    ingress = policy({"matchLabels": {"app": "b"}}, ["Ingress"],
                     ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}])
    deny_egress = policy({"matchLabels": {"app": "a"}}, ["Egress"])
    assert netpol.allowed([ingress], A, B, 80)
    assert not netpol.allowed([ingress, deny_egress], A, B, 80)
    assert not netpol.allowed([ingress], C, B, 80)


def test_ports_protocols_and_ranges():
    rule = [{"ports": [{"protocol": "TCP", "port": 10002, "endPort": 19999},
                       {"protocol": "UDP", "port": 53}]}]
    pols = [policy({}, ["Ingress"], ingress=rule)]
    assert netpol.allowed(pols, A, B, 10002) and netpol.allowed(pols, A, B, 19999)
    assert not netpol.allowed(pols, A, B, 10001) and not netpol.allowed(pols, A, B, 20000)
    assert netpol.allowed(pols, A, B, 53, "UDP") and not netpol.allowed(pols, A, B, 53)
    named = [policy({}, ["Ingress"], ingress=[{"ports": [{"port": "client"}]}])]
    with pytest.raises(ValueError, match="named port"):
        netpol.allowed(named, A, B, 10001)


def test_namespace_and_pod_selectors_combine():
    other_ns = pod("m", {"app": "prom"}, namespace="monitoring")
    both = [policy({}, ["Ingress"], ingress=[{"from": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app": "prom"}}}]}])]
    assert netpol.allowed(both, other_ns, B, 9090)
    assert not netpol.allowed(both, pod("m2", {"app": "x"}, "monitoring"), B, 9090)
    assert not netpol.allowed(both, pod("p", {"app": "prom"}), B, 9090)  # same ns, not monitoring
    pods_only = [policy({}, ["Ingress"], ingress=[{"from": [{"podSelector": {}}]}])]
    assert netpol.allowed(pods_only, A, B, 1) and not netpol.allowed(pods_only, other_ns, B, 1)


def test_match_expressions_and_ip_blocks():
    sel = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]},
                                {"key": "app", "operator": "NotIn", "values": ["a"]}]}
    assert netpol.selects(sel, C.labels) and not netpol.selects(sel, A.labels)
    assert netpol.selects({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
                          A.labels)
    api = E("api server", ip="10.96.0.1")
    block = [policy({}, ["Egress"], egress=[{"to": [{"ipBlock": {
        "cidr": "10.96.0.0/12", "except": ["10.96.0.0/24"]}}]}])]
    assert not netpol.allowed(block, A, api, 443)
    assert netpol.allowed(block, A, E("other", ip="10.97.0.1"), 443)
    assert not netpol.allowed(block, A, B, 443)  # an ipBlock never matches a pod here


def test_policy_types_default_to_ingress_plus_egress_when_rules_exist():
    assert netpol.policy_types({"spec": {}}) == ["Ingress"]
    assert netpol.policy_types({"spec": {"egress": []}}) == ["Ingress", "Egress"]
