"""`fleet`: the command-line front door (click).

The exit codes are listed in EPILOG (`fleet --help`); docs/cli.md is the user guide.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from launcher import jobref, progress_view
from launcher import local as _local  # noqa: F401 - sets Ray's loopback env before ray loads
from launcher import spec as specmod

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NO_CLUSTER = 0, 1, 2, 3
EXIT_NOT_FOUND = jobref.EXIT_NOT_FOUND
EXIT_INTERRUPTED = 130
TERMINAL = progress_view.TERMINAL

EPILOG = """\b
Exit codes:
  0    ok
  1    the job failed or was cancelled (--wait, or status of a finished job)
  2    invalid spec, usage or setting
  3    no cluster reachable: nothing at the address (fails within 3 s), no Ray
       answer within FLEET_CONNECT_TIMEOUT_S (default 30 s), or the controller
       did not come back from a restart within 120 s
  4    no such job, step, attempt or rank (the error names what exists)
  5    the job store (fleet.db) is corrupt: the file is named and left as it is
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): submitted jobs keep running
\b
JOB is a job id (smoke-3) or WORKFLOW/STEP (quickstart-1/train); `fleet list
--all` shows both.
\b
Examples:
  fleet submit examples/quickstart.yaml --wait     # starts a local cluster if needed
  fleet submit examples/quickstart.yaml --set 'spec.steps[train].spec.batch.global=128' --dry-run
  fleet validate job.yaml
  fleet list --all
  fleet status quickstart-1/train --output json
  fleet logs quickstart-1/train --rank 1 --follow
  fleet cancel quickstart-1
  fleet up / fleet down                            # local Ray on 127.0.0.1 + controller
  fleet schema > fleet-job.schema.json             # for editor completion
