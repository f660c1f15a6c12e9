"""VOLO vision model workload: model, train, validate, export."""

from __future__ import annotations

from typing import Any

__all__ = ["VOLO", "VoloConfig", "create_model", "list_models", "model_config"]


def __getattr__(name: str) -> Any:
    # Lazy: `import workloads.volo.sampling` (the smoke ranks, the planner's tests) must not
    # pay MindSpore's ~2 s import. Eagerly, a 16-rank smoke job spent 19 s on 2 cores
    # importing it before its first heartbeat.
    if name in __all__:
        from workloads.volo import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
