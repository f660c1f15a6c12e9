"""`fleet dashboards push` against a fake Grafana HTTP API on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli_dashboards import dashboards_group

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "glsa_test-token-0123456789"


class FakeGrafana:
    """Records dashboard POSTs; answers like Grafana's /api/dashboards/db."""

    def __init__(self, status: int = 200, echo_auth: bool = False) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                if status == 200:
                    uid = body["dashboard"]["uid"]
                    reply = {"id": 1, "uid": uid, "url": f"/d/{uid}/x", "status": "success"}
                else:
                    # A server that echoes the credential must not make us print it.
                    reply = {"message": f"invalid API key {self.headers.get('Authorization')}"
                             if echo_auth else "invalid API key"}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def push(args: list[str], env: dict[str, str] | None = None):
    env = {"GRAFANA_TOKEN": TOKEN} if env is None else env
    return CliRunner().invoke(dashboards_group, ["push", *args], env=env)


def test_push_sends_both_dashboards_with_the_token(tmp_path):
    with FakeGrafana() as grafana:
        res = push(["--url", grafana.url, "--folder-uid", "ml"])
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output
    assert [r["path"] for r in grafana.requests] == ["/api/dashboards/db"] * 2
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in grafana.requests)
    sent = {r["body"]["dashboard"]["uid"]: r["body"] for r in grafana.requests}
    for name in ("training.json", "fleet.json"):
        committed = json.loads((ROOT / "dashboards" / name).read_text())
        body = sent[committed["uid"]]
        assert body["dashboard"] == {k: v for k, v in committed.items() if k != "id"}
        assert body["overwrite"] is True and body["folderUid"] == "ml"
    assert "pushed Fleet / Training (uid fleet-training)" in res.output


def test_rejected_token_fails_without_printing_it():
    with FakeGrafana(status=401, echo_auth=True) as grafana:
        res = push(["--url", grafana.url])
    assert res.exit_code != 0
    assert "failed" in res.output and TOKEN not in res.output
    assert len(grafana.requests) == 1  # stops at the first failure


def test_missing_token_sends_nothing():
    with FakeGrafana() as grafana:
        res = push(["--url", grafana.url], env={"GRAFANA_TOKEN": ""})
    assert res.exit_code != 0 and "GRAFANA_TOKEN" in res.output
    assert grafana.requests == []


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://grafana.example.org", "plain http"),
        ("https://admin:admin@grafana.example.org", "no credentials in the URL"),
        ("ftp://grafana.example.org", "not an http(s) URL"),
    ],
)
def test_unsafe_urls_are_refused_before_any_request(url, message):
    res = push(["--url", url])
    assert res.exit_code != 0 and message in res.output


def test_missing_dashboard_files_are_named(tmp_path):
    with FakeGrafana() as grafana:
        res = push(["--url", grafana.url, "--dir", str(tmp_path)])
    assert res.exit_code != 0 and "training.json not found" in res.output
    assert grafana.requests == []
