"""Op-by-op CPU profile of one VOLO training step: ours (MindSpore Graph mode) vs timm on torch.

    .venv/bin/python bench/op_profile.py [--model volo_d1] [--batch 8] [--steps 2] [--out prof.json]

Both sides run the same train step as bench/model_throughput.py (forward + cross-entropy +
backward + AdamW) on the same input with the same number of CPU threads, after `--warmup`
untimed steps (the first compiles MindSpore's graph). Each side then runs `--steps` unprofiled
steps (wall time) and `--steps` profiled ones.

- timm: `torch.profiler` (CPU activity, with_flops). Ops are grouped by name on self time,
  so a parent such as aten::linear does not count its aten::addmm twice; each event is
  assigned forward / backward / optimizer by the record_function range it started in.
  Backward ops carry their autograd node, e.g. ``aten::mm [MmBackward0]``. torch's FLOP
  counter sits on the outer op (aten::conv2d), so its FLOPs are credited to the descendant
  that does the work (aten::mkldnn_convolution).
- ours: MindSpore's CPU profiler in Graph mode (per-kernel launch times). A kernel whose scope
  starts with ``Gradients/`` is backward, one under ``optimizer`` the optimizer's; kernels
  without a telling scope are forward up to the loss and backward after it. Input shapes
  come from the profiler's framework file, matched to kernels by execution order; the FLOPs
  of a MatMul/BatchMatMul follow from them where the shapes fix the contracted dimension
  (the profiler does not record transpose flags), and its GFLOP/s is over those launches.

`--model volo_tiny` (32 px, 10 classes) is a quick smoke check: timm has no such model, so the
torch side builds timm's VOLO class with the same config.
Needs the test extra (torch, timm).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workloads.volo.runtime_env import host_blocking_on_cpu

DIRECTIONS = ("forward", "backward", "optimizer")
# Coarse op families, so the two frameworks' different kernel names can be compared.
CATEGORIES = (
    ("gemm", r"matmul|\bmm\b|addmm|bmm|baddbmm|conv|linear"),
    ("im2col/col2im", r"im2col|col2im|unfold|fold"),
    ("norm", r"norm"),
    ("softmax", r"softmax"),
    ("gelu/erf", r"gelu|erf"),
    ("layout/copy", r"transpose|permute|copy|contiguous|clone|reshape|view|slice|cat\b|concat"
                    r"|broadcast|expand|tile|index|gather|scatter|select|stack|pad|zeros|fill"),
)


@dataclass
class OpStat:
    name: str
    calls: float = 0.0  # per step
    ms: float = 0.0  # per step
    flops: float = 0.0  # per step, of the launches whose FLOPs are known
    flops_ms: float = 0.0  # per step, time of those launches
    share: float = 0.0  # of the side's profiled op time per step (all directions)

    @property
    def gflops(self) -> float | None:
        return self.flops / self.flops_ms / 1e6 if self.flops and self.flops_ms else None


@dataclass
class SideProfile:
    label: str
    method: str
    wall_step_ms: float  # unprofiled
    profiled_wall_step_ms: float
    ops: dict[str, list[OpStat]] = field(default_factory=dict)  # direction -> ops, by time

    def total(self, direction: str) -> float:
        return sum(op.ms for op in self.ops.get(direction, []))

    def op_step_ms(self) -> float:
        return sum(self.total(d) for d in DIRECTIONS)


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "elementwise/other"


def finish(stats: dict[str, dict[str, OpStat]], steps: int) -> dict[str, list[OpStat]]:
    """Per-step values, shares of the whole step's op time, sorted by time."""
    for ops in stats.values():
        for op in ops.values():
            op.calls /= steps
            op.ms /= steps
            op.flops /= steps
            op.flops_ms /= steps
    step_ms = sum(op.ms for ops in stats.values() for op in ops.values()) or 1.0
    out = {}
    for direction in DIRECTIONS:
        ops = sorted(stats.get(direction, {}).values(), key=lambda o: o.ms, reverse=True)
        for op in ops:
            op.share = op.ms / step_ms
        out[direction] = ops
    return out


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


# ---------------------------------------------------------------- torch / timm


def build_timm(name: str, num_classes: int):
    import timm

    if name != "volo_tiny":
        return timm.create_model(name, num_classes=num_classes)
    from timm.models.volo import VOLO

    from workloads.volo.model import model_config

    cfg = model_config(name)
    return VOLO(layers=list(cfg.layers), img_size=cfg.img_size, embed_dims=list(cfg.embed_dims),
                num_heads=list(cfg.num_heads), patch_size=cfg.patch_size,
                stem_hidden_dim=cfg.stem_hidden_dim, num_classes=num_classes)


