"""`fleet`: the command-line front door (click).

Exit codes (also in `fleet --help`):
  0 success; 1 the job failed or was cancelled (with --wait / status of a finished job);
  2 invalid spec or usage; 3 no cluster / cannot reach the controller; 4 no such job;
  130 interrupted (the job keeps running).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from launcher import local as _local  # noqa: F401 - sets Ray's loopback env before ray loads
from launcher import spec as specmod

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NO_CLUSTER, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}

EPILOG = """\b
Exit codes: 0 ok, 1 job failed/cancelled, 2 invalid spec or usage,
3 no cluster reachable, 4 no such job, 130 interrupted.
\b
Examples:
  fleet submit examples/quickstart.yaml --wait     # starts a local cluster if needed
  fleet submit job.yaml --set spec.batch.global=512 --dry-run
  fleet validate job.yaml
  fleet list
  fleet status volo-digits-3 --output json
  fleet logs volo-digits-3 --rank 1 --follow
  fleet cancel volo-digits-3
  fleet up / fleet down                            # local Ray on 127.0.0.1 + controller
  fleet schema > fleet-job.schema.json             # for editor completion
\b
Cluster: --address or RAY_ADDRESS; otherwise the local cluster of `fleet up`
(state in $FLEET_HOME, default ~/.fleet).
Shell completion: eval "$(_FLEET_COMPLETE=bash_source fleet)"
"""


# Queries answered from the durable store when no cluster is running.
OFFLINE_METHODS = {"status", "list_jobs", "read_log"}


class Ctx:
    def _offline_ok(self) -> bool:
        from launcher import local
        return (not self.address and local.local_cluster(self.home) is None
                and (self.home / "fleet.db").exists())

    def __init__(self, address: str | None, home: Path):
        self.address = address
        self.home = home
        self._ctl = None

    def controller(self, start: bool = False):
        from launcher import local

        if self._ctl is None:
            try:
                self._ctl = local.connect(self.address, self.home, start)
            except local.NoCluster:
                click.echo("error: no fleet cluster running. Start one with `fleet up`, or "
                           "pass --address / set RAY_ADDRESS.", err=True)
                sys.exit(EXIT_NO_CLUSTER)
            except (ConnectionError, RuntimeError) as e:
                click.echo(f"error: cannot reach the cluster: {e}", err=True)
                sys.exit(EXIT_NO_CLUSTER)
        return self._ctl

    def call(self, method: str, *args, timeout: float = 60.0, start: bool = False):
        if method in OFFLINE_METHODS and self._ctl is None and self._offline_ok():
            from launcher.controller import OfflineView
            return getattr(OfflineView(self.home), method)(*args)
        ctl = self.controller(start)
        import ray
        try:
            return ray.get(getattr(ctl, method).remote(*args), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            click.echo(f"error: controller did not answer {method} within {timeout:.0f}s",
                       err=True)
            sys.exit(EXIT_NO_CLUSTER)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Ray cluster address (default: the local `fleet up` cluster).")
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="State directory (default $FLEET_HOME or ~/.fleet).")
@click.pass_context
def cli(ctx: click.Context, address: str | None, home: Path | None) -> None:
    """ascend-fleet: submit and watch training jobs on Ascend fleets (or a local stand-in)."""
    from launcher.local import fleet_home
    h = (home or fleet_home()).expanduser().resolve()
    os.environ["FLEET_HOME"] = str(h)
    ctx.obj = Ctx(address, h)


# ------------------------------------------------------------------ spec helpers

def _load(file: str, sets: tuple[str, ...]) -> tuple[Any, dict, dict]:
    """Parse + validate + resolve paths; exits 2 with the spec's errors."""
    try:
        job, doc = specmod.load_file(file, list(sets))
        paths = specmod.check_paths(job, file, create_data=True)
    except specmod.SpecError as e:
        click.echo(e.render(), err=True)
        sys.exit(EXIT_INVALID)
    ctx = {"workdir": str(specmod.project_root(Path(file))), "steps": paths}
    return job, doc, ctx


