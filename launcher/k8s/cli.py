"""`python -m launcher.k8s ...`: the fleet-controller Deployment's keeper, its probe,
and a diagnostic `watch` of worker failures."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher.k8s.client import KubeClient
from launcher.k8s.errors import KubeError
from launcher.k8s.pod_watcher import PodWatcher
from launcher.store import EXIT_STORE_CORRUPT

log = logging.getLogger(__name__)


def keep_controller(ray_address: str, interval_s: float, alive_file: Path,
                    max_loops: int | None = None, stop: threading.Event | None = None,
                    ensure_argv: list[str] | None = None, home: str = "/var/lib/fleet") -> int:
    """Run `fleet --address ADDR --home HOME up` every interval: it pings the
    controller actor and creates it only if it is missing (after a head restart);
    the new actor resumes every job from the store under HOME (the head's volume)."""
    argv = ensure_argv or ["fleet", "--address", ray_address, "--home", home, "up"]
    stop = stop or threading.Event()
    loops = failures = 0
    while not stop.is_set() and (max_loops is None or loops < max_loops):
        loops += 1
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,  # noqa: S603
                                  timeout=max(interval_s * 8, 120), check=False)
            proc_code = proc.returncode
            ok = proc_code == 0
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, detail, proc_code = False, [str(exc)], None
        failures = 0 if ok else failures + 1
        if not ok:
            log.warning("%s failed (%d in a row): %s", " ".join(argv), failures, detail[0])
        alive_file.parent.mkdir(parents=True, exist_ok=True)
        alive_file.write_text(json.dumps({"ts": time.time(), "ok": ok, "failures": failures}))
        if not ok and proc_code == EXIT_STORE_CORRUPT:
            # no retry can read a corrupt store: stop, so that the pod's restarts and this
            # exit code show it, with the file kept for inspection
            log.error("the job store under %s is corrupt; the keeper stops: %s", home, detail[0])
            return EXIT_STORE_CORRUPT
        if max_loops is None or loops < max_loops:
            stop.wait(interval_s)
    return 0 if failures == 0 else 1


def probe(alive_file: Path, max_age_s: float) -> int:
    try:
        age = time.time() - alive_file.stat().st_mtime
    except OSError:
        print(f"{alive_file} missing: keeper loop has not run yet", file=sys.stderr)
        return 1
    if age > max_age_s:
        print(f"{alive_file} is {age:.0f}s old (> {max_age_s:.0f}s): keeper loop stuck",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.k8s",
                                     description="Kubernetes helpers of ascend-fleet.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    keep = sub.add_parser("keep-controller", help="keep the controller actor running")
    keep.add_argument("--ray-address", required=True)
    keep.add_argument("--interval", type=float, default=15.0)
    keep.add_argument("--home", default="/var/lib/fleet",
                      help="the controller's state directory, on the head pod's volume")
    keep.add_argument("--alive-file", type=Path, default=Path("/tmp/keeper-alive"))  # noqa: S108
    keep.add_argument("--max-loops", type=int, default=None)
    prb = sub.add_parser("probe", help="exit 1 if the keeper loop is stuck")
    prb.add_argument("--alive-file", type=Path, default=Path("/tmp/keeper-alive"))  # noqa: S108
    prb.add_argument("--max-age", type=float, default=120.0)
    watch = sub.add_parser("watch", help="print worker failures as JSON lines")
    watch.add_argument("--raycluster", default=os.environ.get("FLEET_K8S_RAYCLUSTER", "fleet-ray"))
    watch.add_argument("--namespace", default=None)
    watch.add_argument("--kubeconfig", default=None)
    watch.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "keep-controller":
        return keep_controller(args.ray_address, args.interval, args.alive_file, args.max_loops,
                               home=args.home)
    if args.cmd == "probe":
        return probe(args.alive_file, args.max_age)
    try:
        kube = KubeClient.from_environment(args.namespace, args.kubeconfig)
        watcher = PodWatcher(kube, args.raycluster).start()
        for failure in watcher.failures(args.seconds):
            print(json.dumps(failure.to_json()), flush=True)
        watcher.stop()
        if watcher.errors:
            raise watcher.errors[0]
    except KubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
