"""Train VOLO with MindCV's recipe flags; one process per rank.

    python -m workloads.volo.train -c workloads/volo/configs/volo_tiny_digits.yaml \
        --data_dir data/digits [--ckpt_save_dir ckpt] [--epochs N]

Standalone, under ``msrun --worker_num N`` or under the fleet agent (MS_* + FLEET_* env).
Each optimizer step consumes one global batch G = devices x micro-batch x accumulation of a
sample order fixed by (seed, epoch) (see sampling.py); gradients are averaged over
accumulation micro-steps and ranks, then AdamW steps with the LR of that optimizer step
(MindCV's warmup + cosine). MindCV's amp_level, loss scaling, EMA and gradient clipping keys
are honoured as docs/recipe.md describes. Rank 0 checkpoints every ``ckpt_save_steps`` steps, at the
epoch cadence and at the end; every start resumes from the newest checkpoint that verifies.
When the launcher asks for a checkpoint (checkpoint_request.py), the ranks stop after one step
they agree on and rank 0 saves it.

Exit status (launcher/contract.py): 0 done, 2 bad configuration or data, 3 checkpoint refused
(recipe changed), 75 stopped at a requested checkpoint, 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from launcher import contract as C
from workloads.volo import ckpt_payload, last_words
from workloads.volo.amp import apply_amp
from workloads.volo.bn_stats import StepRunningStats, running_stat_params
from workloads.volo.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointState,
    RecipeMismatchError,
    check_resumable,
    latest_valid,
    read_state,
    step_dir_name,
)
from workloads.volo.checkpoint_request import CheckpointRequest
from workloads.volo.config import (
    ConfigError,
    check_recipe_values,
    env_override,
    parse_args,
    recipe_dict,
    recipe_hash,
)
from workloads.volo.data import (
    DataError,
    TrainAugment,
    eval_dataset,
    mix_batch,
    scan_image_folder,
    train_dataset,
)
from workloads.volo.distributed import CollectiveCorrupted
from workloads.volo.ema import EMA_PREFIX, decay_at, ema_parameters, raw_name
from workloads.volo.loss_scale import LossScaleConfig, LossScaler
from workloads.volo.report import Heartbeat, log
from workloads.volo.runtime_env import host_blocking_on_cpu, host_pipeline, synchronize
from workloads.volo.sampling import (
    MAX_DATASET_SIZE,
    DeliveredIndices,
    GlobalBatchSampler,
    LayoutError,
    resolve_layout,
)
from workloads.volo.step_guard import Recompute, StepCorrupted, guarded_micro_step

__all__ = ["evaluate_model", "lr_at", "main"]

# model.ckpt entry with the loss scaler's state and the EMA update count (float64 values)
AMP_STATE = "amp_state"
AMP_STATE_KEYS = ("loss_scale", "loss_scale_good_steps", "overflow_steps", "skipped_steps",
                  "ema_updates")
_MIX_TAG = 0x6D6978  # separates the mixup random stream from the per-sample one
# What a standby rank process imports before it knows its rank (launcher/standby.py): the
# modules main() imports lazily, so that a restart in place skips them.
STANDBY_PRELOAD = ("mindspore", "mindspore.nn", "mindspore.ops", "mindspore.dataset",
                   "mindspore.dataset.vision", "mindspore.communication",
                   "workloads.volo.model", "workloads.volo.optim",
                   "workloads.volo.distributed", "workloads.volo.compile_cache")


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule, indexed by optimizer step (MindCV's create_scheduler, per-step form)


def lr_at(step: int, *, steps_per_epoch: int, lr: float, scheduler: str, min_lr: float,
          warmup_epochs: int, warmup_factor: float, decay_epochs: int, epochs: int,
          num_cycles: int = 1, cycle_decay: float = 1.0) -> float:
    """LR for 0-based optimizer step ``step``: linear warmup from lr*warmup_factor to lr over
    ``warmup_epochs``, then cosine from lr to min_lr over ``decay_epochs`` (then min_lr)."""
    warm = warmup_epochs * steps_per_epoch
    if step < warm:
        frac = min(step / steps_per_epoch, warmup_epochs) / warmup_epochs
        return lr * warmup_factor + frac * (lr - lr * warmup_factor)
    i = step - warm
    if scheduler == "constant":
        return lr
    if scheduler not in ("cosine_decay", "warmup_cosine_decay"):
        raise ConfigError(f"scheduler {scheduler!r} is not supported by this workload; "
                          "use cosine_decay or constant")
    per_cycle = decay_epochs * steps_per_epoch
    cycle, j = divmod(i, per_cycle) if per_cycle else (num_cycles, 0)
    main_steps = (epochs - warmup_epochs) * steps_per_epoch
    if cycle >= num_cycles or i >= main_steps:
        return min_lr
    lr_max = lr * cycle_decay**cycle
    t = min(j / steps_per_epoch, decay_epochs)
    return min_lr + 0.5 * (lr_max - min_lr) * (1.0 + math.cos(math.pi * t / decay_epochs))


# ----------------------------------------------------------------------------------------------
# Run plan: everything decided before any MindSpore work


@dataclass
class Plan:
    args: argparse.Namespace
    layout: Any  # BatchLayout
    num_classes: int
    train_index: Any
    val_index: Any | None
    num_samples: int  # train images used per epoch (all, or a fresh subset of num_samples)
    steps_per_epoch: int
    total_steps: int  # schedule length: epoch_size epochs
    stop_step: int  # where this invocation stops (max_steps or total)
    recipe: dict
    recipe_hash: str
    ckpt_dir: Path


def _check_supported(args: argparse.Namespace) -> list[str]:
    """Settings this workload cannot honour are errors; ones that do not change the maths on
    CPU are warnings (returned)."""
    if args.model.startswith("volo") is False:
        raise ConfigError(f"model {args.model!r} is not a VOLO model; this workload trains VOLO")
    if args.opt not in ("adamw", "adam", "sgd", "momentum"):
        raise ConfigError(f"opt {args.opt!r} is not supported here; use adamw, adam, momentum "
                          "or sgd")
    if args.loss != "CE":
        raise ConfigError(f"loss {args.loss!r} is not supported here; use CE")
    if args.scheduler not in ("cosine_decay", "warmup_cosine_decay", "constant"):
        raise ConfigError(f"scheduler {args.scheduler!r} is not supported here; use "
                          "cosine_decay (with warmup_epochs) or constant")
    if args.warmup_epochs < 0 or args.epoch_size < 1:
        raise ConfigError("epoch_size must be >= 1 and warmup_epochs >= 0")
    if args.scheduler != "constant" and args.decay_epochs < 1:
        raise ConfigError("decay_epochs must be >= 1 for cosine_decay")
    check_recipe_values(args)
    warnings = []
    if args.aug_repeats > 1:
        warnings.append("aug_repeats is not implemented; ignored")
    if args.layer_decay:
        warnings.append("layer_decay is not implemented; ignored")
    if args.amp_cast_list:
        warnings.append("amp_cast_list is not implemented; the amp_level's own lists are used")
    return warnings


def make_plan(args: argparse.Namespace, world_size: int) -> Plan:
    layout = resolve_layout(world_size, args.batch_size, args.gradient_accumulation_steps,
                            args.global_batch)
    train_index = scan_image_folder(Path(args.data_dir) / args.train_split)
    if len(train_index) > MAX_DATASET_SIZE:
        raise DataError(f"{train_index.root} has {len(train_index)} images; this workload "
                        f"trains on at most {MAX_DATASET_SIZE} (use num_samples or split it)")
    val_index = None
    if args.val_while_train:
        val_index = scan_image_folder(Path(args.data_dir) / args.val_split)
        if val_index.classes != train_index.classes:
            raise DataError(f"class folders of {val_index.root} differ from {train_index.root}")
    num_classes = args.num_classes or len(train_index.classes)
    if num_classes < len(train_index.classes):
        raise ConfigError(f"num_classes={num_classes} but {train_index.root} has "
                          f"{len(train_index.classes)} class folders")
    n = len(train_index) if args.num_samples is None else min(args.num_samples, len(train_index))
    steps_per_epoch = n // layout.global_batch
    if steps_per_epoch < 1:
        raise LayoutError(f"{train_index.root} has {n} images, fewer than one global batch "
                          f"({layout.global_batch})")
    total = steps_per_epoch * args.epoch_size
    stop = total if args.max_steps is None else min(total, args.max_steps)
    recipe = recipe_dict(args, layout.global_batch)
    return Plan(args, layout, num_classes, train_index, val_index, n, steps_per_epoch, total, stop,
                recipe, recipe_hash(args, layout.global_batch), Path(args.ckpt_save_dir))


# ----------------------------------------------------------------------------------------------
# MindSpore pieces


def _set_threads(n: int | None) -> None:
    # Ray starts rank processes with OMP_NUM_THREADS=1; the rank's share of cores comes from
    # FLEET_NUM_THREADS and must be set before MindSpore spins up its pools.
    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)


def _configure_mindspore(args: argparse.Namespace) -> None:
    host_blocking_on_cpu(args.device_target)  # before the first op
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)  # the step functions are compiled with ms.jit
    # both may only be set before the runtime starts: skip them when already in force, so a
    # second Trainer in the same process (tests, notebooks) works
    if ms.get_context("device_target") != args.device_target:
        ms.set_device(args.device_target)
    if args.num_threads and ms.get_context("runtime_num_threads") != args.num_threads:
        ms.set_context(runtime_num_threads=args.num_threads)
    if args.deterministic:
        # not every backend accepts it; CPU kernels are deterministic for a fixed thread count
        with contextlib.suppress(RuntimeError, ValueError, TypeError):
            ms.set_deterministic(True)
    ms.set_seed(args.seed)


def _make_step_cell(net: Any, opt: Any, ema: Any = None, clip_value: float | None = None) -> Any:
    # defined here: train.py does not import MindSpore before the configuration is checked
    import mindspore as ms
    from mindspore import nn, ops

    from workloads.volo.ema import ema_update_fn

    class StepCell(nn.Cell):
        """Owns the model, optimizer and EMA so their parameters are this Cell's parameters."""

        def __init__(self, net: Any, opt: Any):
            super().__init__(auto_prefix=False)  # keep the parameter names checkpoints use
            self.net, self.opt = net, opt
            # grads of the scaled loss, and the unscaled loss as the value
            self.grad_fn = ops.value_and_grad(self.scaled_loss, None, opt.parameters,
                                              has_aux=True)
            self.clip = clip_value is not None
            self.clip_value = clip_value if clip_value is not None else 0.0
            self.hyper_map = ops.HyperMap()
            if ema is not None:
                self.ema = ema
                self.weights_all = ms.ParameterTuple(list(net.get_parameters()))
                self.ema_op = ema_update_fn()

        def loss(self, x: Any, t: Any) -> Any:
            # the network's output is float32 at every amp level (amp.py): a float32 loss
            logp = ops.log_softmax(self.net(x), -1)
            return -(logp * t).sum(-1).mean()

        def scaled_loss(self, x: Any, t: Any, scale: Any) -> Any:
            loss = self.loss(x, t)
            return loss * scale, loss

        def micro(self, x: Any, t: Any, scale: Any) -> Any:
            (_, loss), grads = self.grad_fn(x, t, scale)
            return loss, grads

        def unscale(self, grads: Any, denom: Any) -> Any:
            """Gradients / (accumulation x scale) and 1.0 where any is not finite."""
            out = tuple(g / denom for g in grads)
            finite = ops.stack([ops.isfinite(g).all() for g in out]).all()
            return out, ops.logical_not(finite).astype(ms.float32).reshape((1,))

        def update(self, grads: Any, lr: Any) -> Any:
            # The LR goes in as an input: a compiled graph keeps the value the optimizer's
            # learning_rate Parameter had at compile time, whatever set_data does later
            # (measured: a warmup starting at 0 never trained).
            ops.assign(self.opt.learning_rate, lr)
            if self.clip:
                grads = ops.clip_by_global_norm(grads, self.clip_value)
            return self.opt(grads)

        def ema_update(self, decay: Any) -> Any:
            return self.hyper_map(ops.partial(self.ema_op, decay), self.ema, self.weights_all)

    return StepCell(net, opt)


