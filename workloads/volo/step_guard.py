"""Catch a micro-step whose loss is impossible for its targets, and compute it again.

On a CPU rank under CPU contention, MindSpore 2.10 sometimes computes one micro-step wrongly
(docs/known-issues.md): the rank's own loss comes out at 0.04-0.4 where label smoothing 0.1
allows no less than 0.50, and its gradients are wrong too. Computing the same micro-batch
again right away gave the right loss and gradients in every case probed (bench/cpu_step_race.py),
so the fault is transient, not in the parameters or the inputs.

The floor is exact, not a heuristic: for soft targets t (label smoothing, mixup, cutmix) and
any predicted distribution p, the cross-entropy is H(t) + KL(t || p) >= H(t), the targets'
own entropy. A loss below the micro-batch's mean row entropy (less float32 rounding) cannot
come from a correct computation. Wrong steps whose loss stays above the floor are not caught
here; in every wrong run seen so far the first wrong step was below it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# float32 log-softmax and the batch mean can land a correct loss a few 1e-7 under H(t) when a
# model is near-perfect; the wrong steps seen fell 0.1-0.46 under it
FLOOR_TOLERANCE = 1e-3
MAX_RECOMPUTES = 2


class StepCorrupted(RuntimeError):
    """A micro-step stayed impossible after MAX_RECOMPUTES recomputations."""


def loss_floor(targets: np.ndarray) -> float:
    """The least mean cross-entropy any model can reach on these soft targets (rows sum to 1):
    the mean over rows of their entropy."""
    t = np.asarray(targets, np.float64)
    safe = np.where(t > 0, t, 1.0)  # 0 log 0 = 0
    return float((-(t * np.log(safe)).sum(-1)).mean())


def is_impossible(loss: float, floor: float) -> bool:
    return loss < floor - FLOOR_TOLERANCE * max(1.0, floor)


@dataclass
class Recompute:
    """One recomputed micro-step, for the heartbeat and the log."""

    wrong_loss: float
    floor: float
    loss: float


def guarded_micro_step(run: Callable[[], tuple[Any, Any]], targets: np.ndarray,
                       reset: Callable[[], None] | None = None,
                       ) -> tuple[Any, Any, float, list[Recompute]]:
    """``run()`` -> (loss tensor, grads); computed again while its loss is below ``targets``'
    floor, at most MAX_RECOMPUTES times, else :class:`StepCorrupted`.

    ``reset()`` puts back what the micro-step changes besides its outputs (BatchNorm running
    statistics) before a recomputation, so a retried step leaves them as one correct step
    would."""
    floor = loss_floor(targets)
    redone: list[Recompute] = []
    while True:
        loss, grads = run()
        value = float(loss.asnumpy())
        if redone:
            redone[-1].loss = value
        if not is_impossible(value, floor):
            return loss, grads, value, redone
        if len(redone) == MAX_RECOMPUTES:
            raise StepCorrupted(
                f"micro-step loss {value:.6g} is below {floor:.6g}, the least cross-entropy its "
                f"targets allow, after {MAX_RECOMPUTES} recomputations (losses "
                f"{[round(r.wrong_loss, 6) for r in redone] + [round(value, 6)]}); the step is "
                "not applied")
        redone.append(Recompute(wrong_loss=value, floor=floor, loss=float("nan")))
        if reset is not None:
            reset()
