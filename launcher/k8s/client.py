"""KubeClient: the kubernetes client's APIs under this project's error and retry policy.

Configuration comes from the pod's service account (token and CA) or a
kubeconfig. Every call goes through KubeClient.call: 403 -> RBACError naming
the verb and resource to grant; timeouts, dropped connections, 429 and 5xx ->
retried with capped, jittered exponential backoff, then KubeUnavailable.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.k8s.errors import Conflict, KubeError, KubeUnavailable, NotFound, RBACError
from launcher.k8s.pods import pod_selector
from launcher.k8s.rbac import RAY_GROUP, RAY_PLURAL, RAY_VERSION, is_granted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # (connect, read) seconds for one request; a watch adds its own duration.
    request_timeout: tuple[float, float] = (5.0, 30.0)

    def delay(self, attempt: int) -> float:
        # Full jitter: many controllers restarting together must not retry in step.
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))  # noqa: S311


_RETRY_STATUSES = {429, 500, 502, 503, 504}


def _status_message(body: str | bytes | None) -> str:
    """The message of a metav1.Status body, else the body itself (shortened)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        status = json.loads(body or "")
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    except ValueError:
        pass
    return (body or "").strip()[:300]


def transient_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a request that a retry may cure (timeouts, dropped connections)."""
    import urllib3.exceptions

    return (
        urllib3.exceptions.TimeoutError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.MaxRetryError,
        ConnectionError,
        TimeoutError,
    )


class KubeClient:
    """The kubernetes client's APIs plus this project's error and retry policy."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @classmethod
    def from_environment(
        cls,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> KubeClient:
        """In-cluster config when running in a pod, else ~/.kube/config (or KUBECONFIG)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            namespace = namespace or os.environ.get("FLEET_K8S_NAMESPACE") or (
                ns_file.read_text().strip() if ns_file.is_file() else None)
        else:
            # The client reads KUBECONFIG once, when it is imported: read it now.
            kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
            try:
                config.load_kube_config(config_file=kubeconfig, context=context,
                                        client_configuration=configuration)
            except (config.ConfigException, OSError) as exc:
                raise KubeError(
                    f"no Kubernetes configuration: not in a pod and kubeconfig "
                    f"{kubeconfig or os.environ.get('KUBECONFIG', '~/.kube/config')} "
                    f"could not be loaded ({exc}); pass --kubeconfig or set KUBECONFIG"
                ) from exc
            if namespace is None:
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                namespace = (active or {}).get("context", {}).get("namespace")
        return cls.for_configuration(configuration, namespace or "ascend-fleet", retry)

    @classmethod
    def for_configuration(cls, configuration: Any, namespace: str,
                          retry: RetryPolicy | None = None) -> KubeClient:
        from kubernetes import client

        # This module retries by its own policy; urllib3's silent retries would
        # multiply the delays and hide which call was slow.
        configuration.retries = False
        return cls(client.ApiClient(configuration), namespace, retry)

    @classmethod
    def for_url(cls, url: str, namespace: str, retry: RetryPolicy | None = None) -> KubeClient:
        """A client for a plain-HTTP API endpoint (tests' fake server, kubectl proxy)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = url
        return cls.for_configuration(configuration, namespace, retry)

    def call(self, verb: str, resource: str, fn: Callable[..., Any], *args: Any,
             group: str = "", stream: bool = False, **kwargs: Any) -> Any:
        """Run one API call under the retry policy.

        Returns the decoded JSON body, or with stream=True the open urllib3
        response (a watch); the caller then releases it."""
        from kubernetes.client.exceptions import ApiException

        if not is_granted(verb, resource, group):
            # A call outside REQUIRED_RBAC would fail on a real cluster with 403.
            raise AssertionError(f"{verb} {resource} is not in launcher.k8s.rbac.REQUIRED_RBAC")
        kwargs.setdefault("_request_timeout", self.retry.request_timeout)
        transient = transient_errors()
        last: str = ""
        for attempt in range(self.retry.attempts):
            try:
                resp = fn(*args, _preload_content=False, **kwargs)
                if stream:
                    return resp
                try:
                    # Read inside the loop: a body that stalls is a timeout like any other.
                    return json.loads(resp.data)
                finally:
                    resp.release_conn()
            except ApiException as exc:
                detail = _status_message(exc.body) or str(exc.reason)
                if exc.status == 403:
                    raise RBACError(verb, resource, group, self.namespace, detail) from exc
                if exc.status == 404:
                    raise NotFound(f"{resource} not found: {detail}", 404) from exc
                if exc.status == 409:
                    raise Conflict(detail, 409) from exc
                if exc.status not in _RETRY_STATUSES:
                    raise KubeError(f"{verb} {resource}: HTTP {exc.status}: {detail}",
                                    exc.status) from exc
                last = f"HTTP {exc.status}: {detail}"
            except transient as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.retry.attempts:
                delay = self.retry.delay(attempt)
                log.warning("%s %s failed (%s); retry %d/%d in %.1fs", verb, resource, last,
                            attempt + 1, self.retry.attempts - 1, delay)
                self.sleep(delay)
        raise KubeUnavailable(
            f"{verb} {resource} in namespace {self.namespace} failed "
            f"{self.retry.attempts} times; last error: {last}")

    # -- the calls REQUIRED_RBAC lists

    def list_cluster_pods(self, cluster: str, group: str | None = None) -> list[dict[str, Any]]:
        return self.list_pods(pod_selector(cluster, group))["items"]

    def list_pods(self, label_selector: str | None = None) -> dict[str, Any]:
        return self.call("list", "pods", self.core.list_namespaced_pod, self.namespace,
                              label_selector=label_selector)

    def get_pod(self, name: str) -> dict[str, Any]:
        return self.call("get", "pods", self.core.read_namespaced_pod, name, self.namespace)

    def get_raycluster(self, name: str) -> dict[str, Any]:
        return self.call("get", RAY_PLURAL, self.custom.get_namespaced_custom_object,
                              RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, name,
                              group=RAY_GROUP)

    def patch_raycluster(self, name: str, merge_patch: dict[str, Any]) -> dict[str, Any]:
        return self.call("patch", RAY_PLURAL, self.custom.patch_namespaced_custom_object,
                              RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, name,
                              merge_patch, group=RAY_GROUP)
