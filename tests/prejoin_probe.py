"""A rank for the prejoin tests (python -m prejoin_probe SECONDS CODE): holds like the VOLO
train loop when FLEET_HOLD=1 (workloads/volo/prejoin.py), then reports a step, prints what
it runs with, and sleeps or exits with the code it is given."""

import json
import os
import sys
import time

from launcher import contract
from workloads.volo import prejoin

STANDBY_PRELOAD = ("prejoin_probe_slow",)  # a slow import, when a test asks for one


def main() -> int:
    held = prejoin.holding()
    if held:
        print(f"rank 0: {prejoin.HOLDING}", flush=True)
        try:
            prejoin.wait_for_go()
        except prejoin.Released:
            return 0
    with open(os.environ["FLEET_HEARTBEAT"], "a") as f:
        f.write(json.dumps({"event": "step", "step": 1, "rank": 0}) + "\n")
    print(json.dumps({"pid": os.getpid(), "attempt": os.environ.get("FLEET_ATTEMPT"),
                      "held": held, "hold_env": os.environ.get(contract.HOLD_ENV),
                      "spawn_ts": os.environ.get("FLEET_SPAWN_TS"),
                      "argv": sys.argv[1:]}), flush=True)
    time.sleep(float(sys.argv[1]))
    return int(sys.argv[2])


if __name__ == "__main__":
    sys.exit(main())
