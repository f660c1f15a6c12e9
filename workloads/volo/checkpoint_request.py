"""The launcher's request to stop at a checkpoint, agreed on by every rank at one step.

When devices come back, the controller asks a shrunk job to stop at a checkpoint so that it
can resume on more devices (the CHECKPOINT REQUEST protocol of launcher/contract.py). The
agent creates one request file per rank, one after the other, and each rank looks for its
own at a different moment, so two ranks can first see the request at different steps. A rank
that stopped alone would leave its peers waiting in the next all-reduce. So a rank does not
act on its file: it adds its flag (1.0 when the file exists) to the step's gradient
all-reduce, one float32 beside the other values the step carries, and every rank reads the
same mean. That mean is above 0 exactly when some rank saw the request, so all ranks stop
after the same step, whose update every rank has applied: rank 0's checkpoint of it is a
checkpoint of the whole job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from launcher.contract import CHECKPOINT_REQUEST_ENV

__all__ = ["CheckpointRequest"]


class CheckpointRequest:
    def __init__(self, path: str | os.PathLike[str] | None):
        self.path = Path(path) if path else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CheckpointRequest:
        environ = os.environ if environ is None else environ
        return cls(environ.get(CHECKPOINT_REQUEST_ENV))

    def flag(self) -> float:
        """This rank's vote: 1.0 once the agent has asked (a stat() per step)."""
        return 1.0 if self.path is not None and self.path.exists() else 0.0

    def with_flag(self, values: np.ndarray) -> np.ndarray:
        """``values`` with this rank's flag appended: what the step all-reduces."""
        return np.append(np.asarray(values, np.float32), np.float32(self.flag()))

    @staticmethod
    def agreed(mean: float) -> bool:
        """Whether the ranks stop after this step, from the all-reduced mean of their flags."""
        return float(mean) > 0.0
