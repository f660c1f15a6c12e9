"""Workload adapters: what the launcher needs to know about a workload, and nothing more.

The launcher names no workload module. A workload describes itself with a
:class:`WorkloadAdapter` (the module each job kind runs, how a validate or export step picks
its checkpoint, which warm starts its ranks support, what the dry run says about a recipe),
and :func:`adapter` finds it by the spec's ``workload`` name. The built-in adapters are
registered here by module name and imported on first use, so that importing the launcher
loads no workload (and no MindSpore).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN, VALIDATE, EXPORT = "TrainJob", "ValidateJob", "ExportJob"

# checkpoint directory, selection ("best" or "latest") -> the checkpoint, or None
CheckpointSelector = Callable[[Path, str], Path | None]
# recipe path, overrides -> what the dry run prints about the recipe's precision
RecipeDescriber = Callable[[str, Mapping[str, Any]], dict[str, str]]
# recipe path, overrides -> (key, what is wrong) per bad value, checked before any rank starts
RecipeChecker = Callable[[Path, Mapping[str, Any]], list[tuple[str, str]]]


@dataclass(frozen=True)
class WarmStarts:
    """Which ways of starting a restart's ranks ahead of time the workload supports.

    standby: its rank module may be imported before the rank knows who it is
      (launcher/standby.py); it names what to import in STANDBY_PRELOAD.
    prejoin_devices: device types on which its ranks can also join their cluster and
      compile, then hold for the agent (the HOLD protocol of launcher/contract.py)."""

    standby: bool = True
    prejoin_devices: frozenset[str] = frozenset()


@dataclass(frozen=True)
class WorkloadAdapter:
    name: str
    # job kind -> the module its ranks run as `python -m MODULE`
    modules: Mapping[str, str]
    select_checkpoint: CheckpointSelector
    warm_starts: WarmStarts = field(default_factory=WarmStarts)
    describe_recipe: RecipeDescriber | None = None
    check_recipe: RecipeChecker | None = None
    # modules that a spec's data.create may run for it (`python -m MODULE --out DIR`): each
    # writes a dataset into DIR and nothing else
    dataset_makers: frozenset[str] = frozenset()
    # whether its train ranks honour the CHECKPOINT REQUEST protocol (launcher/contract.py)
    checkpoint_on_request: bool = False

    def module(self, kind: str) -> str:
        try:
            return self.modules[kind]
        except KeyError:
            raise ValueError(f"workload {self.name!r} cannot run a {kind}") from None

    def prejoins_on(self, device_type: str) -> bool:
        return self.warm_starts.standby and device_type in self.warm_starts.prejoin_devices


# name -> "module:attribute" of its adapter
BUILTIN: dict[str, str] = {
    "volo": "workloads.volo.adapter:ADAPTER",
    "smoke": "launcher.smoke:ADAPTER",
}
_loaded: dict[str, WorkloadAdapter] = {}


def register(adapter: WorkloadAdapter) -> None:
    """Make a workload known by name (in this process: the controller's, for a spec)."""
    _loaded[adapter.name] = adapter


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_loaded))


def dataset_makers() -> frozenset[str]:
    """Every dataset maker some known workload declares."""
    return frozenset().union(*(adapter(n).dataset_makers for n in names()))


def of_spec(spec: Mapping[str, Any]) -> WorkloadAdapter:
    """The adapter of a stored job spec (a spec without `workload` takes the spec's default)."""
    name = spec.get("workload")
    if name is None:
        from launcher.spec import TrainSpec  # pydantic: only for a spec that lacks the field

        name = TrainSpec.model_fields["workload"].default
    return adapter(name)


def adapter(name: str) -> WorkloadAdapter:
    """The adapter of workload `name`; ValueError naming the known ones otherwise."""
    got = _loaded.get(name)
    if got is not None:
        return got
    where = BUILTIN.get(name)
    if where is None:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(names())}")
    module, attr = where.split(":")
    got = getattr(importlib.import_module(module), attr)
    if not isinstance(got, WorkloadAdapter) or got.name != name:
        raise TypeError(f"{where} is not the WorkloadAdapter of {name!r}")
    _loaded[name] = got
    return got
