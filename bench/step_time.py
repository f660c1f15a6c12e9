"""Our train step time for one VOLO variant on CPU, Graph mode: a quick before/after check
that a model change does not slow a model down, e.g. the quickstart's volo_tiny.

    .venv/bin/python bench/step_time.py [--model volo_tiny] [--batch 32] [--classes 10] [--steps 20]

The step is the one bench/model_throughput.py times (forward + cross-entropy + backward +
AdamWeightDecay, TrainOneStepCell), at the variant's own image size, with host ops blocking
as the CPU train loop runs them. Prints the median and the fastest step after the compile
and `--warmup` steps. No torch needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from workloads.volo.runtime_env import host_blocking_on_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="volo_tiny")
    parser.add_argument("--batch", type=int, default=32)  # the quickstart recipe's batch_size
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    host_blocking_on_cpu("CPU")  # before MindSpore's first op

    import mindspore as ms
    from mindspore import nn

    from workloads.volo import create_model, model_config

    ms.set_context(mode=ms.GRAPH_MODE)
    size = model_config(args.model).img_size
    rng = np.random.RandomState(0)
    x = ms.Tensor(rng.randn(args.batch, 3, size, size).astype(np.float32))
    y = ms.Tensor(rng.randint(0, args.classes, size=args.batch).astype(np.int32))
    model = create_model(args.model, num_classes=args.classes)
    opt = nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-4, weight_decay=0.05)
    step = nn.TrainOneStepCell(nn.WithLossCell(model, nn.CrossEntropyLoss()), opt)
    step.set_train(True)
    for _ in range(1 + args.warmup):
        step(x, y).asnumpy()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(x, y).asnumpy()
        times.append(time.perf_counter() - start)
    print(f"{args.model}, batch {args.batch}, {size} px, {os.cpu_count()} CPU threads, "
          f"{args.steps} steps: median {1000 * statistics.median(times):.1f} ms/step, "
          f"fastest {1000 * min(times):.1f} ms")


if __name__ == "__main__":
    main()
