"""`fleet plot`: one PNG of a real tiny run's history, checked as an image."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from metrics_tiny_trainer import run_ranks
from PIL import Image

from launcher.cli_dashboards import plot_command
from launcher.metrics_history import RunHistory
from launcher.plot import render

JOB = "plot-digits-1"

# Matplotlib's default colours of the four panels' main lines (launcher/plot.py).
PANEL_COLOURS = {
    "loss (top left)": ((0, 0), (0x1F, 0x77, 0xB4)),
    "images/s (top right)": ((1, 0), (0x2C, 0xA0, 0x2C)),
    "top-1 (bottom left)": ((0, 1), (0x94, 0x67, 0xBD)),
    "global batch (bottom right)": ((1, 1), (0x8C, 0x56, 0x4B)),
}


def run_job(job_dir: Path, attempt: int, world: int, accum: int, steps: int) -> None:
    run_ranks(attempt=attempt, world=world, accum=accum, steps=steps,
              ckpt_dir=job_dir / "checkpoints",
              heartbeat=lambda r: job_dir / f"attempt-{attempt}" / f"rank-{r}.heartbeat.jsonl",
              every=4,
              # a step time set by the sleep, not by machine load, keeps images/s a visible line
              extra=["--min-step-seconds", "0.1"])


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A fleet home with one job: 2 ranks for 8 steps, then resumed on 1 rank to 20."""
    home = tmp_path_factory.mktemp("home")
    job_dir = home / "jobs" / JOB
    run_job(job_dir, attempt=0, world=2, accum=1, steps=8)
    run_job(job_dir, attempt=1, world=1, accum=2, steps=20)
    return home


def colour_pixels(img: Image.Image, quadrant: tuple[int, int], rgb: tuple[int, int, int]) -> int:
    w, h = img.size
    qx, qy = quadrant
    box = img.crop((qx * w // 2, qy * h // 2, (qx + 1) * w // 2, (qy + 1) * h // 2))
    return sum(
        n for n, px in box.getcolors(maxcolors=1 << 20)
        if all(abs(a - b) <= 12 for a, b in zip(px[:3], rgb, strict=True))
    )


def test_history_of_the_run(home):
    history = RunHistory.load(JOB, home / "jobs" / JOB)
    assert [s.world_size for s in history.starts()] == [2, 1]
    assert [s.grad_accum for s in history.starts()] == [1, 2]
    assert len(history.restart_times()) == 1
    loss = history.loss()
    assert len(loss) >= 20 and min(loss.y) < loss.y[0]
    assert len(history.top1()) >= 4
    assert len(history.loss().segments()) == 2  # the line breaks at the restart


def test_fleet_plot_writes_a_png_with_four_drawn_panels(home, tmp_path):
    out = tmp_path / "run.png"
    res = CliRunner().invoke(plot_command, [JOB, "--out", str(out)],
                             env={"FLEET_HOME": str(home)})
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "1200x900" in res.output
    with Image.open(out) as img:
        img.verify()  # a truncated or corrupt PNG raises here
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1200, 900)
        rgb = img.convert("RGB")
        for panel, (quadrant, colour) in PANEL_COLOURS.items():
            assert colour_pixels(rgb, quadrant, colour) > 200, f"{panel} panel has no line"
        # Restart marker (tab:red dashed) appears in every panel.
        for quadrant, _ in PANEL_COLOURS.values():
            assert colour_pixels(rgb, quadrant, (0xD6, 0x27, 0x28)) > 20


def test_render_reports_points_per_panel(home, tmp_path):
    history = RunHistory.load(JOB, home / "jobs" / JOB)
    result = render(history, tmp_path / "p.png")
    # One point per step drawn: the lr line shares the loss line's steps.
    assert result.panels["Loss and learning rate"] == len(history.loss())
    assert result.panels["Throughput"] == len(history.images_per_second())
    assert result.panels["Validation top-1"] == len(history.top1())
    assert result.panels["Devices × micro-batch × accumulation = global batch"] == 2
    assert result.ylabels["Throughput"] == "images/s"
    assert result.ylabels["Validation top-1"] == "top-1 accuracy (%)"
    assert all(result.ylabels.values()), result.ylabels


def test_fleet_plot_says_what_it_drew(home, tmp_path):
    res = CliRunner().invoke(plot_command, [JOB, "--out", str(tmp_path / "p.png")],
                             env={"FLEET_HOME": str(home)})
    n = len(RunHistory.load(JOB, home / "jobs" / JOB).loss())
    assert f"Loss and learning rate: {n} steps;" in res.output, res.output
    assert "global batch: 2 starts" in res.output


def test_a_job_that_only_started_still_plots(tmp_path):
    (tmp_path / "r.jsonl").write_text(
        '{"event":"start","ts":1.0,"rank":0,"attempt":0,"world_size":1,"micro_batch":8,'
        '"grad_accum":1,"global_batch":8,"resumed_step":0}\n'
    )
    result = render(RunHistory.load("just-started", tmp_path), tmp_path / "p.png")
    assert result.panels["Loss and learning rate"] == 0
    assert result.panels["Devices × micro-batch × accumulation = global batch"] == 1


def test_unknown_job_is_a_clear_error(tmp_path):
    (tmp_path / "jobs" / "other-1").mkdir(parents=True)
    res = CliRunner().invoke(plot_command, ["missing-1"], env={"FLEET_HOME": str(tmp_path)})
    assert res.exit_code != 0
    assert "no job 'missing-1'" in res.output and "other-1" in res.output


def test_out_must_be_png(home, tmp_path):
    res = CliRunner().invoke(plot_command, [JOB, "--out", str(tmp_path / "x.jpg")],
                             env={"FLEET_HOME": str(home)})
    assert res.exit_code != 0 and ".png" in res.output
    assert not (tmp_path / "x.jpg").exists()
