"""A small fake of the Kubernetes API server on 127.0.0.1, for launcher/k8s/ tests.

It serves the real JSON shapes the client parses: PodList/EventList with
metadata.resourceVersion, watch streams of {"type", "object"} lines sent with
chunked transfer encoding, BOOKMARK events, ERROR events carrying a 410
Status, metav1.Status bodies for 403/404/409, RFC 7386 merge patches on
RayClusters guarded by metadata.resourceVersion (409 on a stale one).

Faults are scripted per request: a status code, a delay (slow responses), or
a watch stream that drops the connection after N events. With `token` set,
a request without `Authorization: Bearer <token>` gets 401 first, as from a
real server's authenticator; `start(tls=...)` serves HTTPS (tests/k8s_fake/tls.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

POD_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+))?$")
EVENT_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/events$")
RC_PATH = re.compile(
    r"^/apis/ray\.io/v1/namespaces/(?P<ns>[^/]+)/rayclusters(?:/(?P<name>[^/]+))?$")


def status_body(code: int, reason: str, message: str, kind: str | None = None) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if kind:
        body["details"] = {"kind": kind}
    return body


def forbidden(verb: str, resource: str, namespace: str, group: str = "") -> dict:
    """The Status a real API server returns when RBAC denies a request."""
    return status_body(
        403, "Forbidden",
        f'{resource} is forbidden: User "system:serviceaccount:{namespace}:fleet-controller" '
        f'cannot {verb} resource "{resource}" in API group "{group}" in the namespace '
        f'"{namespace}"', kind=resource)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _get_path(obj: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _matches(obj: dict, label_selector: str | None, field_selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, (field_selector or "").split(",")):
        key, _, value = term.partition("=")
        if str(_get_path(obj, key)) != value:
            return False
    return True


@dataclass
class Fault:
    """Applies to the next `times` requests whose method and path match."""

    method: str
    path: str  # regex, matched with re.search against the URL path
    status: int | None = None
    body: dict | None = None
    delay_s: float = 0.0
    delay_after_s: float = 0.0  # handle the request (a PATCH lands), then answer late
    body_delay_s: float = 0.0  # send the headers, then stall before the body
    drop_after_events: int | None = None  # watch only: cut the stream after N events
    watch: bool | None = None  # None: any; True: watch requests only; False: non-watch only
    times: int = 1


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any = None
    status: int = 0
    authorization: str | None = None


@dataclass
class FakeKubeAPI:
    namespace: str = "ascend-fleet"
    bookmark_interval_s: float = 0.2
    token: str | None = None  # bearer token every request must carry; None: any request
    objects: dict[str, dict[str, dict]] = field(
        default_factory=lambda: {"pods": {}, "events": {}, "rayclusters": {}})
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rv = 100
        # (rv, collection, type, object) in order; watches replay from here.
        self._history: list[tuple[int, str, str, dict]] = []
        self._compacted_rv = 0
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, tls: ssl.SSLContext | None = None) -> str:
        fake = self

        class Handler(_Handler):
            api = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            # The handshake happens on the first read, in the request's own thread.
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        scheme = "https" if tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------ state

    def _bump(self, collection: str, etype: str, obj: dict) -> dict:
        with self._cond:
            self._rv += 1
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta["resourceVersion"] = str(self._rv)
            meta.setdefault("namespace", self.namespace)
            meta.setdefault("uid", f"uid-{meta.get('name')}")
            if etype == "DELETED":
                self.objects[collection].pop(meta["name"], None)
            else:
                self.objects[collection][meta["name"]] = obj
            self._history.append((self._rv, collection, etype, copy.deepcopy(obj)))
            self._cond.notify_all()
            return obj

    def put(self, collection: str, obj: dict) -> dict:
        name = obj["metadata"]["name"]
        etype = "MODIFIED" if name in self.objects[collection] else "ADDED"
        return self._bump(collection, etype, obj)

    def delete(self, collection: str, name: str) -> dict:
        return self._bump(collection, "DELETED", self.objects[collection][name])

    def compact(self) -> None:
        """A new watch from an older resourceVersion now gets 410 Gone, as after
        etcd compaction; watches already open keep streaming, as from the watch cache."""
        with self._cond:
            self._compacted_rv = self._rv

    def add_fault(self, fault: Fault) -> Fault:
        with self._cond:
            self.faults.append(fault)
        return fault

    def _take_fault(self, method: str, path: str, is_watch: bool) -> Fault | None:
        with self._cond:
            for f in self.faults:
                if (f.times > 0 and f.method == method and re.search(f.path, path)
                        and (f.watch is None or f.watch == is_watch)):
                    f.times -= 1
                    return f
        return None

    def watch_requests(self, collection: str) -> list[Request]:
        return [r for r in self.requests
                if r.path.endswith(collection) and r.query.get("watch") == "true"]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # A client that timed out and hung up is what the slow-response tests do; one
        # that rejects the certificate is what the unknown-CA test does.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError,
                                              ssl.SSLError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    api: FakeKubeAPI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    # ------------------------------------------------------------ plumbing

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        fault = getattr(self, "_fault", None)
        if fault and fault.delay_after_s:
            time.sleep(fault.delay_after_s)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault and fault.body_delay_s:
            self.wfile.flush()
            time.sleep(fault.body_delay_s)
        self.wfile.write(data)
        self._record.status = status

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = None
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = json.loads(self.rfile.read(length))
        self._record = Request(method, url.path, query, body,
                               authorization=self.headers.get("Authorization"))
        self.api.requests.append(self._record)
        if self.api.token is not None and not self._authenticated():
            self._send_json(401, status_body(401, "Unauthorized", "Unauthorized"))
            return
        is_watch = query.get("watch") == "true"
        fault = self.api._take_fault(method, url.path, is_watch)
        self._fault = fault
        if fault and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault and fault.status:
            self._send_json(fault.status, fault.body or status_body(
                fault.status, "InternalError", f"injected {fault.status}"))
            return
        for pattern, collection in ((POD_PATH, "pods"), (EVENT_PATH, "events"),
                                    (RC_PATH, "rayclusters")):
            m = pattern.match(url.path)
            if m:
                break
        else:
            self._send_json(404, status_body(404, "NotFound", f"no route {url.path}"))
            return
        name = m.groupdict().get("name")
        if method == "GET" and name is None:
            if is_watch:
                self._watch(collection, query, fault)
            else:
                self._list(collection, query)
        elif method == "GET":
            obj = self.api.objects[collection].get(name)
            if obj is None:
                self._send_json(404, status_body(
                    404, "NotFound", f'{collection} "{name}" not found', kind=collection))
            else:
                self._send_json(200, obj)
        elif method == "PATCH" and name:
            self._patch(collection, name, body)
        else:
            self._send_json(405, status_body(405, "MethodNotAllowed", method))

    def _authenticated(self) -> bool:
        # The API server's bearer authenticator takes the scheme in any case.
        scheme, _, token = (self._record.authorization or "").partition(" ")
        return scheme.lower() == "bearer" and token == self.api.token

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    # ------------------------------------------------------------ verbs

    def _list(self, collection: str, query: dict[str, str]) -> None:
        with self.api._cond:
            items = [copy.deepcopy(o) for o in self.api.objects[collection].values()
                     if _matches(o, query.get("labelSelector"), query.get("fieldSelector"))]
            rv = str(self.api._rv)
        kind = {"pods": "PodList", "events": "EventList", "rayclusters": "RayClusterList"}
        self._send_json(200, {"kind": kind[collection], "apiVersion": "v1",
                              "metadata": {"resourceVersion": rv}, "items": items})

    def _patch(self, collection: str, name: str, patch: Any) -> None:
        content_type = self.headers.get("Content-Type", "")
        if content_type != "application/merge-patch+json":
            self._send_json(415, status_body(415, "UnsupportedMediaType", content_type))
            return
        with self.api._cond:
            current = self.api.objects[collection].get(name)
            if current is None:
                self._send_json(404, status_body(404, "NotFound", f'"{name}" not found'))
                return
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                self._send_json(409, status_body(
                    409, "Conflict",
                    f'Operation cannot be fulfilled on {collection}.ray.io "{name}": the '
                    "object has been modified; please apply your changes to the latest "
                    "version and try again", kind=collection))
                return
            updated = merge_patch(current, patch)
            updated["metadata"].pop("resourceVersion", None)
            obj = self.api._bump(collection, "MODIFIED", updated)
        self._send_json(200, obj)

    def _watch(self, collection: str, query: dict[str, str], fault: Fault | None) -> None:
        api = self.api
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._record.status = 200
        sent = 0
        last_bookmark = time.monotonic()
        try:
            if since and since < api._compacted_rv:
                # What a real server sends for a compacted resourceVersion: 200,
                # then one ERROR event with a 410 Status, then end of stream.
                self._chunk(json.dumps({"type": "ERROR", "object": status_body(
                    410, "Expired", f"too old resource version: {since} ({api._compacted_rv})"
                )}).encode() + b"\n")
                self._chunk(b"")
                return
            kind = {"pods": "Pod", "events": "Event", "rayclusters": "RayCluster"}[collection]
            while time.monotonic() < deadline and not getattr(api, "_stopping", False):
                with api._cond:
                    snapshot = api._rv
                    pending = [(t, o) for rv, c, t, o in api._history
                               if c == collection and since < rv <= snapshot
                               and _matches(o, query.get("labelSelector"),
                                            query.get("fieldSelector"))]
                for etype, obj in pending:
                    if fault and fault.drop_after_events is not None \
                            and sent >= fault.drop_after_events:
                        # Cut mid-stream, no terminating chunk: the client sees a
                        # broken connection, as when an API server restarts.
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self._chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")
                    sent += 1
                # Every matching event up to snapshot has been sent.
                since = snapshot
                if bookmarks and time.monotonic() - last_bookmark > api.bookmark_interval_s:
                    self._chunk(json.dumps({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(since)}}}).encode() + b"\n")
                    last_bookmark = time.monotonic()
                if not pending:
                    with api._cond:
                        if api._rv == snapshot:
                            api._cond.wait(timeout=0.05)
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextlib.contextmanager
def serving(bookmark_interval_s: float = 0.1, *, token: str | None = None,
            tls: ssl.SSLContext | None = None) -> Iterator[FakeKubeAPI]:
    """A started fake; its base URL is `.url`."""
    api = FakeKubeAPI(bookmark_interval_s=bookmark_interval_s, token=token)
    api.url = api.start(tls)  # type: ignore[attr-defined]
    try:
        yield api
    finally:
        api.stop()


def write_kubeconfig(path: Path, url: str, namespace: str) -> Path:
    """A kubeconfig whose current context is the fake (a token that is not a secret)."""
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{url}"}}}}]
users: [{{name: me, user: {{token: not-a-secret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: me, namespace: {namespace}}}}}]
current-context: fake
""")
    return path
