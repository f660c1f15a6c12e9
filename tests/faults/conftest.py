"""Fault-injection suite setup: the harness on sys.path and the summary table.

The table (fault, recovered, recovery seconds, steps lost, samples replayed) is
printed once at the end of the session by `pytest_terminal_summary`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faults_harness import RESULTS, format_table  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    terminalreporter.section("fault injection summary")
    terminalreporter.write_line(format_table(RESULTS))
