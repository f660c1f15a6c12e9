"""List, then watch, one namespaced collection, resuming where the last watch ended.

A watch resumes from the last resourceVersion it saw (events or bookmarks
advance it); 410 Gone lists again, and the SYNCED event after a list tells the
consumer what was deleted while no watch was open.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from launcher.k8s.client import KubeClient, transient_errors
from launcher.k8s.errors import KubeError, KubeUnavailable

log = logging.getLogger(__name__)


@dataclass
class WatchStats:
    lists: int = 0
    watches: int = 0
    bookmarks: int = 0
    expired: int = 0  # 410 Gone -> re-list
    reconnects: int = 0  # dropped connections / transient errors


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED; LISTED and SYNCED come from a (re-)list
    object: dict[str, Any]


class ResourceWatch:
    """List, then watch, one namespaced collection; resume from the last
    resourceVersion seen (events or bookmarks), re-list after 410 Gone."""

    def __init__(self, kube: KubeClient, resource: str, list_fn: Callable[..., Any], *,
                 label_selector: str | None = None, field_selector: str | None = None,
                 watch_seconds: int = 60, max_failures: int = 8):
        self.kube, self.resource, self.list_fn = kube, resource, list_fn
        self.label_selector, self.field_selector = label_selector, field_selector
        self.watch_seconds, self.max_failures = watch_seconds, max_failures
        self.resource_version: str | None = None
        self.stats = WatchStats()

    def _list(self) -> Iterator[WatchEvent]:
        body = self.kube.call("list", self.resource, self.list_fn, self.kube.namespace,
                                   label_selector=self.label_selector,
                                   field_selector=self.field_selector)
        self.stats.lists += 1
        self.resource_version = body.get("metadata", {}).get("resourceVersion")
        items = body.get("items", [])
        for item in items:
            yield WatchEvent("LISTED", item)
        # Tells the consumer the list is complete: whatever it knew and the list
        # lacks was deleted while no watch was open (after a 410, say).
        yield WatchEvent("SYNCED", {"names": [i["metadata"]["name"] for i in items]})

    def _open(self) -> Any:
        connect, read = self.kube.retry.request_timeout
        return self.kube.call(
            "watch", self.resource, self.list_fn, self.kube.namespace, stream=True,
            label_selector=self.label_selector, field_selector=self.field_selector,
            watch=True, allow_watch_bookmarks=True, resource_version=self.resource_version,
            timeout_seconds=self.watch_seconds,
            # The server ends the watch after watch_seconds; a read stalled well
            # past that means the connection is dead, not quiet.
            _request_timeout=(connect, self.watch_seconds + read))

    def events(self, stop: threading.Event, deadline: float | None = None
               ) -> Iterator[WatchEvent]:
        """Events until stop is set or the deadline (time.monotonic) passes."""
        transient = transient_errors()
        failures = 0
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if self.resource_version is None:
                yield from self._list()
            try:
                resp = self._open()
                self.stats.watches += 1
                try:
                    for line in _lines(resp):
                        if stop.is_set():
                            return
                        event = json.loads(line)
                        etype, obj = event.get("type"), event.get("object") or {}
                        if etype == "ERROR":
                            if obj.get("code") == 410:
                                self.stats.expired += 1
                                log.info("watch %s: %s; listing again", self.resource,
                                         obj.get("message"))
                                self.resource_version = None
                                break
                            raise KubeError(f"watch {self.resource}: {obj.get('message')}",
                                            obj.get("code"))
                        rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if rv:
                            self.resource_version = rv
                        if etype == "BOOKMARK":
                            self.stats.bookmarks += 1
                            continue
                        failures = 0
                        yield WatchEvent(etype, obj)
                finally:
                    resp.release_conn()
            except KubeError as exc:
                if exc.status != 410:
                    raise
                self.stats.expired += 1
                self.resource_version = None
            except transient as exc:
                failures += 1
                self.stats.reconnects += 1
                if failures >= self.max_failures:
                    raise KubeUnavailable(
                        f"watch {self.resource} dropped {failures} times in a row: {exc}"
                    ) from exc
                delay = self.kube.retry.delay(failures)
                log.warning("watch %s dropped (%s); resuming from resourceVersion %s in %.1fs",
                            self.resource, exc, self.resource_version, delay)
                stop.wait(delay)


def _lines(resp: Any) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(4096, decode_content=True):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf
