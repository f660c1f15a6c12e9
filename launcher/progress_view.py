"""How `--wait` shows a job's progress: a live view on a terminal, plain lines otherwise.

Both read the status dicts the controller returns (`status` of a job; a Workflow's
carry its steps). The plain view prints one line per job whenever that line changes,
which suits logs, pipes and `--output json`. The live view (rich) redraws one table
in place: a bar and step/total, loss, images/s, ETA, devices × micro-batch ×
accumulation, attempt and restarts for the job and each workflow step.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import click

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
EXPLAINED = ("PENDING", "RESTARTING", "FAILED", "CANCELLED")  # states whose message matters
REFRESH_PER_SECOND = 4

Status = dict[str, Any]
_ACTIVE: list[LiveView] = []  # the live view on screen, for restore_terminal()


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _total(p: dict[str, Any]) -> int | None:
    return p.get("stop_step") or p.get("total_steps")


def eta_seconds(st: Status) -> float | None:
    """Steps left × the average post-compile step time; None while unknown or finished."""
    p = st.get("progress") or {}
    total, per_step = _total(p), p.get("avg_step_seconds")
    if "step" not in p or not total or not per_step or st["state"] in TERMINAL:
        return None
    return (total - p["step"]) * float(per_step)


def layout(st: Status) -> tuple[int, int, int, int] | None:
    """(devices, micro-batch, accumulation, attempt) of the latest attempt; None before."""
    atts = st.get("attempts") or []
    if not atts or not atts[-1]["plan"].get("devices"):
        return None
    a = atts[-1]["plan"]
    return a["devices"], a["micro_batch"], a["grad_accum"], atts[-1]["n"]


def progress_line(st: Status) -> str:
    p = st.get("progress") or {}
    parts = [f"{st['id']} {st['state']}"]
    if "step" in p:
        total = _total(p)
        parts.append(f"step {p['step']}" + (f"/{total}" if total else ""))
        if p.get("loss") is not None:
            parts.append(f"loss {float(p['loss']):.4f}")
        if p.get("images_per_second") is not None:
            parts.append(f"{float(p['images_per_second']):.1f} img/s")
        eta = eta_seconds(st)
        if eta is not None:
            parts.append(f"ETA {fmt_eta(eta)}")
    if p.get("val_top1") is not None:
        parts.append(f"val top-1 {float(p['val_top1']):.2f}%")
    lay = layout(st)
    if lay:
        parts.append(f"[{lay[0]} dev, micro {lay[1]} x accum {lay[2]}, attempt {lay[3]}]")
    if st.get("restarts"):
        parts.append(f"restarts {st['restarts']}")
    if st["state"] in EXPLAINED and st.get("message"):
        parts.append(f"- {st['message']}")
    return "  ".join(parts)


def rows_of(st: Status) -> list[Status]:
    return st.get("steps") or [st]


class View(Protocol):
    def show(self, st: Status) -> None: ...
    def close(self) -> None: ...


class PlainView:
    """One line per job, printed when it changes."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def show(self, st: Status) -> None:
        for r in rows_of(st):
            line = progress_line(r)
            if self._last.get(r["id"]) != line:
                click.echo(line)
                self._last[r["id"]] = line

    def close(self) -> None:
        pass


class LiveView:
    """A rich table redrawn in place; its last frame stays on the screen."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._started = time.monotonic()
        self._last: Status | None = None
        self._live = Live(console=Console(), refresh_per_second=REFRESH_PER_SECOND,
                          transient=False)
        self._live.start()
        _ACTIVE.append(self)

    def show(self, st: Status) -> None:
        self._last = st
        self._live.update(self.render(st), refresh=True)

    def close(self) -> None:
        if self._last is not None:  # the frame that stays: without the "waiting" hint
            self._live.update(self.render(self._last, final=True), refresh=True)
        self._live.stop()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def render(self, st: Status, final: bool = False) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        waited = fmt_eta(time.monotonic() - self._started)
        t = Table(title=f"{st['id']}: {st['state']}", title_justify="left",
                  caption=None if final else f"waiting {waited} - Ctrl-C stops watching, "
                                             "the job keeps running",
                  caption_justify="left")
        for col, kw in (("job", {}), ("state", {}), ("progress", {"min_width": 22}),
                        ("step", {"justify": "right"}), ("loss", {"justify": "right"}),
                        ("img/s", {"justify": "right"}), ("ETA", {"justify": "right"}),
                        ("devices × micro × accum", {}), ("attempt", {"justify": "right"}),
                        ("restarts", {"justify": "right"})):
            t.add_column(col, **kw)
        for r in rows_of(st):
            p = r.get("progress") or {}
            total, step = _total(p), p.get("step")
            bar: Any = ""
            if total and step is not None:
                bar = ProgressBar(total=float(total), completed=float(step), width=20)
            eta, lay = eta_seconds(r), layout(r)
            t.add_row(
                r.get("step") or r["id"], r["state"], bar,
                "" if step is None else f"{step}/{total}" if total else str(step),
                "" if p.get("loss") is None else f"{float(p['loss']):.4f}",
                "" if p.get("images_per_second") is None
                else f"{float(p['images_per_second']):.1f}",
                "" if eta is None else fmt_eta(eta),
                "" if lay is None else f"{lay[0]} × {lay[1]} × {lay[2]}",
                "" if lay is None else str(lay[3]), str(r.get("restarts") or 0))
            if r["state"] in EXPLAINED and r.get("message"):
                t.add_row("", Text(r["message"], style="dim"))  # Text: no markup parsing
        return t


def restore_terminal() -> None:
    """Show the cursor the live view hid; for a process about to exit without closing it
    (a signal handler may run while the view is mid-draw, so no redraw here)."""
    for v in _ACTIVE:
        v._live.console.show_cursor(True)
        v._live.console.line()


def make_view(live: bool) -> View:
    return LiveView() if live else PlainView()