class Trainer:
    """Model, optimizer and the compiled micro-step / update functions."""

    def __init__(self, plan: Plan, world_size: int):
        import mindspore as ms
        from mindspore import nn, ops

        from workloads.volo import create_model
        from workloads.volo.distributed import MeanAllReduce

        args = plan.args
        self.ms, self.ops = ms, ops
        overrides: dict[str, Any] = {}
        if args.drop_rate is not None:
            overrides["drop_rate"] = args.drop_rate
        if args.drop_path_rate is not None:
            overrides["drop_path_rate"] = args.drop_path_rate
        try:
            net = create_model(args.model, num_classes=plan.num_classes,
                               checkpoint_path=args.ckpt_path or None, **overrides)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model {args.model!r}: {e}") from e
        self._model_kw = dict(num_classes=plan.num_classes, **overrides)
        self.args = args
        self.net = apply_amp(net, args.amp_level)
        self.net.set_train(True)
        from workloads.volo.optim import AdamW, decay_filter

        params = self.net.trainable_params()
        keep = decay_filter(args.weight_decay_filter)
        lr0 = ms.Tensor(args.lr, ms.float32)
        if args.opt == "adamw":
            self.opt = AdamW(params, learning_rate=args.lr, eps=1e-8,
                             weight_decay=args.weight_decay, decay=keep)
        else:
            groups: Any = [{"params": [p for p in params if keep(p)],
                            "weight_decay": args.weight_decay},
                           {"params": [p for p in params if not keep(p)], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
            if args.opt == "adam":
                self.opt = nn.Adam(groups, learning_rate=lr0, weight_decay=args.weight_decay)
            else:
                self.opt = nn.Momentum(groups, learning_rate=lr0,
                                       momentum=args.momentum if args.opt == "momentum" else 0.0,
                                       weight_decay=args.weight_decay,
                                       use_nesterov=args.use_nesterov)
        # MindSpore's own CPU ring all-reduce gets a check value per chunk (see
        # MeanAllReduce); HCCL on NPUs is left as it is
        self.reducer = MeanAllReduce(world_size, verify=args.device_target == "CPU")
        # CPU ranks recompute a micro-step whose loss is impossible for its targets
        # (step_guard.py); NPUs are not known to compute such steps
        self.guard = args.device_target == "CPU"
        self.last_recomputes: list[Recompute] = []
        self.last_split: dict[str, float] = {}
        self.carried: np.ndarray | None = None
        self._running_stats = running_stat_params(self.net.get_parameters())
        self.step_stats = StepRunningStats(self._running_stats, self._restore)
        self.warmed_up = False
        self.scaler = LossScaler(LossScaleConfig.from_args(args))
        self.ema = ema_parameters(list(self.net.get_parameters())) if args.ema else None
        self.ema_updates = 0
        # host-side state (loss scale, its counters, EMA updates) as a Parameter, so that it
        # goes into model.ckpt and last words' host views with the weights
        self.amp_state = ms.Parameter(ms.Tensor(self._amp_values()), name=AMP_STATE,
                                      requires_grad=False)
        self.last_overflow = self.last_skipped = False
        self._eval_net: Any = None
        self._scale_t = (self.scaler.scale, ms.Tensor(self.scaler.scale, ms.float32))
        steps = _make_step_cell(self.net, self.opt, self.ema,
                                args.clip_value if args.clip_grad else None)
        compiled = args.mode == 0
        # Methods of a Cell, not closures: a graph loaded from MindSpore's compile cache gets
        # its weights bound by name from the owning Cell's parameters_dict(); a jit-compiled
        # closure has no owner and the cached graph ran on unbound memory (measured: loss nan).
        jit = ms.jit if compiled else (lambda f: f)
        self._micro = jit(steps.micro)
        self._unscale = jit(steps.unscale)
        self._update = jit(steps.update)
        self._ema_update = jit(steps.ema_update) if self.ema is not None else None

    # -- state -----------------------------------------------------------------------------
    def state_params(self) -> list:
        """Model parameters (their own names, so validate/export load them directly) plus the
        optimizer's state (moments, step counter, LR), the EMA (``ema.*``) and ``amp_state``;
        BN running stats included."""
        seen, out = set(), []
        for p in (list(self.net.get_parameters()) + list(self.opt.get_parameters())
                  + list(self.ema or ()) + [self.amp_state]):
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
        return out

    def _restore(self, param: Any, value: Any) -> None:
        self.ops.assign(param, value if isinstance(value, self.ms.Tensor) else
                        self.ms.Tensor(value))

    def _amp_values(self) -> np.ndarray:
        st = self.scaler.state()
        return np.array([st[k] for k in AMP_STATE_KEYS[:-1]] + [self.ema_updates], np.float64)

    def amp_state_dict(self) -> dict[str, float | int]:
        """The loss scale, its counters and the EMA update count (host values: safe to read
        on the last-words thread)."""
        return {**self.scaler.state(), "ema_updates": self.ema_updates}

    def state_digest(self) -> str:
        """sha256 of every state tensor (weights, optimizer, EMA, loss scale): equal on every
        rank of a job whose ranks agree (BatchNorm statistics included: bn_stats.py)."""
        import hashlib

        synchronize()
        h = hashlib.sha256()
        for p in sorted(self.state_params(), key=lambda p: p.name):
            h.update(p.name.encode())
            h.update(np.ascontiguousarray(p.asnumpy()).tobytes())
        return h.hexdigest()

    def step_fields(self) -> dict[str, Any]:
        """Heartbeat fields of the last step: the scale it ran with, whether some rank's
        gradients overflowed, whether the update was dropped, and the job's totals."""
        return {"loss_scale": self._scale_t[0], "overflow": self.last_overflow,
                "skipped": self.last_skipped, "overflow_steps": self.scaler.overflow_steps,
                "skipped_steps": self.scaler.skipped_steps}


    def load(self, model_ckpt: Path) -> None:
        ms = self.ms
        data = ms.load_checkpoint(str(model_ckpt))
        missing = [p.name for p in self.state_params() if p.name not in data]
        if AMP_STATE in missing:
            # made without loss-scale state: it starts from the recipe's initial scale
            missing.remove(AMP_STATE)
            data[AMP_STATE] = ms.Tensor(self._amp_values())
        if missing and all(n.startswith(EMA_PREFIX) for n in missing):
            # made without EMA (a --force resume): the average starts from these weights
            log(f"{model_ckpt} has no EMA weights; the EMA starts from its weights")
            for n in missing:
                data[n] = data[raw_name(n)]
            missing = []
        if missing:
            raise CheckpointError(f"{model_ckpt} lacks {len(missing)} parameters "
                                  f"(e.g. {', '.join(missing[:3])}); it was made by another model")
        for p in self.state_params():
            if self.warmed_up:
                # into the memory the compiled graphs use (set_data would give the Python
                # side a new buffer, as in StepRunningStats.apply)
                self.ops.assign(p, data[p.name])
            else:
                p.set_data(data[p.name])
        values = data[AMP_STATE].asnumpy().astype(np.float64)
        self.scaler.restore(dict(zip(AMP_STATE_KEYS[:-1], values[:-1].tolist(), strict=True)))
        self.ema_updates = int(values[-1])

    def warm_up(self, micro_batch: int, image_size: int, num_classes: int) -> None:
        """Run the compiled functions once on zeros (compiling them, or loading them from the
        compile cache) and put every parameter and optimizer state back as it was: a rank
        that joined ahead of a restart (prejoin.py) does this before it holds, so that its
        first real step does not. The all-reduce in between needs every rank to do it."""
        ms = self.ms
        saved = [(p, p.asnumpy().copy()) for p in self.state_params()]
        x = np.zeros((micro_batch, 3, image_size, image_size), np.float32)
        t = np.full((micro_batch, num_classes), 1.0 / num_classes, np.float32)
        loss, grads = self._micro(ms.Tensor(x), ms.Tensor(t), self._scale_t[1])
        grads, flag = self._unscale(ms.mutable(tuple(grads)), ms.Tensor(1.0, ms.float32))
        reduced = self.reducer(list(grads) + [ms.Tensor(np.zeros(1, np.float32)), flag])
        self._update(ms.mutable(tuple(reduced[:-2])), ms.Tensor(0.0, ms.float32))
        if self._ema_update is not None:
            self._ema_update(ms.Tensor(0.0, ms.float32))
        synchronize()
        for p, copy in saved:
            self._restore(p, copy)
        synchronize()
        self.warmed_up = True

    # -- one optimizer step ----------------------------------------------------------------
    def step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], lr: float,
             reducing: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
             carry: np.ndarray | None = None) -> float:
        """Average the micro-batches' gradients over accumulation and ranks, apply them with
        learning rate ``lr`` unless some rank's overflowed and the recipe drops such steps
        (``last_skipped``), then update the EMA; the BatchNorm running statistics advance by
        the whole global batch (bn_stats.py). Returns the global batch's mean (unscaled)
        loss. ``reducing()`` is entered for the all-reduce and its wait; the update is
        launched after it exits. ``carry``: float32 values averaged over ranks in the same
        all-reduce (the delivered sample indices, the checkpoint request's flag), left in
        ``self.carried``; or a function that returns them, called once the gradients are
        computed, so that what it reads is as fresh as the all-reduce allows."""
        ms = self.ms
        stats = self.step_stats
        acc = None
        loss_sum = 0.0
        t0 = time.perf_counter()
        self.last_recomputes = []
        if self._scale_t[0] != self.scaler.scale:
            self._scale_t = (self.scaler.scale, ms.Tensor(self.scaler.scale, ms.float32))
        scale = self._scale_t[1]
        if stats:
            stats.begin()
        for x, t in micro_batches:
            # losses are the unscaled ones: the step guard's floor holds for them
            if self.guard:
                loss, grads, value, redone = guarded_micro_step(
                    lambda x=x, t=t: self._micro(ms.Tensor(x), ms.Tensor(t), scale), t,
                    stats.reset if stats else None)
                self.last_recomputes += redone
            else:
                loss, grads = self._micro(ms.Tensor(x), ms.Tensor(t), scale)
                value = float(loss.asnumpy())
            if stats:
                stats.collect()
            loss_sum += value
            acc = list(grads) if acc is None else [a + g for a, g in zip(acc, grads, strict=True)]
        a = len(micro_batches)
        # the scaled sum over the accumulated step, unscaled once: one overflow decision
        grads, overflow = self._unscale(ms.mutable(tuple(acc)),
                                        ms.Tensor(a * self._scale_t[0], ms.float32))
        mean_loss = ms.Tensor(np.array([loss_sum / a], np.float32))
        local_stats = [ms.Tensor(m) for m in stats.local_mean()] if stats else []
        if callable(carry):
            carry = carry()
        carried = [] if carry is None else [ms.Tensor(np.asarray(carry, np.float32))]
        t1 = time.perf_counter()
        with reducing():
            # every rank's overflow flag rides in the gradients' all-reduce: all ranks see
            # the same total and drop (or apply) the same step
            reduced = self.reducer(list(grads) + local_stats + carried + [mean_loss, overflow])
            tail = self.ops.cat(reduced[-2:]).asnumpy()  # waits for the all-reduce
        loss, self.last_overflow = float(tail[0]), bool(tail[1] > 0)
        t2 = time.perf_counter()
        n, s = len(acc), len(local_stats)
        if stats:
            # before the EMA update, so that the average takes this step's statistics
            stats.apply(reduced[n:n + s])
        self.carried = reduced[n + s].asnumpy() if carried else None
        apply = self.scaler.after_step(self.last_overflow)
        self.last_skipped = not apply
        if apply:
            self._update(ms.mutable(tuple(reduced[:n])), ms.Tensor(lr, ms.float32))  # mutable: compile once
            if self._ema_update is not None:
                self.ema_updates += 1
                self._ema_update(ms.Tensor(decay_at(self.args.ema_decay, self.ema_updates),
                                           ms.float32))
        self.ops.assign(self.amp_state, ms.Tensor(self._amp_values()))
        # where a slow step's time went: own compute, waiting for the slowest peer, the update
        # (on an NPU the update is only launched here)
        self.last_split = {"grad": round(t1 - t0, 4), "reduce": round(t2 - t1, 4),
                           "update": round(time.perf_counter() - t2, 4)}
        return loss

    def evaluate(self, dataset: Any, source: Any) -> tuple[float, float, float, int]:
        """Validation as validate.py scores the checkpoint: the EMA weights when ema is on
        (unless raw_weights), at val_amp_level."""
        return evaluate_model(self.eval_net(), dataset, source, self.reducer)

    def eval_net(self) -> Any:
        args = self.args
        use_ema = self.ema is not None and not args.raw_weights
        if not use_ema and args.val_amp_level == args.amp_level:
            return self.net
        ms = self.ms
        if self._eval_net is None:
            from mindspore.nn.utils import no_init_parameters

            from workloads.volo import create_model

            with no_init_parameters():  # every value is copied in below
                net = create_model(args.model, **self._model_kw)
            self._eval_net = apply_amp(net, args.val_amp_level)
        source = {p.name: p for p in self.net.get_parameters()}
        if use_ema:
            source.update({raw_name(p.name): p for p in self.ema})
        for p in self._eval_net.get_parameters():
            p.set_data(ms.Tensor(source[p.name].asnumpy().copy()))
        return self._eval_net


