"""The VOLO workload as the launcher sees it (launcher/workloads.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from launcher.workloads import EXPORT, TRAIN, VALIDATE, WarmStarts, WorkloadAdapter
from workloads.volo import checkpoint


def _describe_recipe(path: str, overrides: Mapping[str, Any]) -> dict[str, str]:
    from workloads.volo.config import recipe_precision  # argparse and YAML: only when asked

    return recipe_precision(path, overrides)


def _check_recipe(path: Path, overrides: Mapping[str, Any]) -> list[tuple[str, str]]:
    from workloads.volo.config import recipe_file_problems

    return recipe_file_problems(path, overrides)


ADAPTER = WorkloadAdapter(
    name="volo",
    modules={TRAIN: "workloads.volo.train", VALIDATE: "workloads.volo.validate",
             EXPORT: "workloads.volo.export"},
    select_checkpoint=checkpoint.select,
    # The train loop holds after its cluster join and compile (workloads/volo/prejoin.py).
    # CPU ranks only: on an NPU the held processes would open the devices the current attempt
    # trains on and run a step there (HCCL, device memory), which has not been tried.
    warm_starts=WarmStarts(standby=True, prejoin_devices=frozenset({"CPU"})),
    describe_recipe=_describe_recipe,
    check_recipe=_check_recipe,
    dataset_makers=frozenset({"workloads.volo.digits"}),
    checkpoint_on_request=True,
)
