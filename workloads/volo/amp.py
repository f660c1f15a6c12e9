"""MindCV's ``amp_level`` on a VOLO network: which cells compute in float16.

Parameters stay float32 either way (a cell set to float16 casts its inputs and weights when it
runs, and the gradient flows back through the cast as float32), so the optimizer state and
the checkpoint are float32 masters. The network's output is cast back to float32, so the
loss (log-softmax and cross-entropy) is always computed in float32, as MindCV's
``add_loss_network`` does for O2/O3.

* O0: everything float32.
* O1: Dense and Conv cells in float16, their outputs cast to float32; all else float32
  (MindCV's ``AMP_WHITE_LIST``; MindSpore 2.10's own O1 rewrites the network's Python source
  and fails on this model with a NameError, measured).
* O2: the whole network in float16 except BatchNorm and LayerNorm cells, which run in float32
  and hand float16 on (``mindspore.amp.auto_mixed_precision``; MindCV's blacklist is the same).
* O3: the whole network in float16, BatchNorm and LayerNorm included
  (``mindspore.amp.auto_mixed_precision``, as MindCV's ``network.to_float(float16)``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LEVELS", "apply_amp", "cell_precisions"]

LEVELS = ("O0", "O1", "O2", "O3")


def _white_list() -> tuple[type, ...]:
    from mindspore import nn

    return (nn.Dense, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Conv1dTranspose, nn.Conv2dTranspose,
            nn.Conv3dTranspose)


def _output_to_fp32(cell: Any) -> Any:
    import mindspore as ms
    from mindspore import nn, ops

    class OutputTo32(nn.Cell):
        def __init__(self, inner: Any):
            super().__init__(auto_prefix=False)  # the parameters keep their names
            self._op = inner

        def construct(self, x: Any) -> Any:
            return ops.cast(self._op(x), ms.float32)

    return OutputTo32(cell)


def _cast_white_list(network: Any, white: tuple[type, ...]) -> None:
    import mindspore as ms
    from mindspore import nn

    cells = network.name_cells()
    changed = False
    for name, sub in cells.items():
        if sub is network:
            continue
        if isinstance(sub, white):
            network._cells[name] = _output_to_fp32(sub.to_float(ms.float16))
            changed = True
        else:
            _cast_white_list(sub, white)
    if changed and isinstance(network, nn.SequentialCell):
        network.cell_list = list(network.cells())


def apply_amp(network: Any, level: str) -> Any:
    """The network to train or evaluate at ``level`` (it may wrap ``network``, whose cells it
    changes in place; parameter names are unchanged)."""
    if level not in LEVELS:
        raise ValueError(f"amp_level {level!r} is not one of {list(LEVELS)}")
    if level == "O0":
        return network
    if level == "O1":
        _cast_white_list(network, _white_list())
        return network
    from mindspore import amp

    return amp.auto_mixed_precision(network, level)


def cell_precisions(network: Any) -> dict[str, str]:
    """Each named cell's own ``to_float`` setting: "FP16", "FP32" or "NOTSET" (a cell that
    set nothing computes in the dtype its inputs arrive in)."""
    return {name: cell.get_mixed_precision_type().name for name, cell in network.cells_and_names()}