def _autograd_node(evt) -> str | None:
    prefix = "autograd::engine::evaluate_function: "
    while evt is not None:
        if evt.name.startswith(prefix):
            return evt.name[len(prefix):]
        evt = evt.cpu_parent
    return None


def _work_owner(evt):
    """The event among evt and its descendants with the most self time: where its FLOPs run."""
    best, stack = evt, list(evt.cpu_children)
    while stack:
        child = stack.pop()
        if child.self_cpu_time_total > best.self_cpu_time_total:
            best = child
        stack.extend(child.cpu_children)
    return best


def profile_timm(name: str, x: np.ndarray, y: np.ndarray, steps: int, warmup: int, threads: int,
                 num_classes: int) -> SideProfile:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(threads)
    model = build_timm(name, num_classes)
    model.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_once():
        opt.zero_grad()
        with record_function("forward"):
            loss = loss_fn(model(xt), yt)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()

    for _ in range(warmup):
        train_once()
    wall = timed(train_once, steps)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        profiled_wall = timed(train_once, steps)

    events = list(prof.events())
    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.name in DIRECTIONS)

    def direction_of(evt) -> str | None:
        for start, end, label in ranges:
            if start <= evt.time_range.start <= end:
                return label
        return None

    stats: dict[str, dict[str, OpStat]] = defaultdict(dict)
    keys: dict[int, tuple[str, str]] = {}
    for evt in events:
        direction = direction_of(evt)
        if direction is None or evt.name in DIRECTIONS or evt.name.startswith("autograd::engine"):
            continue
        node = _autograd_node(evt) if direction == "backward" else None
        key = f"{evt.name} [{node}]" if node else evt.name
        keys[id(evt)] = (direction, key)
        op = stats[direction].setdefault(key, OpStat(key))
        op.calls += 1
        op.ms += evt.self_cpu_time_total / 1e3
    for evt in events:
        if getattr(evt, "flops", 0) and id(evt) in keys:
            owner = _work_owner(evt)
            direction, key = keys.get(id(owner), keys[id(evt)])
            stats[direction][key].flops += evt.flops
            stats[direction][key].flops_ms += owner.self_cpu_time_total / 1e3
    return SideProfile("timm (torch)", "torch.profiler, CPU activity, self time per op name",
                       wall, profiled_wall, finish(stats, steps))


# ---------------------------------------------------------------- MindSpore


def _shape_list(field_text: str) -> list[int] | None:
    match = re.search(r"\[([\d, ]*)\]", field_text)
    return [int(v) for v in match.group(1).split(",") if v.strip()] if match else None


