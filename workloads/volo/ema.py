"""MindCV's exponential moving average of the model's weights (``mindcv/utils/train_step.py``).

After each applied optimizer step, with ``n`` the number of updates so far (this one
included)::

    d = ema_decay * (1 - exp(-n / 2000))
    ema = ema * d + w * (1 - d)          for every network parameter w

so the average follows the weights closely at first and settles at ``ema_decay``
(0.9995 in the VOLO recipe) after a few thousand steps. As in MindCV, the average covers
every parameter of the network, BatchNorm running statistics included, starts as a copy of
the initial weights, is named ``ema.<name>`` in the checkpoint, and is not updated by a
dropped (overflowed) step. It is float32, whatever the amp level.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EMA_PREFIX", "WARMUP_UPDATES", "decay_at", "ema_parameters", "raw_name",
           "select_weights"]

EMA_PREFIX = "ema."
WARMUP_UPDATES = 2000.0  # MindCV's temperature T in (1 - exp(-t/T))


def decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (1-based)."""
    return decay * (1.0 - math.exp(-updates / WARMUP_UPDATES))


def raw_name(name: str) -> str:
    """The network parameter an ``ema.*`` entry averages."""
    return name[len(EMA_PREFIX):]


def ema_parameters(weights: list[Any]) -> Any:
    """float32 copies of ``weights`` (MindSpore Parameters), named ``ema.<name>``."""
    import mindspore as ms
    from mindspore import Parameter

    return ms.ParameterTuple(
        Parameter(ms.Tensor(w.asnumpy().astype("float32")), name=EMA_PREFIX + w.name,
                  requires_grad=False) for w in weights)


def ema_update_fn() -> Any:
    """The per-parameter update, for ``ops.HyperMap`` with the decay as a float32 tensor."""
    from mindspore import ops

    op = ops.MultitypeFuncGraph("ema_update")

    @op.register("Tensor", "Tensor", "Tensor")
    def _update(d: Any, ema: Any, w: Any) -> Any:
        return ops.assign(ema, ema * d + w * (1.0 - d))

    return op


def select_weights(params: dict[str, Any], raw: bool = False) -> tuple[dict[str, Any], str]:
    """The network weights a checkpoint's ``params`` hold for inference: its EMA (as MindCV
    validates) when it has one and ``raw`` is not asked for, else the trained weights; and
    which ("ema" or "raw")."""
    ema = {raw_name(k): v for k, v in params.items() if k.startswith(EMA_PREFIX)}
    if ema and not raw:
        return ema, "ema"
    return {k: v for k, v in params.items() if not k.startswith(EMA_PREFIX)}, "raw"
