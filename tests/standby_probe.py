"""A rank for the standby tests: reports a step, prints what it was started with, then
sleeps or exits with the code it is given (python -m standby_probe SECONDS CODE)."""

import json
import os
import sys
import time

STANDBY_PRELOAD = ("standby_probe_policy",)  # a module the probe does not import itself


def main() -> int:
    seconds, code = float(sys.argv[1]), int(sys.argv[2])
    with open(os.environ["FLEET_HEARTBEAT"], "a") as f:
        f.write(json.dumps({"event": "step", "step": 1, "rank": 0}) + "\n")
    print(json.dumps({"pid": os.getpid(), "attempt": os.environ.get("FLEET_ATTEMPT"),
                      "standby": os.environ.get("FLEET_STANDBY"), "cwd": os.getcwd(),
                      "argv": sys.argv[1:],
                      "import_policy": getattr(sys.modules.get("standby_probe_policy"),
                                               "IMPORT_POLICY", None),
                      "run_policy": os.sched_getscheduler(0)}), flush=True)
    time.sleep(seconds)
    return code


if __name__ == "__main__":
    sys.exit(main())
