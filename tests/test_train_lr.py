"""LR schedule indexed by optimizer step (MindCV's warmup + cosine), and that the value
really reaches the compiled optimizer step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workloads.volo.train import lr_at


def mindcv_schedule(steps_per_epoch, lr, min_lr, warmup_epochs, warmup_factor, decay_epochs,
                    epochs):
    """MindCV's create_scheduler('cosine_decay', lr_epoch_stair=False) written as its list
    construction: linear_refined_lr warmup + cosine_decay_refined_lr, per step."""
    lrs = []
    for i in range(steps_per_epoch * warmup_epochs):
        mult = min(i / steps_per_epoch, warmup_epochs) / warmup_epochs
        lrs.append(lr * warmup_factor + mult * (lr - lr * warmup_factor))
    main = []
    for i in range(steps_per_epoch * decay_epochs):
        t = min(i / steps_per_epoch, decay_epochs)
        if len(main) < steps_per_epoch * (epochs - warmup_epochs):
            main.append(min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / decay_epochs)))
    main += [min_lr] * (steps_per_epoch * (epochs - warmup_epochs) - len(main))
    return lrs + main


@pytest.mark.parametrize("spe,lr,min_lr,we,wf,de,ep", [
    (10, 0.0019, 1e-5, 2, 0.0, 8, 10),  # volo_d1's shape, scaled down
    (7, 0.1, 0.0, 1, 0.01, 3, 6),  # decay shorter than the remaining epochs -> min_lr tail
    (5, 1e-3, 1e-6, 0, 0.0, 4, 4),  # no warmup
])
def test_lr_matches_mindcv_schedule(spe, lr, min_lr, we, wf, de, ep):
    ref = mindcv_schedule(spe, lr, min_lr, we, wf, de, ep)
    got = [lr_at(s, steps_per_epoch=spe, lr=lr, scheduler="cosine_decay", min_lr=min_lr,
                 warmup_epochs=we, warmup_factor=wf, decay_epochs=de, epochs=ep)
           for s in range(spe * ep)]
    assert np.allclose(got, ref, rtol=1e-12, atol=0)


def test_optimizer_sees_each_steps_lr(digits):
    """A compiled update must use the LR passed for that step (regression: a graph that
    captured the first step's LR of 0 never trained)."""
    import mindspore as ms

    from workloads.volo.config import parse_args
    from workloads.volo.data import soft_targets
    from workloads.volo.train import Trainer, _configure_mindspore, make_plan

    args = parse_args(["-c", "workloads/volo/configs/volo_tiny_digits.yaml", "--data_dir",
                       str(digits), "--val_while_train", "False"])
    _configure_mindspore(args)
    tr = Trainer(make_plan(args, 1), 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    t = soft_targets(np.array([0, 1, 2, 3]), 10, 0.0)
    w = tr.net.head.weight

    def snapshot():
        ms.runtime.synchronize()
        return w.asnumpy().copy()

    before = snapshot()
    tr.step([(x, t)], lr=0.0)
    assert np.array_equal(snapshot(), before)  # lr 0: no change (AdamW's decay is lr-scaled)
    tr.step([(x, t)], lr=1e-3)
    after = snapshot()
    assert np.abs(after - before).max() > 1e-4
    assert float(tr.opt.learning_rate.asnumpy()) == pytest.approx(1e-3)


def test_input_pipeline_segments_span_epochs_but_stop_at_validation():
    from workloads.volo.train import SEGMENT_STEPS, segment_end

    # no validation: a 10-step epoch no longer costs a pipeline each; capped, and at the stop
    assert segment_end(0, 10, 10**6, None) == SEGMENT_STEPS
    assert segment_end(995, 10, 1200, None) == 1200
    # a huge epoch is one pipeline
    assert segment_end(7, 5000, 10**6, None) == 5007
    # validation every 2 epochs of 10 steps: end at steps 20, 40, ... wherever we start
    assert segment_end(0, 10, 10**6, 2) == 20
    assert segment_end(13, 10, 10**6, 2) == 20
    assert segment_end(20, 10, 10**6, 2) == 40
    assert segment_end(0, 10, 15, 1) == 10 and segment_end(10, 10, 15, 1) == 15
