"""Render a run's main training panels into one PNG, without any server.

The same panels as the Grafana "Training" dashboard, from the same heartbeat
history the exporter reads: loss and lr, images/s, top-1, devices ×
micro-batch × accumulation = global batch; restarts drawn as dashed lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

# Headless: no display on servers and CI; must be chosen before pyplot loads.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from launcher.metrics_history import RunHistory, Series  # noqa: E402

FIGSIZE = (12.0, 9.0)
DPI = 100
RESTART_COLOR = "tab:red"
# What one point of each panel is, in drawing order.
POINT_UNITS = ("steps", "steps", "validations", "starts")


@dataclass(frozen=True)
class PlotResult:
    path: Path
    width: int
    height: int
    # panel title -> how many x positions it draws (loss and lr share one per step)
    panels: dict[str, int]
    # panel title -> its left y axis label, unit included
    ylabels: dict[str, str]
    # panel title -> what one point is ("steps", "validations", "starts")
    units: dict[str, str]


def _mark_restarts(ax: Axes, restarts: list[float]) -> None:
    for i, t in enumerate(restarts):
        ax.axvline(t, color=RESTART_COLOR, linestyle="--", linewidth=1.0,
                   label="restart" if i == 0 else None)


def _lines(ax: Axes, series: Series, color: str, label: str, **kw: object) -> None:
    for i, (t, y) in enumerate(series.segments()):
        ax.plot(t, y, color=color, label=label if i == 0 else None, **kw)


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} reported yet", ha="center", va="center",
            transform=ax.transAxes, color="grey")


def render(history: RunHistory, out: Path) -> PlotResult:
    """Draw the four panels to ``out`` (PNG); returns what was drawn."""
    restarts = history.restart_times()
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI, sharex=True)
    (ax_loss, ax_ips), (ax_top1, ax_batch) = axes
    drawn: dict[str, int] = {}
    try:
        fig.suptitle(f"{history.job}: {history.progress().state}, "
                     f"{len(restarts)} restart(s)")

        loss, lr = history.loss(), history.lr()
        ax_loss.set_title("Loss and learning rate")
        if len(loss):
            _lines(ax_loss, loss, "tab:blue", "loss")
            ax_lr = ax_loss.twinx()
            _lines(ax_lr, lr, "tab:orange", "lr")
            ax_lr.set_ylabel("learning rate")
            ax_lr.legend(loc="upper right")
        else:
            _empty(ax_loss, "steps")
        ax_loss.set_ylabel("loss (cross-entropy)")
        drawn["Loss and learning rate"] = len(loss)

        ips = history.images_per_second()
        ax_ips.set_title("Throughput (images/s, whole job)")
        if len(ips):
            _lines(ax_ips, ips, "tab:green", "images/s")
            # From zero, so a 5% dip does not look like a collapse.
            ax_ips.set_ylim(0, max(ips.y) * 1.15)
        else:
            _empty(ax_ips, "steps")
        ax_ips.set_ylabel("images/s")
        drawn["Throughput"] = len(ips)

        top1 = history.top1()
        ax_top1.set_title("Validation top-1")
        if len(top1):
            _lines(ax_top1, top1, "tab:purple", "top-1", marker="o")
        else:
            _empty(ax_top1, "validation")
        ax_top1.set_ylabel("top-1 accuracy (%)")
        drawn["Validation top-1"] = len(top1)

        ax_batch.set_title("Devices × micro-batch × accumulation = global batch")
        starts = history.starts()
        if starts:
            end = history.events[-1].ts - history.t0
            ts = [s.ts - history.t0 for s in starts] + [end]
            # Explicit colours: red is reserved for the restart markers.
            for values, label, color in (
                ([s.world_size for s in starts], "devices", "tab:blue"),
                ([s.grad_accum for s in starts], "accumulation", "tab:orange"),
                ([s.micro_batch for s in starts], "micro-batch", "tab:green"),
                ([s.global_batch for s in starts], "global batch", "tab:brown"),
            ):
                ax_batch.step(ts, [*values, values[-1]], where="post", label=label, color=color)
            ax_batch.set_yscale("log", base=2)
        else:
            _empty(ax_batch, "start")
        ax_batch.set_ylabel("count (log₂ scale)")
        drawn["Devices × micro-batch × accumulation = global batch"] = len(starts)

        for ax in axes.flat:
            _mark_restarts(ax, restarts)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", fontsize="small")
            ax.grid(True, alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("seconds since the job started")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
        width, height = fig.canvas.get_width_height()
        ylabels = {title: ax.get_ylabel() for title, ax in
                   zip(drawn, (ax_loss, ax_ips, ax_top1, ax_batch), strict=True)}
    finally:
        plt.close(fig)
    return PlotResult(path=out, width=width, height=height, panels=drawn, ylabels=ylabels,
                      units=dict(zip(drawn, POINT_UNITS, strict=True)))
