"""VOLO-D1 throughput on this CPU: ours (MindSpore Graph and PyNative) vs timm on torch.

    .venv/bin/python bench/model_throughput.py [--model volo_d1_224] [--batch 8] [--steps 5]

Same batch, same input, same number of CPU threads for both frameworks; train step =
forward + cross-entropy + backward + AdamW update; inference = eval-mode forward.
Compile/warm-up steps are excluded. Also tries MindCV 0.3.0's own volo_d1 (install with
`pip install --no-deps mindcv==0.3.0`) and prints why it does not run, if it does not.
Needs the test extra (torch, timm).
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

import numpy as np

from workloads.volo.runtime_env import host_blocking_on_cpu, host_pipeline


def timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bench_ours(name: str, mode: str, x: np.ndarray, y: np.ndarray, steps: int) -> dict[str, float]:
    import mindspore as ms
    from mindspore import nn

    from workloads.volo import create_model

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    model = create_model(name, num_classes=1000)
    xt, yt = ms.Tensor(x), ms.Tensor(y)
    model.set_train(False)
    infer = timed(lambda: model(xt).asnumpy(), 1, steps)

    loss = nn.CrossEntropyLoss()
    opt = nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-4, weight_decay=0.05)
    step = nn.TrainOneStepCell(nn.WithLossCell(model, loss), opt)
    step.set_train(True)
    train = timed(lambda: step(xt, yt).asnumpy(), 1, steps)
    return {"train": x.shape[0] / train, "infer": x.shape[0] / infer}


def bench_timm(name: str, x: np.ndarray, y: np.ndarray, steps: int, threads: int) -> dict[str, float]:
    import timm
    import torch

    torch.set_num_threads(threads)
    model = timm.create_model(name, num_classes=1000)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    model.eval()

    def infer_once():
        with torch.no_grad():
            model(xt)

    infer = timed(infer_once, 1, steps)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_once():
        opt.zero_grad()
        loss_fn(model(xt), yt).backward()
        opt.step()

    train = timed(train_once, 1, steps)
    return {"train": x.shape[0] / train, "infer": x.shape[0] / infer}


def try_mindcv(x: np.ndarray) -> str:
    try:
        import mindspore as ms
        from mindcv.models import create_model as mindcv_create
    except Exception as exc:  # noqa: BLE001 - report whatever stops it
        return f"not installed ({type(exc).__name__}: {exc}); pip install --no-deps mindcv==0.3.0"
    reasons = []
    for mode, label in ((ms.PYNATIVE_MODE, "PyNative"), (ms.GRAPH_MODE, "Graph")):
        ms.set_context(mode=mode)
        try:
            model = mindcv_create("volo_d1", num_classes=1000)
            model.set_train(False)
            model(ms.Tensor(x[:1])).asnumpy()
            reasons.append(f"{label}: runs")
        except Exception as exc:  # noqa: BLE001
            last = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()[0]
            reasons.append(f"{label}: does not run -- {last[:300]}")
    return "; ".join(reasons)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-mindcv", action="store_true")
    args = parser.parse_args()
    host_blocking_on_cpu("CPU")  # as the train loop runs on CPU; before MindSpore's first op
    threads = os.cpu_count() or 1
    rng = np.random.RandomState(0)
    x = rng.randn(args.batch, 3, 224, 224).astype(np.float32)
    y = rng.randint(0, 1000, size=args.batch).astype(np.int32)

    results = {"timm (torch)": bench_timm(args.model, x, y, args.steps, threads)}
    for mode in ("graph", "pynative"):
        results[f"ours ({mode})"] = bench_ours(args.model, mode, x, y, args.steps)
    ref = results["timm (torch)"]
    print(f"{args.model}, batch {args.batch}, {threads} CPU threads, {args.steps} timed steps, "
          f"MindSpore host pipeline {host_pipeline()}")
    print(f"{'implementation':<18}{'train img/s':>13}{'infer img/s':>13}{'train x':>9}{'infer x':>9}")
    for label, r in results.items():
        print(f"{label:<18}{r['train']:>13.2f}{r['infer']:>13.2f}"
              f"{r['train'] / ref['train']:>9.2f}{r['infer'] / ref['infer']:>9.2f}")
    if not args.skip_mindcv:
        print(f"mindcv 0.3.0 volo_d1: {try_mindcv(x)}")


if __name__ == "__main__":
    main()
