"""What a set of NetworkPolicy objects (networking.k8s.io/v1) lets through.

k8s/validate.py asks it whether one endpoint may open a connection to a port of
another, the way the API documents it: a pod selected by no policy of a
direction is open in that direction; a selected pod accepts only what some rule
of a policy that selects it allows; a connection needs the source's egress and
the destination's ingress to agree. Ports are numbers (a named port is refused:
resolving it needs the destination's containers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace set) or an address that is no pod."""

    name: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ip: str | None = None


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector against labels ({} or absent selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        ok = {"In": present and labels.get(key) in values,
              "NotIn": not present or labels.get(key) not in values,
              "Exists": present, "DoesNotExist": not present}.get(op)
        if ok is None:
            raise ValueError(f"unknown selector operator {op!r}")
        if not ok:
            return False
    return True


def policy_types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy.get("spec", {})
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, ep: Endpoint) -> bool:
    if "ipBlock" in peer:
        if ep.ip is None:
            return False
        addr = ipaddress.ip_address(ep.ip)
        block = peer["ipBlock"]
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(e) for e in block.get("except") or [])
    if ep.namespace is None:
        return False
    ns_selector = peer.get("namespaceSelector")
    in_namespace = (ep.namespace == policy_namespace if ns_selector is None
                    else selects(ns_selector, ep.namespace_labels))
    pod_selector = peer.get("podSelector")
    return in_namespace and (pod_selector is None or selects(pod_selector, ep.labels))


def _ports_match(ports: Iterable[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    ports = list(ports or [])
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        number = p.get("port")
        if number is None:
            return True
        if not isinstance(number, int):
            raise ValueError(f"named port {number!r}: write the port number")
        if number <= port <= p.get("endPort", number):
            return True
    return False


def _admits(policies: Iterable[Mapping[str, Any]], ep: Endpoint, direction: str,
            other: Endpoint, port: int, protocol: str) -> bool:
    if ep.namespace is None:  # not a pod: no policy applies to it
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applying = [p for p in policies
                if p.get("metadata", {}).get("namespace") == ep.namespace
                and selects(p.get("spec", {}).get("podSelector"), ep.labels)
                and direction in policy_types(p)]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, ep.namespace, other) for peer in peers)) \
                    and _ports_match(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(policies: Iterable[Mapping[str, Any]], src: Endpoint, dst: Endpoint, port: int,
            protocol: str = "TCP") -> bool:
    """Whether src may open a connection to dst:port."""
    policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]
    return (_admits(policies, src, "Egress", dst, port, protocol)
            and _admits(policies, dst, "Ingress", src, port, protocol))