def evaluate_model(net: Any, dataset: Any, source: Any,
                   reducer: Any = None) -> tuple[float, float, float, int]:
    """(top1 %, top5 %, mean CE loss, images) over all ranks' shards of ``dataset``."""
    import mindspore as ms

    was_training = net.training
    net.set_train(False)
    stats = np.zeros(4, np.float64)  # correct@1, correct@5, loss sum, count
    try:
        for images, labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
            logits = net(ms.Tensor(images)).asnumpy().astype(np.float64)
            stats += _batch_stats(logits, labels)
    except RuntimeError as e:
        if source.error is not None:
            raise source.error from e
        raise
    finally:
        net.set_train(was_training)
    if reducer is not None and reducer.world_size > 1:
        # sums, not means: ranks may hold different numbers of images
        red = reducer([ms.Tensor(stats.astype(np.float32))])[0]
        stats = red.asnumpy().astype(np.float64) * reducer.world_size
    n = max(stats[3], 1.0)
    return stats[0] / n * 100.0, stats[1] / n * 100.0, stats[2] / n, int(round(stats[3]))


def _batch_stats(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    loss = -logp[np.arange(len(labels)), labels].sum()
    k = min(5, logits.shape[-1])
    topk = np.argsort(-logits, -1)[:, :k]
    c1 = (topk[:, 0] == labels).sum()
    c5 = (topk == labels[:, None]).any(-1).sum()
    return np.array([c1, c5, loss, len(labels)], np.float64)


# ----------------------------------------------------------------------------------------------
# The loop


SEGMENT_STEPS = 1000


def segment_end(step: int, steps_per_epoch: int, stop_step: int,
                val_interval: int | None) -> int:
    """Where the input pipeline that starts at ``step`` ends: at a validation epoch's end (so
    that validation does not compete with a prefetching train pipeline) or the stop step, and
    after at most max(one epoch, SEGMENT_STEPS) steps. Small datasets have epochs of a few
    steps; a pipeline per epoch cost ~0.03-0.08 s at each (measured on the tiny recipe: ~1 %
    of its training time)."""
    end = min(stop_step, step + max(steps_per_epoch, SEGMENT_STEPS))
    if val_interval is not None:
        every = max(1, val_interval) * steps_per_epoch
        end = min(end, (step // every + 1) * every)
    return end


def _recompute_fields(redone: list[Recompute]) -> dict[str, Any]:
    """Heartbeat fields for a step whose micro-steps were computed again (none otherwise)."""
    if not redone:
        return {}
    return {"recomputed": [{"wrong_loss": round(r.wrong_loss, 6), "floor": round(r.floor, 6),
                            "loss": round(r.loss, 6)} for r in redone]}


def _resume(plan: Plan, trainer: Trainer, rank_world: int) -> int:
    args = plan.args
    if args.resume == "never":
        return 0
    if args.resume != "auto":
        path = Path(args.resume)
        from workloads.volo.checkpoint import verify

        reason = verify(path)
        if reason is not None:
            raise CheckpointError(f"--resume {path}: {reason}")
    else:
        path = latest_valid(plan.ckpt_dir, warn=lambda m: log(f"warning: {m}"))
        if path is None:
            return 0
    state = read_state(path)
    check_resumable(state, path, plan.recipe_hash, plan.recipe, args.force)
    trainer.load(path / "model.ckpt")
    log(f"resumed from {path}: step {state.step}, epoch {state.epoch}, "
        f"world size {state.world_size} -> {rank_world}")
    return state.step


def build(plan: Plan, rank: int, world_size: int) -> tuple[Trainer, Any]:
    """The trainer, with the compile cache on before anything compiles."""
    from workloads.volo import compile_cache

    cache = compile_cache.enable(plan, rank)
    return Trainer(plan, world_size), cache


def hold(plan: Plan, rank: int, world_size: int, attempt: int) -> tuple[Trainer, Any] | None:
    """A rank joined ahead of a restart (prejoin.py): build and warm up the trainer, then
    wait for the agent. None: the agent let this process go."""
    from workloads.volo import prejoin

    trainer, cache = build(plan, rank, world_size)
    lay = plan.layout
    trainer.warm_up(lay.micro_batch, plan.args.image_resize, plan.num_classes)
    log(f"rank {rank}: joined attempt {attempt}'s cluster and compiled ahead of time; "
        f"{prejoin.HOLDING}")
    try:
        prejoin.wait_for_go()
    except prejoin.Released:
        return None
    return trainer, cache


def run(plan: Plan, rank: int, world_size: int, hb: Heartbeat,
        marks: dict[str, float] | None = None,
        built: tuple[Trainer, Any] | None = None) -> int:
    """built: the trainer and compile cache when hold() made them already."""
    args, lay = plan.args, plan.layout
    trainer, cache = built or build(plan, rank, world_size)
    t_model = time.time()
    start = _resume(plan, trainer, world_size)
    t_resume = time.time()
    init: dict[str, float] = {}
    if marks:
        spawned = _spawned_at(os.environ)
        if spawned is not None:
            init["start_and_import"] = marks["main"] - spawned
        init.update(plan=marks["plan"] - marks["main"], join=marks["join"] - marks["plan"],
                    model=t_model - marks["join"], resume=t_resume - t_model)
    sampler = GlobalBatchSampler(len(plan.train_index), lay, args.seed, args.shuffle,
                                 per_epoch=plan.num_samples)
    augment = TrainAugment(
        image_size=args.image_resize, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.auto_augment, interpolation=args.interpolation,
        mean=tuple(args.mean), std=tuple(args.std), re_prob=args.re_prob,
        re_scale=tuple(args.re_scale), re_ratio=tuple(args.re_ratio),
        re_max_attempts=args.re_max_attempts)
    lr_kw = dict(steps_per_epoch=plan.steps_per_epoch, lr=args.lr, scheduler=args.scheduler,
                 min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                 warmup_factor=args.warmup_factor, decay_epochs=args.decay_epochs,
                 epochs=args.epoch_size, num_cycles=args.num_cycles, cycle_decay=args.cycle_decay)

    request = CheckpointRequest.from_env()
    stop_at: int | None = None  # the step the ranks agreed to stop after, when asked

    def on_saved(ev: dict[str, Any]) -> None:
        hb.emit(C.HeartbeatEvent.CHECKPOINT, **ev,
                **({"requested": True} if ev["step"] == stop_at else {}))

    ckpt = CheckpointManager(plan.ckpt_dir, keep_last=max(1, args.keep_checkpoint_max),
                             on_saved=on_saved)
    if rank == 0:
        ckpt.clean_stale()
    hb.emit(C.HeartbeatEvent.START, world_size=world_size, micro_batch=lay.micro_batch,
            grad_accum=lay.grad_accum, global_batch=lay.global_batch, resumed_step=start,
            total_steps=plan.total_steps, stop_step=plan.stop_step,
            compile_cache=cache.status if cache else "off",
            compile_cache_from=cache.source if cache else "none",
            host_pipeline=host_pipeline(),
            init_seconds={k: round(v, 3) for k, v in init.items()})
    log(f"rank {rank}/{world_size}: G={lay.global_batch} = {world_size} x {lay.micro_batch} x "
        f"{lay.grad_accum}, {plan.steps_per_epoch} steps/epoch, steps {start}->{plan.stop_step}")

    val = None
    if plan.val_index is not None:
        val = (plan.val_index, dict(image_size=args.image_resize, crop_pct=args.crop_pct,
                                    interpolation=args.interpolation, mean=args.mean,
                                    std=args.std, batch_size=max(lay.micro_batch, 32), rank=rank,
                                    world_size=world_size,
                                    num_workers=args.num_parallel_workers))
    last_val: dict[str, float] = {}

    def checkpoint_state(step: int) -> CheckpointState:
        return CheckpointState(
            step=step, epoch=step // plan.steps_per_epoch,
            samples_seen=step * lay.global_batch, global_batch=lay.global_batch,
            world_size=world_size, micro_batch=lay.micro_batch, grad_accum=lay.grad_accum,
            seed=args.seed, recipe_hash=plan.recipe_hash, model=args.model,
            rng={"scheme": "counter", "sample": "numpy default_rng([seed, epoch, index])",
                 "mix": f"numpy default_rng([seed, {_MIX_TAG}, step, chunk])",
                 "order": "numpy default_rng([seed, epoch]).permutation"},
            recipe=plan.recipe, top1=last_val.get("top1"), top5=last_val.get("top5"),
            val_loss=last_val.get("loss"), amp=trainer.amp_state_dict())

    def save(step: int, block: bool = False) -> None:
        if rank != 0:
            return
        state = checkpoint_state(step)
        import mindspore as ms

        # PyNative launches the optimizer update asynchronously: wait for it, or the
        # checkpoint may capture parameters from before the last update finished.
        synchronize()
        params = trainer.state_params()
        snap = ckpt_payload.snapshot(params)  # host copies; serialised on the writer thread
        if snap is None:
            ckpt.save(state, lambda p: ms.save_checkpoint(params, str(p)), block=block)
        else:
            ckpt.save(state, lambda p: partial(ckpt_payload.write, p, snap), block=block)

    def validate(step: int) -> None:
        index, kw = val
        ds, src = eval_dataset(index, **kw)
        top1, top5, loss, n = trainer.evaluate(ds, src)
        last_val.update(top1=top1, top5=top5, loss=loss)
        hb.emit(C.HeartbeatEvent.VAL, step=step, top1=round(top1, 4), top5=round(top5, 4),
                loss=round(loss, 6), images=n)

    def say_last_words(step: int, snap: ckpt_payload.Snapshot) -> None:
        """On the last-words thread, while the training thread waits in a dead all-reduce."""
        with contextlib.suppress(CheckpointError):
            ckpt.wait()  # rank 0's periodic save in flight; its failure is its own report
        if (ckpt.dir / step_dir_name(step)).is_dir():
            # the periodic checkpoint covered it: say so, without a second checkpoint event
            hb.emit(C.HeartbeatEvent.LAST_WORDS, step=step, saved=False)
            log(f"last words: step {step} is already saved")
            return
        t0 = time.perf_counter()
        path = ckpt.write(checkpoint_state(step), lambda p: partial(ckpt_payload.write, p, snap))
        hb.emit(C.HeartbeatEvent.CHECKPOINT, step=step, path=str(path), ok=True, last_words=True,
                save_seconds=round(time.perf_counter() - t0, 6))
        log(f"last words: saved step {step} after a peer failed ({path})")

    lw = last_words_for(world_size, say_last_words)

    def reducing() -> ContextManager[Any]:
        return lw.reducing(step) if lw is not None else contextlib.nullcontext()

    step = start
    steps_saved_at = start
    t_train = 0.0
    per_step = lay.micro_batch * lay.grad_accum  # samples one rank reads per optimizer step
    batch_indices = DeliveredIndices(lay)
    samples_seen = start * lay.global_batch
    while step < plan.stop_step:
        seg_end = segment_end(step, plan.steps_per_epoch, plan.stop_step,
                              args.val_interval if val is not None else None)
        stream = sampler.rank_stream(step, seg_end, rank)
        epochs = np.repeat(np.arange(step, seg_end) // plan.steps_per_epoch, per_step)
        ds, src = train_dataset(plan.train_index, stream, epochs, augment, lay.micro_batch,
                                args.seed, num_workers=args.num_parallel_workers)
        it = ds.create_tuple_iterator(num_epochs=1, output_numpy=True)
        try:
            while step < seg_end:
                epoch = step // plan.steps_per_epoch
                t0 = time.perf_counter()
                micro, indices = [], []
                for k in range(lay.grad_accum):
                    images, labels, delivered = next(it)
                    indices.append(delivered)
                    chunk = k * world_size + rank
                    rng = np.random.default_rng([args.seed, _MIX_TAG, step, chunk])
                    micro.append(mix_batch(images, labels.astype(np.int64), plan.num_classes,
                                           args.label_smoothing, args.mixup, args.cutmix,
                                           args.cutmix_prob, rng))
                lr = lr_at(step, **lr_kw)
                t_data = time.perf_counter() - t0
                loss = trainer.step(micro, lr, reducing, carry=partial(
                    request.with_flag, batch_indices.encode(rank, indices)))
                delivered = batch_indices.decode(trainer.carried[:-1])
                requested = CheckpointRequest.agreed(trainer.carried[-1])
                samples_seen += int((delivered >= 0).sum())
                dt = time.perf_counter() - t0
                t_train += dt
                step += 1
                if requested:
                    stop_at = step  # before any save of this step: its event says requested
                if step == start + 1:
                    if cache is not None:
                        cache.mark_complete()
                    if lw is not None and not arm_last_words(lw, trainer):
                        lw = None
                # the global batch's hash on every rank: a rank that dies just after an
                # all-reduce leaves its step logged by the others only
                hb.emit(C.HeartbeatEvent.STEP, step=step, epoch=epoch, loss=round(loss, 6), lr=lr,
                        images_per_second=round(lay.global_batch / dt, 2),
                        step_seconds=round(dt, 4), samples_seen=samples_seen,
                        sample_hash=sampler.sample_hash(delivered),
                        split={"data": round(t_data, 4), **trainer.last_split},
                        **trainer.step_fields(), **_recompute_fields(trainer.last_recomputes))
                for r in trainer.last_recomputes:
                    log(f"warning: rank {rank} step {step}: a micro-step's loss {r.wrong_loss:.6g} "
                        f"was below {r.floor:.6g}, the least its targets allow (a wrongly "
                        f"computed step); computed again: {r.loss:.6g}")
                if not math.isfinite(loss) and not trainer.last_skipped:
                    raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr")
                epoch_end = step % plan.steps_per_epoch == 0
                ep_done = step // plan.steps_per_epoch
                validating = (val is not None and epoch_end
                              and ep_done % max(1, args.val_interval) == 0)
                by_steps = args.ckpt_save_steps and step % args.ckpt_save_steps == 0
                by_epoch = (args.ckpt_save_steps is None and epoch_end
                            and ep_done % max(1, args.ckpt_save_interval) == 0)
                saving = bool(by_steps or by_epoch) and step < plan.stop_step
                if validating:
                    validate(step)
                if saving:
                    save(step)
                    steps_saved_at = step
                    if lw is not None and not lw.views_current(trainer.state_params()) \
                            and not arm_last_words(lw, trainer):
                        lw = None  # a parameter's storage moved: new views, or none
                if stop_at is not None:
                    break
        except RuntimeError as e:
            if src.error is not None:
                raise src.error from e
            raise
        finally:
            del it
        if stop_at is not None:
            break
    if step != steps_saved_at or not any(plan.ckpt_dir.glob("step-*")):
        save(step, block=True)
    ckpt.wait()
    if rank == 0 and ckpt.saves:
        log(f"checkpoint: {ckpt.saves} saves, training thread blocked "
            f"{ckpt.total_blocking_seconds:.3f}s, writer busy {ckpt.total_save_seconds:.3f}s, "
            f"train {t_train:.2f}s")
    # a request seen at the stop step ends the run as usual
    stopped = stop_at is not None and step < plan.stop_step
    if stopped:
        log(f"rank {rank}: stopped after step {step}, as the launcher asked; "
            f"rank 0 saved it and the next attempt resumes from it")
    hb.emit(C.HeartbeatEvent.DONE, step=step,
            status=C.DoneStatus.CHECKPOINTED if stopped else C.DoneStatus.OK,
            train_seconds=round(t_train, 3),
            ckpt_blocking_seconds=round(ckpt.total_blocking_seconds, 4),
            ckpt_save_seconds=round(ckpt.total_save_seconds, 4),
            state_sha256=trainer.state_digest(), **(
                {f"val_{k}": v for k, v in last_val.items()}))
    return C.EXIT_CHECKPOINTED if stopped else C.EXIT_OK


def last_words_for(world_size: int,
                   say: Callable[[int, ckpt_payload.Snapshot], None]) -> last_words.LastWords | None:
    """Last words (workloads/volo/last_words.py) when the agent asks for them. They hold the
    job's BatchNorm running statistics, not only the survivor's: every rank holds the
    global batch's after every step (bn_stats.py), and a rank waiting in a dead all-reduce
    has put back those of the last completed step."""
    request = os.environ.get(C.LAST_WORDS_ENV)
    if not request or world_size <= 1:
        return None
    return last_words.LastWords(request, say, log)


def arm_last_words(lw: last_words.LastWords, trainer: Trainer) -> bool:
    """Give ``lw`` fresh views of the state; False (and ``lw`` disarmed) where there are none."""
    synchronize()
    views = last_words.host_views(trainer.state_params())
    if views is None:
        lw.disarm()
        log("last words: off (parameters are not in host memory)")
        return False
    lw.arm(views)
    return True


def _fail(hb: Heartbeat | None, message: str, echo: bool = True) -> None:
    """Report a failed rank on stderr and, as contract 2's "done" event, in its heartbeat
    file, also when the failure came before the rank joined the cluster. Not a rank that
    failed while it held for a later attempt (prejoin.py): that attempt may still start,
    cold, and its heartbeat file must not begin with this process's end."""
    from workloads.volo import prejoin

    if echo:
        log(f"error: {message}")
    if hb is None and os.environ.get(C.HEARTBEAT_ENV) and os.environ.get("MS_ROLE") != \
            "MS_SCHED" and not prejoin.holding():
        try:
            rank = int(os.environ.get("MS_NODE_ID", "0"))
            attempt = int(os.environ.get(C.ATTEMPT_ENV, "0"))
        except ValueError:
            rank, attempt = 0, 0
        hb = Heartbeat(os.environ[C.HEARTBEAT_ENV], rank, attempt)
    if hb is not None:
        hb.emit(C.HeartbeatEvent.DONE, step=0, status=C.DoneStatus.ERROR, error=message)
        hb.close()


def _spawned_at(environ: Any) -> float | None:
    try:
        return float(environ[C.SPAWN_TS_ENV])
    except (KeyError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    hb: Heartbeat | None = None
    # Where a restart's rank init goes (heartbeat "start": init_seconds): the bench splits it.
    marks: dict[str, float] = {"main": time.time()}
    try:
        args = parse_args(argv)
        env_override(args, os.environ)
        _set_threads(args.num_threads)
        warnings = _check_supported(args)
        try:
            attempt = int(os.environ.get(C.ATTEMPT_ENV, "0"))
        except ValueError as e:
            raise ConfigError(f"{C.ATTEMPT_ENV}={os.environ[C.ATTEMPT_ENV]!r} is not an "
                              "integer") from e
        from workloads.volo import prejoin
        from workloads.volo.distributed import init_ranks, wants_cluster

        world = int(os.environ.get("MS_WORKER_NUM", "1")) if wants_cluster(
            args.distribute, os.environ) else 1
        plan = make_plan(args, world)  # every check that can fail early, before joining
        _configure_mindspore(args)
        marks["plan"] = time.time()
        ranks = init_ranks()  # the MS_SCHED process stays in here until the job ends
        marks["join"] = time.time()
        if ranks.world_size != world:
            raise ConfigError(f"MS_WORKER_NUM={world} but the cluster has {ranks.world_size} "
                              "workers")
        built = None
        if prejoin.holding():
            # joined ahead of a restart (prejoin.py): the attempt starts when the agent says
            built = hold(plan, ranks.rank, ranks.world_size, attempt)
            if built is None:
                return 0
            marks = dict.fromkeys(("main", "plan", "join"), time.time())
        hb = Heartbeat(os.environ.get(C.HEARTBEAT_ENV), ranks.rank, attempt, echo=sys.stderr)
        for w in warnings:
            if ranks.rank == 0:
                log(f"warning: {w}")
        return run(plan, ranks.rank, ranks.world_size, hb, marks, built)
    except (ConfigError, DataError, LayoutError) as e:
        _fail(hb, str(e))
        return C.EXIT_CONFIG
    except RecipeMismatchError as e:
        _fail(hb, str(e))
        return C.EXIT_RECIPE
    except (CheckpointError, FloatingPointError, CollectiveCorrupted, StepCorrupted) as e:
        _fail(hb, str(e))
        return C.EXIT_FAILED
    except Exception as e:
        # unexpected: still tell the agent why this rank stopped, then keep the traceback
        _fail(hb, f"{type(e).__name__}: {e}", echo=False)
        raise
    finally:
        if hb is not None:
            hb.close()


if __name__ == "__main__":
    # a rank that dies by a signal inside MindSpore leaves every Python thread's stack in its
    # log, which is all there is to tell where (and whether at exit) it crashed
    faulthandler.enable()
    sys.exit(main())
