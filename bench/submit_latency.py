"""Submit -> first optimizer step latency on a warm local cluster.

    .venv/bin/python bench/submit_latency.py [--runs 5] [--devices 2] [--volo]

Starts (or reuses) the local cluster of `fleet up` in a private FLEET_HOME,
warms it with one job, then submits `--runs` jobs one after another and reads
the timeline of each from the store and the ranks' heartbeat files:

  submit -> SCHEDULING (controller decided) -> RUNNING (placement group,
  agents and rank processes up) -> "start" heartbeat (rank imported its code)
  -> first "step" heartbeat.

By default the ranks run `workload: smoke` (no model), which measures the
launcher itself: the goal is <= 3 s. With --volo the ranks run the real tiny
VOLO recipe and the first step includes MindSpore's graph compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def doc(name: str, devices: int, volo: bool) -> dict:
    spec = {
        "workload": "volo" if volo else "smoke",
        "config": "workloads/volo/configs/volo_tiny_digits.yaml",
        "overrides": {"max_steps": 2} if volo else {"max_steps": 3, "step_seconds": 0.01},
        "data": {"dir": "data/digits"},
        "resources": {"deviceType": "CPU", "devices": {"min": devices, "max": devices},
                      "cpusPerDevice": 1 if volo else 0.1},
        "batch": {"global": 32 * devices, "microBatchMax": 32},
    }
    return {"apiVersion": "fleet/v1", "kind": "TrainJob", "metadata": {"name": name},
            "spec": spec}


def first_event(path: Path, kind: str) -> float | None:
    try:
        for line in path.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("event") == kind:
                return float(ev["ts"])
    except (OSError, ValueError):
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--volo", action="store_true")
    ap.add_argument("--home", type=Path, default=None)
    a = ap.parse_args()
    home = a.home or Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    os.environ["FLEET_HOME"] = str(home)

    from launcher import local

    import_t = time.time()
    ctl = local.connect(None, home, start=True)
    import ray

    print(f"cluster ready in {time.time() - import_t:.1f}s (home {home})")
    data = REPO / "data" / "digits"
    if a.volo and not data.is_dir():
        import subprocess
        subprocess.run([sys.executable, "-m", "workloads.volo.digits", "--out", str(data)],
                       check=True, cwd=REPO)
    data.mkdir(parents=True, exist_ok=True)
    paths = {"workdir": str(REPO), "steps": {}}
    rows = []
    for i in range(a.runs + 1):  # run 0 warms the cluster (worker processes, imports)
        name = f"lat{i}"
        paths["steps"] = {name: {"config": str(REPO / doc(name, 1, a.volo)["spec"]["config"]),
                                 "data_dir": str(data)}}
        t0 = time.time()
        jid = ray.get(ctl.submit.remote(doc(name, a.devices, a.volo), paths))["id"]
        deadline = time.time() + (900 if a.volo else 120)
        st = None
        while time.time() < deadline:
            st = ray.get(ctl.status.remote(jid))
            if st["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.1)
        if st["state"] != "SUCCEEDED":
            print(f"{jid}: {st['state']} {st['message']}")
            return 1
        ev = {e["state"]: e["ts"] for e in st["events"] if e["kind"] == "state"}
        hb = home / "jobs" / jid / "attempt-1" / "rank-0.heartbeat.jsonl"
        row = {"job": jid, "scheduling": ev["SCHEDULING"] - t0, "running": ev["RUNNING"] - t0,
               "rank_start": (first_event(hb, "start") or float("nan")) - t0,
               "first_step": (first_event(hb, "step") or float("nan")) - t0}
        if i == 0:
            print("warm-up:", {k: round(v, 2) if isinstance(v, float) else v
                               for k, v in row.items()})
            continue
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    summary = {k: round(statistics.median(r[k] for r in rows), 2)
               for k in ("scheduling", "running", "rank_start", "first_step")}
    print(json.dumps({"devices": a.devices, "workload": "volo" if a.volo else "smoke",
                      "runs": a.runs, "median_seconds_after_submit": summary}, indent=2))
    ray.shutdown()
    if a.home is None:
        local.stop_local(home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
