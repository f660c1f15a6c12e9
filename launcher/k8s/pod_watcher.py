"""PodWatcher: a RayCluster's pods and the namespace's pod events, read as worker failures."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from launcher.k8s.client import KubeClient
from launcher.k8s.pods import pod_selector
from launcher.k8s.reasons import FailureReason, WorkerFailure, classify_event, classify_pod
from launcher.k8s.watch import ResourceWatch, WatchStats

log = logging.getLogger(__name__)

# Clock skew between the API server and this pod that an event's time may show.
EVENT_SLACK_S = 60.0


class PodWatcher:
    """Watches a RayCluster's pods and the namespace's pod events; turns them
    into WorkerFailure records (each once per pod, reason and restart)."""

    def __init__(self, kube: KubeClient, cluster: str, *, watch_seconds: int = 60):
        self.kube, self.cluster = kube, cluster
        self._pods = ResourceWatch(kube, "pods", kube.core.list_namespaced_pod,
                                   label_selector=pod_selector(cluster),
                                   watch_seconds=watch_seconds)
        self._events = ResourceWatch(kube, "events", kube.core.list_namespaced_event,
                                     field_selector="involvedObject.kind=Pod",
                                     watch_seconds=watch_seconds)
        self._queue: queue.Queue[WorkerFailure] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str, int]] = set()
        self._latest: dict[str, WorkerFailure] = {}
        self._known_pods: dict[str, str | None] = {}  # name -> node
        self._expected_deletions: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._started_at = time.time()
        self.errors: list[BaseException] = []

    @property
    def stats(self) -> dict[str, WatchStats]:
        return {"pods": self._pods.stats, "events": self._events.stats}

    def expect_deletion(self, pod_names: Iterable[str]) -> None:
        """Pods the controller released on purpose: their deletion is no failure."""
        with self._lock:
            self._expected_deletions.update(pod_names)

    def start(self) -> PodWatcher:
        self._started_at = time.time()
        for name, target in (("pods", self._run_pods), ("events", self._run_events)):
            t = threading.Thread(target=self._guard, args=(target,), name=f"k8s-watch-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def failures(self, timeout: float) -> Iterator[WorkerFailure]:
        """Failures seen so far and those arriving within timeout seconds."""
        end = time.monotonic() + timeout
        while True:
            try:
                yield self._queue.get(timeout=max(end - time.monotonic(), 0.001))
            except queue.Empty:
                return

    def latest(self) -> dict[str, WorkerFailure]:
        """The last failure per pod, for `fleet status`."""
        with self._lock:
            return dict(self._latest)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # surfaced through .errors; the thread must not die silently
            log.error("pod watcher stopped: %s", exc)
            self.errors.append(exc)

    def _report(self, failure: WorkerFailure) -> None:
        key = (failure.pod, str(failure.reason), failure.restart_count)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            if failure.node is None and self._known_pods.get(failure.pod):
                failure = dataclasses.replace(failure, node=self._known_pods[failure.pod])
            self._latest[failure.pod] = failure
        self._queue.put(failure)

    def _run_pods(self) -> None:
        for ev in self._pods.events(self._stop):
            if ev.type == "SYNCED":
                listed = set(ev.object["names"])
                with self._lock:
                    gone = [n for n in self._known_pods if n not in listed]
                for name in gone:
                    self._pod_gone(name)
                continue
            pod = ev.object
            name = pod.get("metadata", {}).get("name", "")
            with self._lock:
                self._known_pods[name] = (pod.get("spec") or {}).get("nodeName")
            failure = classify_pod(pod)
            if failure is not None:
                self._report(failure)
            if ev.type == "DELETED":
                self._pod_gone(name)

    def _pod_gone(self, name: str) -> None:
        with self._lock:
            node = self._known_pods.pop(name, None)
            unexplained = name not in self._expected_deletions and name not in self._latest
            self._expected_deletions.discard(name)
        if unexplained:
            self._report(WorkerFailure(pod=name, reason=FailureReason.DELETED,
                                       message="pod deleted", node=node))

    def _run_events(self) -> None:
        prefix = f"{self.cluster}-"
        for ev in self._events.events(self._stop):
            if ev.type == "SYNCED":
                continue
            # Events outlive their pods by about an hour: a (re-)list must not
            # report a death that happened long before this watcher started.
            if ev.type == "LISTED" and _event_time(ev.object) < self._started_at - EVENT_SLACK_S:
                continue
            failure = classify_event(ev.object)
            if failure is None or not failure.pod.startswith(prefix):
                continue
            self._report(failure)


def _event_time(event: Mapping[str, Any]) -> float:
    """Unix time an event last happened (0.0 when it carries none)."""
    import datetime as dt

    series = event.get("series") or {}
    for stamp in (series.get("lastObservedTime"), event.get("lastTimestamp"),
                  event.get("eventTime"), (event.get("metadata") or {}).get("creationTimestamp")):
        if stamp:
            try:
                return dt.datetime.fromisoformat(stamp).timestamp()
            except ValueError:
                continue
    return 0.0