def _create_data(job, ctx: dict) -> None:
    for name, _kind, sp in specmod.steps_of(job):
        data = getattr(sp, "data", None)
        if data is None or data.create is None:
            continue
        d = Path(ctx["steps"][name]["data_dir"])
        if d.is_dir():
            continue
        click.echo(f"creating data: python -m {data.create.module} --out {d}")
        r = subprocess.run([sys.executable, "-m", data.create.module, "--out", str(d)],  # noqa: S603
                           cwd=ctx["workdir"], check=False,
                           env=dict(os.environ, PYTHONPATH=ctx["workdir"]))
        if r.returncode != 0 or not d.is_dir():
            click.echo(f"error: creating {d} failed (exit {r.returncode})", err=True)
            sys.exit(EXIT_INVALID)


def _dry_run(job, ctx: dict, home: Path) -> dict:
    from launcher.planner import FreePool
    from launcher.ranks import build_launch

    out = {"kind": job.kind, "name": job.metadata.name, "steps": []}
    for name, kind, sp in specmod.steps_of(job):
        step: dict[str, Any] = {"step": name, "kind": kind}
        if kind == "TrainJob":
            req = sp.request()
            topo = sp.resources.topology()
            nodes = max(1, -(-req.max_devices // topo.devices_per_node))
            pool = FreePool.from_free({f"node-{i}": range(topo.devices_per_node)
                                       for i in range(nodes)}, topo)
            plan = pool.plan(req)
            step["feasible_device_counts"] = sp.feasible_counts()
            if sp.workload == "volo":
                from workloads.volo.config import recipe_precision

                step["precision"] = recipe_precision(ctx["steps"][name]["config"], sp.overrides)
        else:
            from launcher.planner import NodeSlice, Plan
            plan = Plan(1, 1, 1, (NodeSlice("node-0", (0,)),)) if kind == "ValidateJob" \
                else Plan(0, 0, 0, (NodeSlice("node-0", ()),))
        paths = dict(ctx["steps"][name], workdir=ctx["workdir"])
        if kind in ("ValidateJob", "ExportJob") and "ckpt_path" not in paths:
            paths["ckpt_path"] = f"<checkpoint of step {sp.checkpoint.fromStep}>"
        spec_d = sp.model_dump(by_alias=True, mode="json")
        jid = f"{job.metadata.name}-{name}-<id>" if job.kind == "Workflow" else f"{name}-<id>"
        launches = build_launch(job_id=jid, attempt=1, kind=kind, spec=spec_d,
                                paths=paths, plan=plan, home=home)
        step["plan"] = {"devices": plan.devices, "micro_batch": plan.micro_batch,
                        "grad_accum": plan.grad_accum,
                        "nodes": [{"node": s.node, "chips": list(s.chips)}
                                  for s in plan.slices]}
        step["processes"] = [nl.to_dict() for nl in launches]
        out["steps"].append(step)
    return out


def _print_dry_run(d: dict) -> None:
    click.echo(f"dry run: {d['kind']} {d['name']} (nothing submitted)")
    for st in d["steps"]:
        p = st["plan"]
        if p["devices"]:
            click.echo(f"\n[{st['step']}] {st['kind']}: {p['devices']} device(s), micro-batch "
                       f"{p['micro_batch']}, accumulation {p['grad_accum']}")
        else:
            click.echo(f"\n[{st['step']}] {st['kind']}: no devices (one CPU process)")
        if "feasible_device_counts" in st:
            click.echo(f"  feasible device counts: {st['feasible_device_counts']}")
        for k, v in (st.get("precision") or {}).items():
            click.echo(f"  {k}: {v}")
        for nl in st["processes"]:
            click.echo(f"  node {nl['node']} chips {nl['chips']}:")
            ranks = nl["ranks"]
            if not ranks:
                continue
            # Every process of a job runs the same command; only the env differs.
            argvs = {tuple(r["argv"]) for r in ranks}
            if len(argvs) == 1:
                click.echo(f"    command: {' '.join(ranks[0]['argv'])}")
            keys = ("MS_", "FLEET_", "DEVICE_", "ASCEND_", "RANK_", "LOCAL_RANK")
            common = {k: v for k, v in ranks[0]["env"].items() if k.startswith(keys)
                      and all(r["env"].get(k) == v for r in ranks)}
            if len(ranks) > 1 and common:
                click.echo("    env (all): " + " ".join(f"{k}={v}"
                                                        for k, v in sorted(common.items())))
            for r in ranks:
                label = "scheduler" if r["rank"] is None else f"rank {r['rank']}"
                env = " ".join(f"{k}={v}" for k, v in sorted(r["env"].items())
                               if k.startswith(keys) and (len(ranks) == 1 or k not in common))
                if len(argvs) > 1:
                    click.echo(f"    {label}: {' '.join(r['argv'])}")
                    click.echo(f"      env: {env}")
                else:
                    click.echo(f"    {label}: {env}")


# ------------------------------------------------------------------ progress

def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(st: dict) -> str:
    p = st.get("progress") or {}
    parts = [f"{st['id']} {st['state']}"]
    if "step" in p:
        total = p.get("stop_step") or p.get("total_steps")
        parts.append(f"step {p['step']}" + (f"/{total}" if total else ""))
        if p.get("loss") is not None:
            parts.append(f"loss {float(p['loss']):.4f}")
        if p.get("images_per_second") is not None:
            parts.append(f"{float(p['images_per_second']):.1f} img/s")
        per_step = p.get("avg_step_seconds")  # absent until a post-compile step
        if total and per_step and st["state"] not in TERMINAL:
            parts.append(f"ETA {_fmt_eta((total - p['step']) * float(per_step))}")
    if p.get("val_top1") is not None:
        parts.append(f"val top-1 {float(p['val_top1']):.2f}%")
    atts = st.get("attempts") or []
    if atts:
        a = atts[-1]["plan"]
        if a.get("devices"):
            parts.append(f"[{a['devices']} dev, micro {a['micro_batch']} x accum "
                         f"{a['grad_accum']}, attempt {atts[-1]['n']}]")
    if st["state"] in ("PENDING", "RESTARTING", "FAILED", "CANCELLED") and st.get("message"):
        parts.append(f"- {st['message']}")
    return "  ".join(parts)


def _wait(c: Ctx, job_id: str, interval: float = 1.0) -> int:
    last: dict[str, str] = {}
    try:
        while True:
            st = c.call("status", job_id)
            if st is None:
                click.echo(f"error: job {job_id} disappeared", err=True)
                return EXIT_NOT_FOUND
            rows = st.get("steps") or [st]
            for r in rows:
                line = progress_line(r)
                if last.get(r["id"]) != line:
                    click.echo(line)
                    last[r["id"]] = line
            if st["state"] in TERMINAL:
                _print_outcome(st)
                return EXIT_OK if st["state"] == "SUCCEEDED" else EXIT_FAILED
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; {job_id} keeps running (fleet status {job_id})", err=True)
        return EXIT_INTERRUPTED


def _print_outcome(st: dict) -> None:
    click.echo(f"{st['id']}: {st['state']} - {st.get('message', '')}")
    for r in st.get("steps") or [st]:
        res = r.get("result")
        if res and "top1" in res:
            # The workloads report accuracy in percent (validate's JSON line).
            click.echo(f"{r['id']}: top-1 = {float(res['top1']):.2f}%  top-5 = "
                       f"{float(res.get('top5', float('nan'))):.2f}%  "
                       f"({res.get('images', '?')} images)")


# ------------------------------------------------------------------ completion

def _complete_job(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Job ids from the local store (no cluster round trip while typing)."""
    from launcher.local import fleet_home
    from launcher.store import Store

    db = fleet_home() / "fleet.db"
    if not db.exists():
        return []
    try:
        return [j.id for j in Store(db).jobs() if j.id.startswith(incomplete)][-50:]
    except Exception:  # noqa: BLE001 - completion must never crash the shell
        return []


# ------------------------------------------------------------------ commands

@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a spec field, e.g. --set spec.batch.global=512 (repeatable).")
@click.option("--wait", is_flag=True, help="Follow progress until the job ends.")
@click.option("--dry-run", is_flag=True, help="Print the plan, commands and env; submit nothing.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_obj
def submit(c: Ctx, file: str, sets: tuple[str, ...], wait: bool, dry_run: bool,
           output: str) -> None:
    """Validate FILE and submit it (starts a local cluster if none is running)."""
    job, doc, ctx = _load(file, sets)
    if dry_run:
        d = _dry_run(job, ctx, c.home)
        if output == "json":
            click.echo(json.dumps(d, indent=2))
        else:
            _print_dry_run(d)
        sys.exit(EXIT_OK)
    _create_data(job, ctx)
    # Re-check now that the data exists: a rejected spec submits nothing.
    _load(file, sets)
    res = c.call("submit", doc, ctx, start=True, timeout=120)
    if output == "json":
        click.echo(json.dumps(res))
    else:
        click.echo(f"submitted {res['kind']} {res['id']}")
        for step, jid in (res.get("steps") or {}).items():
            click.echo(f"  step {step}: {jid}")
    if wait:
        sys.exit(_wait(c, res["id"]))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.pass_obj
def validate(c: Ctx, file: str, sets: tuple[str, ...]) -> None:
    """Check FILE (fields, topology, batch, paths) without submitting."""
    job, _doc, ctx = _load(file, sets)
    click.echo(f"{file}: valid {job.kind} {job.metadata.name!r}")
    for name, kind, sp in specmod.steps_of(job):
        extra = ""
        if kind == "TrainJob":
            extra = f" feasible device counts {sp.feasible_counts()}"
            data = ctx["steps"][name].get("data_dir")
            if data and not Path(data).is_dir():
                extra += f"; data dir {data} will be created on submit"
        click.echo(f"  {name}: {kind}{extra}")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of job specs (also shipped as launcher/schema.json)."""
    click.echo(specmod.schema_text(), nl=False)


def kubernetes_lines(k: dict[str, Any] | None) -> list[str]:
    """The cluster summary's Kubernetes part: worker group scaling and pod failures."""
    if not k:
        return []
    out = []
    if k.get("raycluster"):
        out.append(f"kubernetes: RayCluster {k.get('namespace')}/{k['raycluster']}, "
                   f"worker group {k.get('worker_group')}")
    sc = k.get("scaling") or {}
    if sc.get("asked_servers"):
        out.append(f"  asked for {sc['asked_servers']} more server(s) {sc['asked_for_s']}s ago")
    if sc.get("draining_nodes"):
        out.append(f"  releasing {len(sc['draining_nodes'])} idle server(s)")
    if sc.get("idle_nodes"):
        rel = sc.get("idle_release_s") or 0
        when = f", released after {rel:g}s idle" if rel > 0 else ", idle release off"
        out.append(f"  {len(sc['idle_nodes'])} idle server(s){when}")
    for what in ("capped", "last_error"):
        if sc.get(what):
            out.append(f"  {sc[what]}")
    for pod, f in sorted((k.get("worker_failures") or {}).items()):
        out.append(f"  pod {pod}: {f.get('reason')}: {f.get('message', '')}".rstrip(": "))
    for key in ("error", "setup_error"):
        if k.get(key):
            out.append(f"  error: {k[key]}")
    return out


@cli.command()
@click.argument("job", required=False, shell_complete=_complete_job)
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text")
@click.pass_obj
def status(c: Ctx, job: str | None, output: str) -> None:
    """Show one job (with attempts) or the cluster summary."""
    if job is None:
        st = c.call("cluster")
        if output == "json":
            click.echo(json.dumps(st))
        else:
            click.echo(f"nodes {st['nodes']}  devices {st['devices']}  free {st['free']}  "
                       f"whole free nodes {st['whole_free_nodes']}  queued {st['queued']}")
            for line in kubernetes_lines(st.get("kubernetes")):
                click.echo(line)
        return
    st = c.call("status", job)
    if st is None:
        click.echo(f"error: no job {job!r} (see `fleet list`)", err=True)
        sys.exit(EXIT_NOT_FOUND)
    if output == "json":
        click.echo(json.dumps(st, indent=2, default=str))
    else:
        for r in st.get("steps") or []:
            click.echo("  " + progress_line(r))
        click.echo(progress_line(st))
        if st.get("message"):
            click.echo(f"message: {st['message']}")
        said: dict[int, list[str]] = {}
        for e in st.get("events", []):
            if e.get("kind") == "last_words":
                said.setdefault(e["attempt"], []).append(e["rank"])
        for a in st.get("attempts", []):
            p = a["plan"]
            end = time.strftime("%H:%M:%S", time.localtime(a["ended"])) if a["ended"] else "-"
            words = f" (last step saved by {', '.join(said[a['n']])})" if a["n"] in said else ""
            click.echo(f"  attempt {a['n']}: {p['devices']} dev micro {p['micro_batch']} "
                       f"accum {p['grad_accum']} start "
                       f"{time.strftime('%H:%M:%S', time.localtime(a['started']))} end {end} "
                       f"{a['status']} {a['reason']}{words}")
        _print_outcome(st) if st["state"] in TERMINAL else None
    if st["state"] in ("FAILED", "CANCELLED"):
        sys.exit(EXIT_FAILED)


@cli.command(name="list")
@click.option("--all", "show_all", is_flag=True, help="Include finished jobs.")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text")
@click.pass_obj
def list_(c: Ctx, show_all: bool, output: str) -> None:
    """List jobs (active ones unless --all)."""
    rows = c.call("list_jobs", show_all)
    if output == "json":
        click.echo(json.dumps(rows, default=str))
        return
    click.echo(f"{'JOB':32} {'KIND':12} {'STATE':11} {'PRIO':>4} {'DEV':>4} {'STEP':>6}  MESSAGE")
    for r in rows:
        step = (r.get("progress") or {}).get("step", "")
        click.echo(f"{r['id']:32} {r['kind']:12} {r['state']:11} {r['priority']:>4} "
                   f"{r.get('devices') or '':>4} {step!s:>6}  {r.get('message', '')[:60]}")


@cli.command()
@click.argument("job", shell_complete=_complete_job)
@click.option("--rank", type=int, default=0, help="Rank whose log to show (default 0).")
@click.option("--scheduler", is_flag=True, help="Show the MindSpore scheduler's log.")
@click.option("--attempt", type=int, default=None, help="Attempt number (default: latest).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.pass_obj
def logs(c: Ctx, job: str, rank: int, scheduler: bool, attempt: int | None,
         follow: bool) -> None:
    """Print a rank's log."""
    if c.call("status", job) is None:
        click.echo(f"error: no job {job!r}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    label = "scheduler" if scheduler else f"rank-{rank}"
    offset, cur_attempt = 0, attempt
    try:
        while True:
            r = c.call("read_log", job, label, offset, cur_attempt)
            if cur_attempt is None and r.get("attempt") is not None:
                cur_attempt = r["attempt"]
            if r.get("data"):
                click.echo(r["data"], nl=False)
                offset = r["offset"]
                continue
            if not follow:
                break
            st = c.call("status", job)
            latest = (st.get("attempts") or [{}])[-1].get("n")
            if attempt is None and latest and latest != cur_attempt:
                click.echo(f"--- attempt {latest} ---")
                cur_attempt, offset = latest, 0
                continue
            if st["state"] in TERMINAL:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


@cli.command()
@click.argument("job", shell_complete=_complete_job)
@click.pass_obj
def cancel(c: Ctx, job: str) -> None:
    """Cancel a job: stops its ranks and frees its devices."""
    r = c.call("cancel", job)
    if "error" in r:
        click.echo(f"error: {r['error']}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    click.echo(f"{r['id']}: {r['state']}" + (" (already finished)" if r.get("already") else ""))


@cli.command()
@click.option("--npus", type=int, default=8, show_default=True,
              help="Stand-in NPU devices the local node advertises.")
@click.option("--num-cpus", type=int, default=None, help="Ray CPUs (default max(4, cores)).")
@click.pass_obj
def up(c: Ctx, npus: int, num_cpus: int | None) -> None:
    """Start a local Ray (127.0.0.1) and the controller, or check --address."""
    from launcher import local
    if c.address:
        st = c.call("ping")
        click.echo(f"controller at {c.address}: {st}")
        return
    st = local.start_local(c.home, num_cpus, npus)
    click.echo(f"local fleet cluster up at {st['address']} ({npus} stand-in NPUs, "
               f"pid {st['pid']}, home {c.home})")


@cli.command()
@click.pass_obj
def down(c: Ctx) -> None:
    """Stop the local cluster started by `fleet up` (running jobs are cancelled)."""
    from launcher import local
    if local.stop_local(c.home):
        click.echo("local fleet cluster stopped")
    else:
        click.echo("no local fleet cluster running")


def _register_optional() -> None:
    # Dashboards/plot commands live in another module that may not exist yet.
    try:
        from launcher import cli_dashboards
    except ImportError:
        return
    for name in ("dashboards", "plot", "metrics"):
        cmd = getattr(cli_dashboards, name, None)
        if isinstance(cmd, click.Command):
            cli.add_command(cmd, name)


_register_optional()


def main() -> None:
    cli(prog_name="fleet")


if __name__ == "__main__":
    main()
