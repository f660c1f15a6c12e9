"""Which of the head's ports do a worker node's processes connect to?

    python bench/ray_node_ports.py        # needs ray[default,client]==2.60.0 (the image's Ray)

The evidence for k8s/base/networkpolicy.yaml's worker -> head rule. Starts a two-node
Ray cluster on 127.0.0.1 with token authentication and every port fixed (the head's as in
k8s/base/raycluster.yaml, the worker node's shifted by 1000 so both fit on one host), then
runs what the fleet does over the Ray client: a detached controller actor on the head
creates an agent actor on the worker node, hands it an object the controller owns, the
agent calls the controller back and returns a large result, and tasks run on the worker.
While that runs it samples every TCP connection of the two nodes' processes and prints,
per destination port, which process on one node connected to which on the other.

Stops only its own processes (those whose command line names its temporary directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time

import psutil

HEAD = {"port": 6379, "ray-client-server-port": 10001, "dashboard-port": 8265,
        "node-manager-port": 6380, "object-manager-port": 6381, "runtime-env-agent-port": 6382,
        "dashboard-agent-grpc-port": 6383, "dashboard-agent-listen-port": 52365,
        "min-worker-port": 10002, "max-worker-port": 19999, "metrics-export-port": 8080}
WORKER = {k: v + 1000 for k, v in HEAD.items()
          if k not in {"port", "ray-client-server-port", "dashboard-port"}}
WORKER["max-worker-port"] = 21999
WORKER["min-worker-port"] = 20002

DRIVER = r'''
import sys, time
import numpy as np
import ray
ray.init(address=sys.argv[1], namespace="probe", log_to_driver=False)

@ray.remote
class Agent:
    def work(self, refs):
        arr = ray.get(refs[0])  # owned by the controller: pulled from the head
        ray.get(ray.get_actor("controller", namespace="probe").ping.remote())
        return np.ones(2_000_000), float(arr.sum())

@ray.remote
class Controller:
    def ping(self):
        return 1
    def run(self):
        agent = Agent.options(resources={"worker": 0.5}).remote()
        big, total = ray.get(agent.work.remote([ray.put(np.ones(2_000_000))]))
        @ray.remote(num_cpus=0)
        def task(x):
            return x + 1
        out = ray.get([task.options(resources={"worker": 0.01}).remote(i) for i in range(3)])
        time.sleep(12)  # let the sampler see the connections
        return big.shape, total, out

c = Controller.options(name="controller", lifetime="detached", max_concurrency=8,
                       resources={"head": 0.01}).remote()
print(ray.get(c.run.remote()))
'''


def _tree(proc: psutil.Process) -> set[int]:
    try:
        return {proc.pid} | {c.pid for c in proc.children(recursive=True)}
    except psutil.Error:
        return set()


def _connections(pids: set[int]) -> list[tuple[str, object]]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out += [(proc.name(), c) for c in proc.net_connections("tcp")]
        except psutil.Error:
            pass
    return out


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="fleet-ports-")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus=1", f"--temp-dir={tmp}", "--node-ip-address=127.0.0.1"]
    head = [ray_cli, "start", "--head", "--include-dashboard=true", "--dashboard-host=0.0.0.0",
            *(f"--{k}={v}" for k, v in HEAD.items()), '--resources={"head": 1}', *common]
    worker = [ray_cli, "start", f"--address=127.0.0.1:{HEAD['port']}",
              *(f"--{k}={v}" for k, v in WORKER.items()), '--resources={"worker": 1}', *common]
    seen: dict[str, dict[int, set[str]]] = {"worker -> head": {}, "head -> worker": {}}
    try:
        for argv in (head, worker):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, f"ray://127.0.0.1:{HEAD['ray-client-server-port']}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while driver.poll() is None and time.time() < deadline:
            procs = [q for q in psutil.process_iter(["cmdline", "name"])
                     if tmp in " ".join(q.info["cmdline"] or [])]

            def raylet(port: int) -> list[psutil.Process]:
                return [q for q in procs if "raylet" in (q.info["name"] or "")  # noqa: B023
                        and f"--node_manager_port={port}" in " ".join(q.info["cmdline"])]

            wset = set().union(*(_tree(q) for q in raylet(WORKER["node-manager-port"])))
            for q in procs:  # the worker node's agents, by their ports
                if any(str(WORKER[k]) in " ".join(q.info["cmdline"]) for k in
                       ("dashboard-agent-grpc-port", "runtime-env-agent-port")):
                    wset |= _tree(q)
            hset = set().union(*(_tree(q) for q in procs)) - wset
            hconn, wconn = _connections(hset), _connections(wset)
            listen = {side: {c.laddr.port: n for n, c in conns if c.status == "LISTEN"}
                      for side, conns in (("head", hconn), ("worker", wconn))}
            for label, conns, src, dst in (("worker -> head", wconn, "worker", "head"),
                                           ("head -> worker", hconn, "head", "worker")):
                for name, c in conns:
                    if (c.status == "ESTABLISHED" and c.raddr and c.raddr.port in listen[dst]
                            and c.laddr.port not in listen[src]):
                        seen[label].setdefault(c.raddr.port, set()).add(
                            f"{name} -> {listen[dst][c.raddr.port]}")
            time.sleep(0.3)
        out, err = driver.communicate(timeout=60)
        if driver.returncode:
            print(err[-2000:], file=sys.stderr)
            return 1
        print(json.dumps({"head_ports": HEAD, "worker_ports": WORKER,
                          **{k: {p: sorted(v) for p, v in sorted(d.items())}
                             for k, d in seen.items()}}, indent=1))
        return 0
    finally:
        mine = [q for q in psutil.process_iter(["cmdline"])
                if tmp in " ".join(q.info["cmdline"] or []) and q.pid != os.getpid()]
        for q in mine:
            with contextlib.suppress(psutil.Error):
                q.terminate()
        for q in psutil.wait_procs(mine, timeout=15)[1]:
            with contextlib.suppress(psutil.Error):
                q.kill()


if __name__ == "__main__":
    sys.exit(main())