def matmul_flops(a: list[int], b: list[int]) -> float | None:
    """2*M*N*K of a (batched) matmul from its input shapes; None where they do not fix K.

    The profiler does not record transpose flags, so K is the dimension the two inputs share;
    where two different dimensions could be it (x^T @ dy with a square activation, q @ k^T),
    the FLOPs are not computable from shapes alone.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    (a0, a1), (b0, b1) = a[-2:], b[-2:]
    candidates = {k for k, other in ((a1, b0), (a1, b1), (a0, b0), (a0, b1)) if k == other}
    if len(candidates) != 1:
        return None
    batch = math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
    return 2.0 * batch * (a0 * a1) * (b0 * b1) / candidates.pop()


def _kernel_shapes(framework_dir: Path, order: list[str]) -> list[list[list[int]]] | None:
    """Input shapes per kernel, in execution order; None if the framework file does not line up."""
    lines = (framework_dir / "cpu_framework_0.txt").read_text().splitlines()
    names = [line.split(";")[1] for line in lines]
    n = len(order)
    for start in range(0, len(names) - n + 1, n):  # the file holds one block per graph build
        if names[start:start + n] == order:
            return [[s for s in (_shape_list(f) for f in line.split(";")[3:]) if s is not None]
                    for line in lines[start:start + n]]
    return None


def _ms_directions(full_names: list[str]) -> list[str]:
    """Direction of each kernel, given in execution order.

    A kernel under ``optimizer`` is the optimizer's and one under ``Gradients/`` backward,
    wherever the scheduler put it (weight transposes for the backward run during the forward).
    Other scopes do not say when a kernel runs: graph expansion drops them
    (``Expand/_MatMulExt/...``, ``Expand/_SoftmaxBackward/...``), so those kernels are forward
    up to the loss's last kernel and backward after it.
    """
    loss_end = max((i for i, n in enumerate(full_names)
                    if n.startswith("Default/") and "_loss_fn" in n), default=len(full_names))
    out = []
    for i, name in enumerate(full_names):
        if name.startswith("Default/optimizer"):
            out.append("optimizer")
        elif name.startswith("Gradients/"):
            out.append("backward")
        else:
            out.append("forward" if i <= loss_end else "backward")
    return out


def profile_ours(name: str, x: np.ndarray, y: np.ndarray, steps: int, warmup: int, num_classes: int,
                 workdir: Path) -> SideProfile:
    import mindspore as ms
    from mindspore import nn
    from mindspore.profiler import ProfilerActivity

    from workloads.volo import create_model

    ms.set_context(mode=ms.GRAPH_MODE)
    model = create_model(name, num_classes=num_classes)
    xt, yt = ms.Tensor(x), ms.Tensor(y)
    opt = nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-4, weight_decay=0.05)
    step = nn.TrainOneStepCell(nn.WithLossCell(model, nn.CrossEntropyLoss()), opt)
    step.set_train(True)
    for _ in range(warmup):  # the first compiles the graph
        step(xt, yt).asnumpy()
    wall = timed(lambda: step(xt, yt).asnumpy(), steps)

    prof = ms.Profiler(output_path=str(workdir), activities=[ProfilerActivity.CPU])
    profiled_wall = timed(lambda: step(xt, yt).asnumpy(), steps)
    prof.stop()
    prof.analyse()
    framework_dir = max(workdir.glob("*/FRAMEWORK"), key=lambda p: p.stat().st_mtime)

    kernels = []  # (first launch, full name, op type, per-launch ms)
    for line in (framework_dir / "cpu_op_execute_timestamp_0.txt").read_text().splitlines():
        full_name, _, launches = line.strip().split(";", 2)
        pairs = [p.split(",") for p in launches.split()]
        kernels.append((int(pairs[0][0]), full_name, [float(p[1]) for p in pairs]))
    kernels.sort()
    types = {}
    with open(framework_dir / "cpu_op_detail_info_0.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            types[row["full_op_name"]] = row["op_type"]
    shapes = _kernel_shapes(framework_dir, [k[1].rsplit("/", 1)[1] for k in kernels])

    directions = _ms_directions([k[1] for k in kernels])
    stats: dict[str, dict[str, OpStat]] = defaultdict(dict)
    for i, (_, full_name, durations) in enumerate(kernels):
        op_type = types.get(full_name, full_name.rsplit("/", 1)[1].split("-op")[0])
        op = stats[directions[i]].setdefault(op_type, OpStat(op_type))
        op.calls += len(durations)
        op.ms += sum(durations)
        if shapes and op_type in ("MatMul", "BatchMatMul") and len(shapes[i]) >= 2:
            flops = matmul_flops(shapes[i][0], shapes[i][1])
            if flops is not None:
                op.flops += len(durations) * flops
                op.flops_ms += sum(durations)
    method = "mindspore.Profiler (CPU activity), Graph mode, per-kernel launch time"
    if shapes is None:
        method += "; shapes did not line up with kernels, so no FLOPs"
    return SideProfile("ours (MindSpore)", method, wall, profiled_wall, finish(stats, steps))


# ---------------------------------------------------------------- report


def op_table(side: SideProfile, direction: str, top: int) -> list[str]:
    lines = [f"**{side.label}, {direction}** ({side.total(direction):.1f} ms/step of ops)", "",
             "| op | calls/step | ms/step | share of step | GFLOP/step | GFLOP/s | FLOPs known for |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for op in side.ops[direction][:top]:
        gf = f"{op.flops / 1e9:.2f}" if op.flops else ""
        rate = f"{op.gflops:.1f}" if op.gflops else ""
        known = f"{op.flops_ms / op.ms:.0%} of its time" if op.flops and op.ms else ""
        lines.append(f"| {op.name} | {op.calls:g} | {op.ms:.1f} | {op.share:.1%} | {gf} | {rate} "
                     f"| {known} |")
    return [*lines, ""]


def category_table(ours: SideProfile, ref: SideProfile) -> list[str]:
    def by_cat(side: SideProfile) -> dict[tuple[str, str], float]:
        acc: dict[tuple[str, str], float] = defaultdict(float)
        for direction in DIRECTIONS:
            for op in side.ops[direction]:
                acc[(direction, category(op.name))] += op.ms
        return acc

    a, b = by_cat(ours), by_cat(ref)
    rows = sorted(set(a) | set(b), key=lambda k: a.get(k, 0) - b.get(k, 0), reverse=True)
    lines = ["**Op families, ms/step (gap = ours - timm)**", "",
             "| direction | family | ours | timm | gap |", "|---|---|---:|---:|---:|"]
    for key in rows:
        lines.append(f"| {key[0]} | {key[1]} | {a.get(key, 0):.1f} | {b.get(key, 0):.1f} "
                     f"| {a.get(key, 0) - b.get(key, 0):+.1f} |")
    return [*lines, ""]


def report(ours: SideProfile, ref: SideProfile, header: str, top: int) -> str:
    lines = [header, "", "| | forward ms | backward ms | optimizer ms | op sum ms | profiled wall ms"
             " | unprofiled wall ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for side in (ours, ref):
        lines.append(f"| {side.label} | {side.total('forward'):.1f} | {side.total('backward'):.1f} "
                     f"| {side.total('optimizer'):.1f} | {side.op_step_ms():.1f} "
                     f"| {side.profiled_wall_step_ms:.1f} | {side.wall_step_ms:.1f} |")
    ratio = {d: ours.total(d) / ref.total(d) if ref.total(d) else float("nan") for d in DIRECTIONS}
    lines.append(f"| ours / timm | {ratio['forward']:.2f} | {ratio['backward']:.2f} "
                 f"| {ratio['optimizer']:.2f} | {ours.op_step_ms() / ref.op_step_ms():.2f} "
                 f"| {ours.profiled_wall_step_ms / ref.profiled_wall_step_ms:.2f} "
                 f"| {ours.wall_step_ms / ref.wall_step_ms:.2f} |")
    lines += ["", f"Methods: ours = {ours.method}; timm = {ref.method}.", ""]
    lines += category_table(ours, ref)
    for direction in ("forward", "backward"):
        for side in (ours, ref):
            lines += op_table(side, direction, top)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="volo_d1", help="volo_d1 (default) or volo_tiny for a smoke check")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="unprofiled, then profiled steps per side")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per side first (MindSpore's second step is still slow)")
    parser.add_argument("--top", type=int, default=15, help="ops per table")
    parser.add_argument("--out", type=Path, help="write the profile as JSON here")
    parser.add_argument("--ms-trace-dir", type=Path,
                        help="keep MindSpore's raw profiler output here (default: a temporary directory)")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1 or args.top < 1 or args.warmup < 1:
        parser.error("--batch, --steps, --warmup and --top must be at least 1")

    from workloads.volo.model import list_models, model_config

    if args.model not in list_models():
        parser.error(f"--model {args.model!r} is not one of: {', '.join(list_models())}")
    cfg = model_config(args.model)
    num_classes = 10 if args.model == "volo_tiny" else 1000
    timm_name = {"volo_d1": "volo_d1_224"}.get(args.model, args.model)
    host_blocking_on_cpu("CPU")  # as the train loop runs on CPU; before MindSpore's first op
    threads = os.cpu_count() or 1
    rng = np.random.RandomState(0)
    x = rng.randn(args.batch, 3, cfg.img_size, cfg.img_size).astype(np.float32)
    y = rng.randint(0, num_classes, size=args.batch).astype(np.int32)

    ref = profile_timm(timm_name, x, y, args.steps, args.warmup, threads, num_classes)
    if args.ms_trace_dir:
        args.ms_trace_dir.mkdir(parents=True, exist_ok=True)
        ours = profile_ours(args.model, x, y, args.steps, args.warmup, num_classes, args.ms_trace_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="ms_op_profile_") as workdir:
            ours = profile_ours(args.model, x, y, args.steps, args.warmup, num_classes, Path(workdir))
    header = (f"{args.model}, batch {args.batch}, {cfg.img_size} px, {threads} CPU threads, "
              f"train step (forward + cross-entropy + backward + AdamW), {args.steps} unprofiled then "
              f"{args.steps} profiled steps per side after {args.warmup} warm-up; times per step")
    print(report(ours, ref, header, args.top))
    if args.out:
        payload = {"model": args.model, "batch": args.batch, "img_size": cfg.img_size,
                   "threads": threads, "steps": args.steps, "warmup": args.warmup,
                   "sides": {s.label: {**asdict(s), "totals": {d: s.total(d) for d in DIRECTIONS}}
                             for s in (ours, ref)}}
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
