"""Imported by prejoin_probe's standby (STANDBY_PRELOAD): takes PROBE_IMPORT_SECONDS, so a
test can promote the process while it is still importing."""

import os
import time

time.sleep(float(os.environ.get("PROBE_IMPORT_SECONDS", "0")))
