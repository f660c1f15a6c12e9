"""Preloaded by standby_probe: records the scheduling policy its import ran under."""

import os

IMPORT_POLICY = os.sched_getscheduler(0)
