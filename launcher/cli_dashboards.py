"""`fleet dashboards push` and `fleet plot`: the Grafana and the no-server views of a run.

Registered on the main CLI by launcher/cli.py as ``dashboards`` and ``plot``.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from launcher import jobref
from launcher.metrics import serve_command

DEFAULT_TOKEN_ENV = "GRAFANA_TOKEN"  # noqa: S105 - the variable's name, not a secret
DASHBOARD_FILES = ("training.json", "fleet.json")


def _default_dashboards_dir() -> Path:
    # The generated JSON is committed next to the launcher package in the repo.
    return Path(__file__).resolve().parents[1] / "dashboards"


def _fleet_home(ctx: click.Context) -> Path:
    obj = ctx.find_root().obj
    home = getattr(obj, "home", None)
    if home is not None:
        return Path(home)
    return Path(os.environ.get("FLEET_HOME") or Path.home() / ".fleet").expanduser()


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def load_dashboards(directory: Path) -> list[dict[str, Any]]:
    """The committed dashboards, checked before anything is sent."""
    out = []
    for name in DASHBOARD_FILES:
        path = directory / name
        if not path.is_file():
            raise click.ClickException(
                f"{path} not found: pass --dir with the folder holding "
                f"{', '.join(DASHBOARD_FILES)} (generate them with `python -m dashboards.generate`)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or not data.get("uid") or not data.get("title"):
            raise click.ClickException(f"{path}: not a dashboard (needs 'uid' and 'title')")
        out.append(data)
    return out


@click.group("dashboards", short_help="Push the Grafana dashboards.")
def dashboards_group() -> None:
    """Grafana dashboards for fleet metrics (Training, Fleet)."""


@dashboards_group.command("push")
@click.option("--url", required=True, help="Grafana base URL, e.g. https://grafana.example.org")
@click.option(
    "--token-env",
    default=DEFAULT_TOKEN_ENV,
    show_default=True,
    help="Environment variable holding a Grafana service-account token (never printed).",
)
@click.option("--folder-uid", default=None, help="Grafana folder to put the dashboards in.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder with training.json and fleet.json (default: the repo's dashboards/).",
)
@click.option(
    "--allow-http",
    is_flag=True,
    help="Send the token over plain http to a host that is not loopback.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=10.0, show_default=True)
def push_command(
    url: str,
    token_env: str,
    folder_uid: str | None,
    directory: Path | None,
    allow_http: bool,
    timeout: float,
) -> None:
    """Create or update the Training and Fleet dashboards in Grafana."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--url")
    if parsed.username or parsed.password:
        raise click.BadParameter(
            f"put no credentials in the URL; set ${token_env} instead", param_hint="--url"
        )
    if parsed.scheme == "http" and not _is_loopback(parsed.hostname) and not allow_http:
        raise click.BadParameter(
            "refusing to send the token over plain http to a non-loopback host "
            "(use https, or --allow-http if you really mean it)",
            param_hint="--url",
        )
    token = os.environ.get(token_env, "")
    if not token:
        raise click.UsageError(
            f"environment variable {token_env} is empty: set it to a Grafana service-account "
            "token with dashboard write access"
        )
    dashboards = load_dashboards(directory or _default_dashboards_dir())
    api = GrafanaApi.from_url(url=url.rstrip("/"), credential=token, timeout=timeout)
    for dash in dashboards:
        payload: dict[str, Any] = {
            # No id: Grafana matches on uid, so a push updates instead of duplicating.
            "dashboard": {k: v for k, v in dash.items() if k != "id"},
            "overwrite": True,
            "message": "pushed by `fleet dashboards push`",
        }
        if folder_uid:
            payload["folderUid"] = folder_uid
        try:
            res = api.dashboard.update_dashboard(payload)
        except (GrafanaException, GrafanaClientError, OSError) as exc:
            raise click.ClickException(
                f"pushing {dash['title']!r} to {url} failed: {_redact(str(exc), token)}"
            ) from None
        where = res.get("url", f"/d/{dash['uid']}") if isinstance(res, dict) else ""
        click.echo(f"pushed {dash['title']} (uid {dash['uid']}) -> {url.rstrip('/')}{where}")


def resolve_job_dir(ctx: click.Context, job: str) -> tuple[str, Path]:
    """JOB is a job id or WORKFLOW/STEP (from the store), a job directory under
    $FLEET_HOME/jobs/, or a path to a run's heartbeat files."""
    home = _fleet_home(ctx)
    jobs_dir = home / "jobs"
    st = _stored_job(home, job)
    if st is not None:
        if st["kind"] == "Workflow":
            steps = ", ".join(f"{jobref.step_ref(st['id'], s['step'])} ({s['id']})"
                              for s in st.get("steps") or [])
            raise click.UsageError(f"{job!r} is a Workflow; plot one of its steps: {steps}")
        return st["id"], jobs_dir / st["id"]
    candidate = jobs_dir / job
    if "/" not in job and candidate.is_dir():
        return job, candidate
    path = Path(job)
    if path.exists():
        return path.resolve().name or job, path
    known = sorted(d.name for d in jobs_dir.iterdir() if d.is_dir()) if jobs_dir.is_dir() else []
    err = jobref.no_such_job(job)
    err.message += f"; known jobs: {', '.join(known[:20])}" if known else f"; no jobs under {jobs_dir}"
    raise err


def _stored_job(home: Path, ref: str) -> dict[str, Any] | None:
    """The job `ref` names in the store, read offline (plot needs no cluster)."""
    if not (home / "fleet.db").exists():
        return None
    from launcher.controller import OfflineView

    view = OfflineView(home)
    if view.status(ref.partition(jobref.STEP_SEP)[0]) is None:
        return None  # perhaps a path to heartbeat files
    return jobref.resolve(ref, view.status)


@click.command("plot", short_help="Draw a job's training panels to a PNG.")
@click.argument("job")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PNG file to write (default: ./JOB.png).",
)
@click.pass_context
def plot_command(ctx: click.Context, job: str, out: Path | None) -> None:
    """Render a job's loss/lr, images/s, top-1 and global-batch panels into one PNG."""
    from launcher.metrics_history import RunHistory
    from launcher.plot import render

    name, root = resolve_job_dir(ctx, job)
    if out is None:
        out = Path(f"{name}.png")
    if out.suffix.lower() != ".png":
        raise click.BadParameter(f"{out} must end in .png", param_hint="--out")
    try:
        history = RunHistory.load(name, root)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    if not history.events:
        raise click.ClickException(f"the heartbeat files under {root} hold no events yet")
    result = render(history, out)
    summary = "; ".join(f"{title}: {n} {result.units[title]}"
                        for title, n in result.panels.items())
    click.echo(f"wrote {result.path} ({result.width}x{result.height} px)\n  {summary}")


@click.group("metrics", short_help="Serve the Prometheus exporter.")
def metrics_group() -> None:
    """Prometheus exporter for fleet metrics (what the controller serves)."""


metrics_group.add_command(serve_command, "serve")

# Names launcher/cli.py registers.
dashboards = dashboards_group
plot = plot_command
metrics = metrics_group
