"""Loss scaling as MindCV configures it, decided on the host once per optimizer step.

MindCV (``mindcv/utils/trainer_factory.py``) maps its recipe keys to MindSpore's managers:

* ``fixed`` with ``drop_overflow_update: False``: the loss is multiplied by ``loss_scale`` and
  the gradients divided by it; an overflowed update is applied (inf/nan reach the weights);
* ``fixed`` with ``drop_overflow_update: True``: the same, but an overflowed update is
  dropped (``FixedLossScaleUpdateCell``); the scale never changes;
* ``dynamic``: ``DynamicLossScaleManager(init_loss_scale=loss_scale, scale_factor=2,
  scale_window=2000)``; an overflow drops the update and divides the scale by 2 (not below 1),
  ``scale_window`` overflow-free steps in a row multiply it by 2
  (``nn.DynamicLossScaleUpdateCell``); MindCV refuses it without ``drop_overflow_update``;
* ``auto``: MindCV passes no manager and ``mindspore.Model`` picks the level's default:
  ``DynamicLossScaleManager()`` (2**24, 2, 2000) for O2, no scaling for O0, O1 and O3.

Here the decision comes from one flag all ranks agree on (the all-reduced overflow value), so
the scaler is plain Python and every rank steps it identically. A dropped step is still a
step: it consumed its global batch, and the step counter (which indexes the LR schedule and
the sample order) moves on.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["LossScaleConfig", "LossScaler"]

SCALE_FACTOR = 2  # MindCV's DynamicLossScaleManager(..., scale_factor=2, scale_window=2000)
SCALE_WINDOW = 2000
AUTO_O2_SCALE = 2.0 ** 24  # mindspore DynamicLossScaleManager's default init_loss_scale


@dataclass(frozen=True)
class LossScaleConfig:
    dynamic: bool
    init_scale: float
    drop_overflow_update: bool
    factor: int = SCALE_FACTOR
    window: int = SCALE_WINDOW

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LossScaleConfig:
        kind = args.loss_scale_type
        if kind == "auto":
            if args.amp_level == "O2":
                return cls(dynamic=True, init_scale=AUTO_O2_SCALE, drop_overflow_update=True)
            return cls(dynamic=False, init_scale=1.0, drop_overflow_update=False)
        return cls(dynamic=kind == "dynamic", init_scale=float(args.loss_scale),
                   drop_overflow_update=bool(args.drop_overflow_update))

    def describe(self) -> str:
        if self.dynamic:
            return (f"dynamic from {self.init_scale:g} (x{self.factor} after {self.window} "
                    f"overflow-free steps, /{self.factor} and skip on overflow)")
        drop = "skip on overflow" if self.drop_overflow_update else "overflowed steps applied"
        return f"fixed {self.init_scale:g} ({drop})"


@dataclass
class LossScaler:
    """The scale and its counters; ``good_steps`` counts overflow-free steps since the last
    overflow or increase (MindSpore's ``cur_iter - last_overflow_iter``)."""

    config: LossScaleConfig
    scale: float = 0.0
    good_steps: int = 0
    overflow_steps: int = 0
    skipped_steps: int = 0

    def __post_init__(self) -> None:
        if not self.scale:
            self.scale = self.config.init_scale

    def after_step(self, overflow: bool) -> bool:
        """Advance by one optimizer step whose gradients did (not) overflow on some rank;
        returns whether the update is applied."""
        c = self.config
        if overflow:
            self.overflow_steps += 1
        apply = not (overflow and c.drop_overflow_update)
        if not apply:
            self.skipped_steps += 1
        if not c.dynamic:
            return apply
        if overflow:
            self.scale = max(1.0, self.scale / c.factor)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps >= c.window:
                self.scale *= c.factor
                self.good_steps = 0
        return apply

    def state(self) -> dict[str, float | int]:
        return {"loss_scale": self.scale, "loss_scale_good_steps": self.good_steps,
                "overflow_steps": self.overflow_steps, "skipped_steps": self.skipped_steps}

    def restore(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["loss_scale"])
        self.good_steps = int(state["loss_scale_good_steps"])
        self.overflow_steps = int(state["overflow_steps"])
        self.skipped_steps = int(state["skipped_steps"])
