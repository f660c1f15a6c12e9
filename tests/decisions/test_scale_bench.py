"""bench/scale_reconciler.py at a tiny size: every job placed and running at the end,
the injected failures restarted, the lost servers' jobs moved."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_the_scale_bench_runs_through_the_controller(tmp_path):
    import scale_reconciler

    out = scale_reconciler.run(jobs=60, nodes=24, wave=20, fail=0.2, lose=2, seed=1,
                               home=tmp_path, full_ticks=2)
    assert out["running_at_end"] == 60 and out["waiting_at_end"] == 0
    assert out["failing_jobs"] > 0
    # every job placed once, every failure restarted once more, the lost servers' jobs again
    assert out["placements"] >= 60 + out["failing_jobs"]
    assert out["restarts_in_place"] > 0
    assert out["placements_per_s_end_to_end"] > 0 and out["tick_ms_median_full"] > 0
