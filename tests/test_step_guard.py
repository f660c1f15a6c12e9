"""The step guard: a micro-step whose loss is below its targets' entropy is computed again
(workloads/volo/step_guard.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workloads.volo.data import soft_targets
from workloads.volo.step_guard import (
    MAX_RECOMPUTES,
    StepCorrupted,
    guarded_micro_step,
    is_impossible,
    loss_floor,
)


class HostTensor:
    def __init__(self, value):
        self.value = np.asarray(value, np.float32)

    def asnumpy(self):
        return self.value


def ce(t: np.ndarray, logits: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-(t * logp).sum(-1).mean())


def test_floor_of_label_smoothing_is_the_targets_entropy():
    t = soft_targets(np.array([0, 3, 9]), 10, 0.1)
    expected = -(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01))
    assert loss_floor(t) == pytest.approx(expected, rel=1e-6)
    assert loss_floor(soft_targets(np.array([1, 2]), 10, 0.0)) == 0.0  # one-hot: no floor


def test_no_prediction_goes_below_the_floor_and_the_targets_themselves_reach_it():
    rng = np.random.default_rng(0)
    for mix in (0.0, 0.3, 0.5):  # label smoothing, then mixup of two smoothed rows
        t = soft_targets(rng.integers(0, 10, 8), 10, 0.1)
        t = (1 - mix) * t + mix * t[::-1]
        floor = loss_floor(t)
        losses = [ce(t, rng.standard_normal((8, 10)) * s) for s in (0.1, 1, 10, 100)]
        assert min(losses) >= floor
        assert ce(t, np.log(t)) == pytest.approx(floor, rel=1e-6)  # p = t is the optimum
        assert not is_impossible(np.float32(ce(t, np.log(t))), floor)


def test_a_loss_below_the_floor_is_computed_again_and_state_put_back():
    t = soft_targets(np.array([0, 1, 2, 3]), 10, 0.1)
    state = [HostTensor([1.0, 2.0])]
    losses = iter([0.08, 2.31])
    calls = []

    def run():
        calls.append(1)
        state[0].value = state[0].value + 1  # what a forward does to BN running stats
        return HostTensor(next(losses)), ["grads"]

    start = state[0].value.copy()
    restored = []

    def reset():
        restored.append(start.copy())
        state[0].value = start.copy()

    loss, grads, value, redone = guarded_micro_step(run, t, reset)
    assert len(calls) == 2 and value == pytest.approx(2.31) and grads == ["grads"]
    assert [(r.wrong_loss, r.loss) for r in redone] == [(pytest.approx(0.08), pytest.approx(2.31))]
    assert redone[0].floor == pytest.approx(loss_floor(t))
    assert np.array_equal(restored[0], [1.0, 2.0])
    assert np.array_equal(state[0].value, [2.0, 3.0])  # one step's update, not two

    losses = iter([0.08, 0.2, 2.31])  # wrong twice: each recomputation says what it gave
    state[0].value = start.copy()
    *_, redone = guarded_micro_step(run, t, reset)
    assert [(r.wrong_loss, r.loss) for r in redone] == [
        (pytest.approx(0.08), pytest.approx(0.2)), (pytest.approx(0.2), pytest.approx(2.31))]


def test_a_correct_loss_runs_once_and_a_persistent_one_fails_the_rank():
    t = soft_targets(np.array([5, 6]), 10, 0.1)
    calls = []

    def good():
        calls.append(1)
        return HostTensor(loss_floor(t) + 0.2), []

    *_, redone = guarded_micro_step(good, t)
    assert len(calls) == 1 and redone == []

    calls.clear()

    def bad():
        calls.append(1)
        return HostTensor(0.1), []

    with pytest.raises(StepCorrupted, match=r"below 0\.50.*least cross-entropy"):
        guarded_micro_step(bad, t)
    assert len(calls) == MAX_RECOMPUTES + 1


def test_trainer_recomputes_an_impossible_micro_step(digits):
    """Through the real Trainer and MindSpore: the wrong result is dropped, the BatchNorm
    running statistics end as after one correct forward, and the step's loss is the correct
    one; a micro-step that stays wrong fails the step before the update. With a loss scale
    of 1024 the floor still applies to the unscaled loss, which the step returns."""
    import mindspore as ms

    from workloads.volo.config import parse_args
    from workloads.volo.train import Trainer, _configure_mindspore, make_plan

    args = parse_args(["-c", "workloads/volo/configs/volo_tiny_digits.yaml", "--data_dir",
                       str(digits), "--val_while_train", "False",
                       "--loss_scale", "1024"])
    _configure_mindspore(args)
    tr = Trainer(make_plan(args, 1), 1)
    assert tr.guard and tr._running_stats  # volo's stem has BatchNorm
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    t = soft_targets(np.array([0, 1, 2, 3]), 10, 0.1)

    def stats():
        ms.runtime.synchronize()
        return [p.asnumpy().copy() for p in tr._running_stats]

    def weights():
        ms.runtime.synchronize()
        return tr.net.head.weight.asnumpy().copy()

    real = tr._micro
    start = stats()
    scale = tr._scale_t[1]
    assert float(scale.asnumpy()) == 1024.0
    correct = float(real(ms.Tensor(x), ms.Tensor(t), scale)[0].asnumpy())
    assert correct < 3.0  # the unscaled loss (ln 10 ~ 2.3 for a fresh model)
    after_one = stats()
    for p, s in zip(tr._running_stats, start, strict=True):
        tr._restore(p, s)

    calls = []

    def flaky(xt, tt, sc):
        calls.append(1)
        loss, grads = real(xt, tt, sc)
        return (ms.Tensor(np.float32(0.05)) if len(calls) == 1 else loss), grads

    tr._micro = flaky
    loss = tr.step([(x, t)], lr=0.0)
    assert len(calls) == 2
    assert loss == pytest.approx(correct, rel=1e-6)
    assert [r.wrong_loss for r in tr.last_recomputes] == [pytest.approx(0.05)]
    for got, want in zip(stats(), after_one, strict=True):
        np.testing.assert_array_equal(got, want)

    w = weights()
    tr._micro = lambda xt, tt, sc: (ms.Tensor(np.float32(0.05)), real(xt, tt, sc)[1])
    with pytest.raises(StepCorrupted):
        tr.step([(x, t)], lr=1e-2)
    np.testing.assert_array_equal(weights(), w)  # not applied
