"""The decision tests' harness: a controller over the real store on the in-memory backend
(launcher/backend_fake.py), driven tick by tick with a clock the test moves. A module of its
own name, not conftest.py: test modules import from it, and several test folders have a
conftest.py."""

from __future__ import annotations

from pathlib import Path

from launcher.backend_fake import FakeBackend
from launcher.lifecycle import TERMINAL, JobState

S = JobState


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def train_doc(name: str, devices: tuple[int, int] = (8, 8), restart: dict | None = None,
              **spec) -> dict:
    lo, hi = devices
    base = {"workload": "smoke", "config": "recipe.yaml", "data": {"dir": "data"},
            "resources": {"deviceType": "CPU", "devicesPerNode": 8,
                          "devices": {"min": lo, "max": hi}},
            "batch": {"global": 8 * hi, "microBatchMax": 8},
            "restart": {"backoffSeconds": 0.0, "maxBackoffSeconds": 0.0, **(restart or {})}}
    return {"apiVersion": "fleet/v1", "kind": "TrainJob", "metadata": {"name": name},
            "spec": {**base, **spec}}


class Fleet:
    """A controller over a fake cluster; `tick` runs one loop iteration, then moves the
    clock on by `step` seconds."""

    def __init__(self, home: Path, backend: FakeBackend, clock: Clock, step: float = 1.0):
        self.home, self.backend, self.clock, self.step = home, backend, clock, step
        self.ctl = self._controller()

    def _controller(self):
        from launcher.controller import Controller
        return Controller(str(self.home), start_loop=False, backend=self.backend,
                          clock=self.clock, inline_starts=True)

    def restart_controller(self) -> None:
        """A new controller object over the same store and cluster (a controller crash)."""
        self.ctl.store.close()
        self.ctl = self._controller()

    def submit(self, doc: dict) -> str:
        return self.ctl.submit(doc, {"base": str(self.home)})["id"]

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.ctl._tick()
            self.clock.advance(self.step)

    def run_until(self, job_id: str, done=lambda j: j.state in TERMINAL,
                  ticks: int = 50) -> None:
        for _ in range(ticks):
            if done(self.job(job_id)):
                return
            self.tick()

    def job(self, job_id: str):
        return self.ctl.store.get_job(job_id)

    def state(self, job_id: str) -> JobState:
        return self.job(job_id).state

    def attempts(self, job_id: str) -> list:
        return self.ctl.store.attempts(job_id)

    def statuses(self, job_id: str) -> list[str]:
        return [a.status for a in self.attempts(job_id)]

    def events(self, job_id: str) -> list[str]:
        return [e["kind"] for e in self.ctl.store.events(job_id)]
