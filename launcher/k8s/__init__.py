"""Kubernetes side of the fleet controller (KubeRay RayCluster on Ascend nodes).

The controller's one-stop entry (None when not running on Kubernetes):

    from launcher.k8s.fleet import FleetK8s
    k8s = FleetK8s.from_env()             # FLEET_K8S_RAYCLUSTER / _NAMESPACE, set on the head pod
    k8s.remember_nodes(ray.nodes())       # each scheduling pass, while nodes are alive
    k8s.why_node_died(node_id, wait_s=5)  # WorkerFailure: OOMKilled, Evicted, NodeNotReady, ...
    k8s.grow(1); k8s.release([node_id])   # patch the worker group's replicas
    k8s.status()                          # JSON for `fleet status`

The modules under it, one job each, usable alone:

    errors       KubeError and the kinds callers tell apart (RBACError, NotFound, ...)
    rbac         the API objects this package calls, and REQUIRED_RBAC granting exactly those
    client       KubeClient: configuration (in-cluster token and CA, or kubeconfig),
                 every call under one error and retry policy (RetryPolicy)
    pods         KubeRay's pod labels; Ray nodes -> pods (map_ray_nodes_to_pods)
    reasons      why a pod died, from its status or an event (classify_pod, classify_event)
    watch        list-then-watch of one collection, resumed from its resourceVersion
    pod_watcher  PodWatcher: pod and event watches -> WorkerFailure records, each once
    scaling      the worker group's replicas: scale, grow, release named idle pods
    fleet        FleetK8s, the facade above
    cli          `python -m launcher.k8s ...`: the controller keeper of the
                 fleet-controller Deployment, its probe, and a diagnostic `watch`

When to grow or release is decided elsewhere (launcher/autoscale.py); this
package makes the calls. Every API call goes through KubeClient.call, which
owns the error policy: 403 -> RBACError naming the verb and resource to grant;
timeouts, dropped connections, 429 and 5xx -> retried with capped exponential
backoff, then KubeUnavailable; 409 on a patch -> re-read and re-apply
(scaling). Watches resume from the last resourceVersion they saw (bookmarks
advance it); 410 Gone -> list again.
"""