\b
Cluster: --address or RAY_ADDRESS; otherwise the local cluster of `fleet up`
(state in $FLEET_HOME, default ~/.fleet).
Shell completion: eval "$(_FLEET_COMPLETE=bash_source fleet)"
"""


# Queries answered from the durable store when no cluster is running.
OFFLINE_METHODS = {"status", "list_jobs", "read_log"}
# Calls that change state and are not safe to send twice when the controller died
# mid-call (Ray cannot say whether it ran); every other call is retried.
NOT_REPEATABLE = {"submit"}
RESTART_WAIT_S = 120.0
RESTART_POLL_S = 1.0


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
            except local.Unreachable as e:
                click.echo(f"error: {e}", err=True)
                # A ray.init still retrying in its thread would hold up a normal exit.
                _exit_now(EXIT_NO_CLUSTER)
            except (ConnectionError, RuntimeError) as e:
                click.echo(f"error: cannot reach the cluster: {e}", err=True)
                sys.exit(EXIT_NO_CLUSTER)
            except ValueError as e:  # a bad setting such as FLEET_CONNECT_TIMEOUT_S
                click.echo(f"error: {e}", err=True)
                sys.exit(EXIT_INVALID)
        return self._ctl

    def call(self, method: str, *args, timeout: float = 60.0, start: bool = False):
        if method in OFFLINE_METHODS and self._ctl is None and self._offline_ok():
            from launcher.controller import OfflineView
            return getattr(OfflineView(self.home), method)(*args)
        ctl = self.controller(start)
        import ray
        back_by: float | None = None
        while True:
            try:
                out = ray.get(getattr(ctl, method).remote(*args), timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                click.echo(f"error: controller did not answer {method} within {timeout:.0f}s",
                           err=True)
                sys.exit(EXIT_NO_CLUSTER)
            except ray.exceptions.RayTaskError as e:
                # the controller refused the request itself (a full queue, a checkpoint
                # directory in use, a path outside the configured roots)
                if isinstance(e.cause, specmod.SpecError):
                    click.echo(e.cause.render(), err=True)
                    sys.exit(EXIT_INVALID)
                raise
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    # its constructor raised: Ray does not restart it, so waiting is no use
                    code, why = _controller_start_failure(str(getattr(e, "error_msg", e)))
                    click.echo(f"error: {why}", err=True)
                    sys.exit(code)
                # Ray restarts the detached controller (max_restarts=-1) and its __init__
                # reattaches to running jobs; a query only has to wait for it.
                if method in NOT_REPEATABLE:
                    click.echo(f"error: the controller restarted during {method}; it may or "
                               "may not have been applied - check `fleet list --all` before "
                               "trying again", err=True)
                    sys.exit(EXIT_NO_CLUSTER)
                now = time.monotonic()
                if back_by is None:
                    back_by = now + RESTART_WAIT_S
                    click.echo(f"controller restarting… (waiting up to {RESTART_WAIT_S:.0f}s)",
                               err=True)
                elif now > back_by:
                    click.echo(f"error: the controller did not come back within "
                               f"{RESTART_WAIT_S:.0f}s; check the Ray head (`ray status`) and its logs",
                               err=True)
                    sys.exit(EXIT_NO_CLUSTER)
                time.sleep(RESTART_POLL_S)
                continue
            if back_by is not None:
                click.echo("controller back", err=True)
            return out

    def status(self, ref: str) -> dict[str, Any]:
        """The status of the job `ref` names (an id or WORKFLOW/STEP), or exit 4."""
        return jobref.resolve(ref, lambda j: self.call("status", j))


def _controller_start_failure(error_msg: str) -> tuple[int, str]:
    """(exit code, one line) for a controller whose constructor raised, from Ray's report
    of it (the traceback's last line names the exception)."""
    from launcher.store import EXIT_STORE_CORRUPT, StoreCorrupt

    last = next((ln.strip() for ln in reversed(error_msg.splitlines()) if ln.strip()), "")
    marker = f"{StoreCorrupt.__name__}: "
    if marker in last:
        return EXIT_STORE_CORRUPT, last.split(marker, 1)[1]
    return EXIT_NO_CLUSTER, f"the controller failed to start: {last[:500]}"


def _exit_now(code: int) -> None:
    """Exit without Ray's atexit shutdown, which waits on a connection still retrying."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _on_sigterm(signum: int, _frame: object) -> None:
    progress_view.restore_terminal()
    click.echo("terminated; submitted jobs keep running", err=True)
    _exit_now(128 + signum)


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
    from launcher import ranks

    try:
        job, doc = specmod.load_file(file, list(sets))
        paths = specmod.check_paths(job, file, create_data=True)
        level = ranks.mindspore_log_level(os.environ.get(ranks.MINDSPORE_LOG_LEVEL_ENV))
    except specmod.SpecError as e:
        click.echo(e.render(), err=True)
        sys.exit(EXIT_INVALID)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_INVALID)
    # base and workdir let the controller resolve the spec's relative paths itself
    ctx = {"workdir": str(specmod.project_root(Path(file))), "steps": paths,
           "base": str(Path(file).resolve().parent), ranks.MINDSPORE_LOG_LEVEL_KEY: level}
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
                           env=specmod.maker_env(dict(os.environ), ctx["workdir"]))
        if r.returncode != 0 or not d.is_dir():
            click.echo(f"error: creating {d} failed (exit {r.returncode})", err=True)
            sys.exit(EXIT_INVALID)


def _dry_run(job, ctx: dict, home: Path) -> dict:
    from launcher import ranks, workloads
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
            describe = workloads.adapter(sp.workload).describe_recipe
            if describe is not None:
                step["precision"] = describe(ctx["steps"][name]["config"], sp.overrides)
        else:
            from launcher.planner import NodeSlice, Plan
            plan = Plan(1, 1, 1, (NodeSlice("node-0", (0,)),)) if kind == "ValidateJob" \
                else Plan(0, 0, 0, (NodeSlice("node-0", ()),))
        paths = dict(ctx["steps"][name], workdir=ctx["workdir"])
        if ranks.MINDSPORE_LOG_LEVEL_KEY in ctx:
            paths[ranks.MINDSPORE_LOG_LEVEL_KEY] = ctx[ranks.MINDSPORE_LOG_LEVEL_KEY]
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

def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _wait(c: Ctx, job_id: str, live: bool, interval: float = 1.0) -> int:
    """Follow a job to its end: exit 0 if it succeeded, 1 if not, 130 on Ctrl-C."""
    view = progress_view.make_view(live)
    try:
        while True:
            st = c.call("status", job_id)
            if st is None:
                view.close()
                click.echo(f"error: job {job_id} disappeared", err=True)
                return EXIT_NOT_FOUND
            view.show(st)
            if st["state"] in TERMINAL:
                view.close()
                _print_outcome(st)
                return EXIT_OK if st["state"] == "SUCCEEDED" else EXIT_FAILED
            time.sleep(interval)
    except KeyboardInterrupt:
        view.close()
        click.echo(f"\ninterrupted; {job_id} keeps running (fleet status {job_id} --watch)",
                   err=True)
        return EXIT_INTERRUPTED


def _live_ok(output: str) -> bool:
    """The live view only on a terminal and for text output; plain lines otherwise."""
    return output == "text" and sys.stdout.isatty()


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
    """Job ids and WORKFLOW/STEP names from the local store (no cluster round trip)."""
    from launcher.local import fleet_home
    from launcher.store import Store

    db = fleet_home() / "fleet.db"
    if not db.exists():
        return []
    try:
        names = [n for j in Store(db).jobs() for n in (
            j.id, *([jobref.step_ref(j.parent, j.step)] if j.parent and j.step else []))]
        return [n for n in names if n.startswith(incomplete)][-50:]
    except Exception:  # noqa: BLE001 - completion must never crash the shell
        return []


# ------------------------------------------------------------------ commands

SET_HELP = ("Override a spec field (repeatable). A single job: --set spec.batch.global=128; "
            "a Workflow step by index or name: --set 'spec.steps[0].spec.batch.global=128' "
            "or --set 'spec.steps[train].spec.overrides.epoch_size=1'. Values are YAML "
            "scalars or [lists].")


@cli.command(short_help="Validate a spec and submit it.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
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
        sys.exit(_wait(c, res["id"], _live_ok(output)))


@cli.command(short_help="Check a spec without submitting it.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
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


@cli.command(short_help="Print the job spec's JSON Schema.")
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


@cli.command(short_help="Show a job, or the cluster summary.")
@click.argument("job", required=False, shell_complete=_complete_job)
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text")
@click.option("--watch", "-w", is_flag=True,
              help="Follow the job until it ends, as `submit --wait` does.")
@click.pass_obj
def status(c: Ctx, job: str | None, output: str, watch: bool) -> None:
    """Show one job (with attempts) or the cluster summary."""
    if watch:
        if job is None:
            raise click.UsageError("--watch needs a JOB")
        sys.exit(_wait(c, c.status(job)["id"], _live_ok(output)))
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
    st = c.status(job)
    if output == "json":
        click.echo(json.dumps(st, indent=2, default=str))
    else:
        for r in st.get("steps") or []:
            click.echo("  " + progress_view.progress_line(r))
        click.echo(progress_view.progress_line(st))
        if st.get("message"):
            click.echo(f"message: {st['message']}")
        said: dict[int, list[str]] = {}
        for e in st.get("events", []):
            if e.get("kind") == "last_words":
                said.setdefault(e["attempt"], []).append(e["rank"])
        for a in st.get("attempts", []):
            p = a["plan"]
            end = _clock(a["ended"]) if a["ended"] else "-"
            words = f" (last step saved by {', '.join(said[a['n']])})" if a["n"] in said else ""
            click.echo(f"  attempt {a['n']}: {p['devices']} dev micro {p['micro_batch']} "
                       f"accum {p['grad_accum']} start "
                       f"{_clock(a['started'])} end {end} "
                       f"{a['status']} {a['reason']}{words}")
        for e in st.get("events", []):
            if e.get("kind") == "reattached":
                click.echo(f"  controller restarted at {_clock(e['ts'])}: reattached to the "
                           f"running ranks of attempt {e['attempt']}")
        _print_outcome(st) if st["state"] in TERMINAL else None
    if st["state"] in ("FAILED", "CANCELLED"):
        sys.exit(EXIT_FAILED)


@cli.command(name="list", short_help="List jobs and their workflow steps.")
@click.option("--all", "show_all", is_flag=True, help="Include finished jobs.")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text")
@click.pass_obj
def list_(c: Ctx, show_all: bool, output: str) -> None:
    """List jobs (active ones unless --all)."""
    rows = c.call("list_jobs", show_all)
    if output == "json":
        click.echo(json.dumps(rows, default=str))
        return
    for line in list_lines(rows):
        click.echo(line)


def list_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The `fleet list` table: a Workflow's step jobs indented under it, each as
    `WORKFLOW/STEP = ID` (either name addresses the step in status/logs/plot/cancel)."""
    table: list[tuple[str, dict[str, Any]]] = []
    for r in rows:
        table.append((r["id"], r))
        for s in r.get("steps") or []:
            table.append((f"  {jobref.step_ref(r['id'], s['step'])} = {s['id']}", s))
    w = max([32, *(len(name) for name, _ in table)])
    out = [f"{'JOB':{w}} {'KIND':12} {'STATE':11} {'PRIO':>4} {'DEV':>4} {'STEP':>6}  MESSAGE"]
    for name, r in table:
        step = (r.get("progress") or {}).get("step", "")
        out.append(f"{name:{w}} {r['kind']:12} {r['state']:11} {r['priority']:>4} "
                   f"{r.get('devices') or '':>4} {step!s:>6}  {r.get('message', '')[:60]}")
    return out


@cli.command(short_help="Print a rank's log (or each step's).")
@click.argument("job", shell_complete=_complete_job)
@click.option("--rank", type=int, default=0, help="Rank whose log to show (default 0).")
@click.option("--scheduler", is_flag=True, help="Show the MindSpore scheduler's log.")
@click.option("--attempt", type=int, default=None, help="Attempt number (default: latest).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.pass_obj
def logs(c: Ctx, job: str, rank: int, scheduler: bool, attempt: int | None,
         follow: bool) -> None:
    """Print a rank's log (a Workflow: each step's, prefixed with its name)."""
    st = c.status(job)
    want = None if scheduler else rank
    try:
        if st["kind"] != "Workflow":
            _job_log(c, st, want, attempt, follow, prefix="")
            return
        shown = 0
        for step in st.get("steps") or []:
            prefix = f"[{step['step']}] "
            try:
                _job_log(c, step, want, attempt, follow, prefix)
                shown += 1
            except jobref.NotFound as e:
                click.echo(f"{prefix}{e.message}", err=True)
        if not shown:
            raise jobref.NotFound(f"no step of workflow {st['id']!r} has that log; its "
                                  "steps: " + ", ".join(jobref.step_names(st)))
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _job_log(c: Ctx, st: dict, rank: int | None, attempt: int | None, follow: bool,
             prefix: str) -> None:
    """Print one job's log; with follow, until the job ends (moving on to new attempts)."""
    while follow and not st.get("attempts") and st["state"] not in TERMINAL:
        time.sleep(0.5)  # a step that has not started yet
        st = c.call("status", st["id"])
    att = jobref.pick_attempt(st, attempt)
    jobref.check_rank(st, att, rank)
    label = "scheduler" if rank is None else f"rank-{rank}"
    cur, offset, partial = att["n"], 0, False
    while True:
        r = c.call("read_log", st["id"], label, offset, cur)
        if r.get("data"):
            _echo_prefixed(r["data"], prefix, partial)
            partial = not r["data"].endswith("\n")
            offset = r["offset"]
            continue
        if not follow:
            break
        st = c.call("status", st["id"])
        latest = (st.get("attempts") or [{}])[-1].get("n")
        if attempt is None and latest and latest != cur:
            click.echo(f"{prefix}--- attempt {latest} ---")
            cur, offset, partial = latest, 0, False
            continue
        if st["state"] in TERMINAL:
            break
        time.sleep(0.5)


def _echo_prefixed(data: str, prefix: str, partial: bool) -> None:
    if prefix:
        lines = data.splitlines(keepends=True)
        data = "".join(ln if (k == 0 and partial) else prefix + ln
                       for k, ln in enumerate(lines))
    click.echo(data, nl=False)


@cli.command(short_help="Cancel a job and free its devices.")
@click.argument("job", shell_complete=_complete_job)
@click.pass_obj
def cancel(c: Ctx, job: str) -> None:
    """Cancel a job: stops its ranks and frees its devices."""
    r = c.call("cancel", c.status(job)["id"])
    if "error" in r:  # gone between the two calls
        raise jobref.no_such_job(job)
    click.echo(f"{r['id']}: {r['state']}" + (" (already finished)" if r.get("already") else ""))


@cli.command(short_help="Start the local cluster, or check --address.")
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


@cli.command(short_help="Stop the local cluster.")
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
    from launcher.store import EXIT_STORE_CORRUPT, StoreCorrupt

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Not standalone: click would turn Ctrl-C into "Aborted!" and exit 1.
        rv = cli.main(prog_name="fleet", standalone_mode=False)
    except StoreCorrupt as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_STORE_CORRUPT)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("\ninterrupted; submitted jobs keep running", err=True)
        _exit_now(EXIT_INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":
    main()
