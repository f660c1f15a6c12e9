"""Job specs (`apiVersion: fleet/v1`): pydantic models, YAML loading, precise errors.

A spec is checked in two layers: the models (types, unknown fields, names, device
counts, batch feasibility - everything decidable from the document alone) and
`check_paths` (files on this machine: config and data exist, relative paths stay
inside the project root). Every error names file, line, field path and what is
allowed, because a user fixing a YAML file needs the line, not a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from launcher import workloads
from launcher.planner import Request, Topology, explain_infeasible, feasible_device_counts
from launcher.ranks import CHECKPOINT_ROOT_ENV

API_VERSION = "fleet/v1"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
OVERRIDE_KEY = re.compile(r"^[a-z][a-z0-9_]*$")

# Limits on what a spec may ask for (docs/security.md). Each bounds the work a spec
# causes before any cluster is involved: parsing, the line index, device counts, batch
# splits, the SQLite row, argv lengths.
MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 24            # nesting of mappings/lists; the deepest valid spec needs 7
MAX_NODES = 4096          # servers one job may span
MAX_DEVICES = 32768       # devices one job may use
MAX_GLOBAL_BATCH = 2**24
MAX_PRIORITY = 10**9      # well inside SQLite's signed 64-bit INTEGER
MAX_RESTARTS = 1000
MAX_SECONDS = 7 * 86400.0  # backoffs and timeouts
MAX_CPUS_PER_DEVICE = 1024.0
MAX_STEPS = 10**9         # checkpoint cadence
MAX_KEEP = 10000
MAX_TEXT = 4096           # any free-form string, and a whole path
MAX_PATH_COMPONENT = 255  # bytes, as most filesystems (NAME_MAX)
MAX_OVERRIDES = 256
MAX_OVERRIDE_LIST = 1024
MAX_WORKFLOW_STEPS = 64
MAX_LABELS = 64


class SpecError(Exception):
    """A spec the user must fix. `problems` are (location, message) pairs."""

    def __init__(self, file: str, problems: list[tuple[str, str]]):
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def __reduce__(self):  # picklable across Ray (custom __init__ signature)
        return (SpecError, (self.file, self.problems))

    def render(self) -> str:
        lines = [f"{self.file}: invalid job spec"]
        lines += [f"  {loc}: {msg}" for loc, msg in self.problems]
        return "\n".join(lines)


def _dns_name(v: str) -> str:
    if len(v) > 53 or not DNS1123.match(v):
        # 53, not 63: job ids append "-<seq>" and k8s resources add suffixes.
        raise ValueError(
            f"{v!r} is not a DNS-1123 name: use at most 53 lowercase letters, digits and "
            "'-', starting and ending with a letter or digit (e.g. 'volo-digits')")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True,
                              allow_inf_nan=False)


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("contains a NUL character")
    return v


def _path_str(v: str) -> str:
    if not v:
        raise ValueError("empty path")
    for part in v.split("/"):
        if len(os.fsencode(part)) > MAX_PATH_COMPONENT:
            raise ValueError(f"path component {part[:40]!r}... is longer than "
                             f"{MAX_PATH_COMPONENT} bytes")
    return v


Text = Annotated[str, StringConstraints(max_length=MAX_TEXT), AfterValidator(_no_nul)]
PathStr = Annotated[str, StringConstraints(max_length=MAX_TEXT), AfterValidator(_no_nul),
                    AfterValidator(_path_str)]
StepName = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
# passed to the export as an argv value: never a flag
ModelName = Annotated[str, StringConstraints(max_length=128,
                                             pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")]


class Metadata(_Model):
    name: StepName = Field(description="DNS-1123 job name, e.g. volo-digits")
    labels: dict[Annotated[str, StringConstraints(max_length=253)], Text] = Field(
        default_factory=dict, max_length=MAX_LABELS)

    _check_name = field_validator("name")(classmethod(lambda cls, v: _dns_name(v)))


class _Range(_Model):
    @model_validator(mode="after")
    def _order(self) -> _Range:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class DeviceRange(_Range):
    min: int = Field(ge=1, le=MAX_DEVICES)
    max: int = Field(ge=1, le=MAX_DEVICES)


class NodeRange(_Range):
    min: int = Field(ge=1, le=MAX_NODES)
    max: int = Field(ge=1, le=MAX_NODES)


def _fixed_count(v: Any) -> Any:
    """`devices: 2` is the fixed count {min: 2, max: 2}."""
    if isinstance(v, int) and not isinstance(v, bool):
        return {"min": v, "max": v}
    return v


class Resources(_Model):
    deviceType: Literal["NPU", "CPU"] = Field(
        "NPU", description="NPU on a fleet; CPU runs ranks as CPU processes (local stand-in)")
    devicesPerNode: int = Field(8, ge=1, le=64, description="chips per server (Ascend 910: 8)")
    devices: Annotated[DeviceRange | None, BeforeValidator(
        _fixed_count, json_schema_input_type=DeviceRange | Annotated[
            int, Field(ge=1, le=MAX_DEVICES)] | None)] = Field(
        None, description="total devices: min..max, or one number for a fixed count")
    nodes: Annotated[NodeRange | None, BeforeValidator(
        _fixed_count, json_schema_input_type=NodeRange | Annotated[
            int, Field(ge=1, le=MAX_NODES)] | None)] = Field(
        None, description="whole servers: min..max or a fixed number (alternative)")
    cpusPerDevice: float = Field(1.0, gt=0, le=MAX_CPUS_PER_DEVICE,
                                 description="Ray CPUs reserved per device")

    @model_validator(mode="after")
    def _one_of(self) -> Resources:
        if self.devices is not None and self.nodes is not None:
            raise ValueError("give either devices or nodes, not both")
        topo = self.topology()
        lo, hi = self.device_range()
        if hi > MAX_DEVICES or hi > self.devicesPerNode * MAX_NODES:
            raise ValueError(f"{hi} devices is more than a job may use: at most "
                             f"{MAX_DEVICES} devices on at most {MAX_NODES} servers")
        for label, v in (("min", lo), ("max", hi)):
            if not topo.is_valid_count(v) and v <= self.devicesPerNode:
                raise ValueError(
                    f"devices.{label}={v} is not a valid slice of a {self.devicesPerNode}-device "
                    f"server: allowed are {', '.join(map(str, topo.partial_sizes()))} inside "
                    f"one ring of {topo.ring_size}, or multiples of {self.devicesPerNode}")
            if v > self.devicesPerNode and v % self.devicesPerNode:
                raise ValueError(
                    f"devices.{label}={v} is not a multiple of devicesPerNode="
                    f"{self.devicesPerNode}: a multi-server job takes whole servers")
        return self

    def topology(self) -> Topology:
        ring = 4 if self.devicesPerNode % 4 == 0 else self.devicesPerNode
        return Topology(self.devicesPerNode, ring)

    def device_range(self) -> tuple[int, int]:
        if self.nodes is not None:
            return self.nodes.min * self.devicesPerNode, self.nodes.max * self.devicesPerNode
        if self.devices is not None:
            return self.devices.min, self.devices.max
        return 1, 1


class Batch(_Model):
    global_: int = Field(alias="global", ge=1, le=MAX_GLOBAL_BATCH,
                         description="samples per optimizer step, fixed")
    microBatchMax: int = Field(ge=1, le=MAX_GLOBAL_BATCH,
                               description="per-device micro-batch cap (memory bound)")


class Checkpoint(_Model):
    dir: PathStr | None = Field(None, description="default: $FLEET_CHECKPOINT_ROOT/<job> when "
                                "set (Kubernetes), else <fleet home>/jobs/<job>/checkpoints")
    everySteps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                   description="checkpoint every N optimizer steps")
    keep: int = Field(3, ge=1, le=MAX_KEEP, description="keep the newest K (plus best)")


# A restart in place keeps the devices while at most this many attempts in a row failed
# without a new checkpoint; the next failure suggests a bad device: the job is planned afresh.
IN_PLACE_MAX_FAILURES = 2


class RestartPolicy(_Model):
    maxRestarts: int = Field(3, ge=0, le=MAX_RESTARTS, description="restarts are on by default")
    backoffSeconds: float = Field(2.0, ge=0, le=MAX_SECONDS)
    maxBackoffSeconds: float = Field(60.0, ge=0, le=MAX_SECONDS)
    hangTimeoutSeconds: float = Field(600.0, gt=0, le=MAX_SECONDS,
                                      description="heartbeat stall that counts as a hang")
    startupTimeoutSeconds: float = Field(600.0, gt=0, le=MAX_SECONDS, description=(
        "time a rank has from launch to its first heartbeat (interpreter start, imports, "
        "joining the collective); the hang timeout counts only after that"))
    inPlace: bool = Field(True, description=(
        "restart after a rank exit or hang on the same devices, keeping the placement "
        f"(after {IN_PLACE_MAX_FAILURES + 1} failures in a row without a new checkpoint the "
        "job is planned afresh)"))
    standby: bool = Field(True, description=(
        "keep one standby process per rank that has imported the workload (VOLO on CPU: "
        "and joined the next attempt's cluster and compiled), so that a restart in place "
        "skips the imports (and the join and graph loads); about 0.5 GB of host memory per "
        "rank"))
    saveOnFailure: bool = Field(True, description=(
        "when a rank fails, one surviving rank per node saves the last optimizer step all "
        "ranks completed, so the restart redoes no step (where parameters are in host "
        "memory, i.e. CPU ranks; on NPUs the restart resumes from the periodic checkpoint)"))


# What a dataset maker's environment keeps of the submitter's: enough to find Python and
# a home, never tokens (GRAFANA_TOKEN, RAY_AUTH_TOKEN, cloud credentials...).
MAKER_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
                  "VIRTUAL_ENV", "SYSTEMROOT")


def maker_env(environ: dict[str, str], workdir: str) -> dict[str, str]:
    """The cleaned environment a dataset maker runs with."""
    env = {k: v for k, v in environ.items() if k in MAKER_ENV_KEEP or k.startswith("LC_")}
    env["PYTHONPATH"] = workdir
    return env


class DataCreate(_Model):
    module: Annotated[str, StringConstraints(max_length=MAX_PATH_COMPONENT)] = Field(
        description="python -m MODULE --out DIR creates the data if missing")

    @field_validator("module")
    @classmethod
    def _mod(cls, v: str) -> str:
        makers = workloads.dataset_makers()
        if v not in makers:
            # it runs on the submitting machine before any cluster is involved: only the
            # makers a workload's adapter declares, never any importable module
            raise ValueError(f"{v[:80]!r} is not a registered dataset maker; "
                             f"data.create.module may be {', '.join(sorted(makers))}")
        return v


class Data(_Model):
    dir: PathStr = Field(description="dataset root (relative paths: from the spec file)")
    create: DataCreate | None = None


# Flags the launcher itself passes to each kind's ranks (launcher/ranks.py), with the spec
# field that sets them. An override of one would win over the launcher's (argparse keeps
# the last) and bypass check_paths and the planner; "help" would end the rank with exit 0.
TRAIN_OWNED = {"config": "spec.config", "data_dir": "spec.data.dir",
               "ckpt_save_dir": "spec.checkpoint.dir", "device_target":
               "spec.resources.deviceType", "distribute": "the plan's device count",
               "batch_size": "the plan (spec.batch.microBatchMax caps it)",
               "gradient_accumulation_steps": "the plan", "global_batch": "spec.batch.global",
               "ckpt_save_steps": "spec.checkpoint.everySteps",
               "keep_checkpoint_max": "spec.checkpoint.keep",
               "resume": "the launcher (restarts resume from spec.checkpoint.dir)",
               "ckpt_path": "the launcher", "help": "nothing (it is not a config flag)"}
VALIDATE_OWNED = {"config": "spec.config", "data_dir": "spec.data.dir",
                  "ckpt_path": "spec.checkpoint", "device_target": "spec.resources.deviceType",
                  "help": "nothing (it is not a config flag)"}
EXPORT_OWNED = {"ckpt_path": "spec.checkpoint", "model": "spec.model",
                "format": "spec.format", "out": "spec.out",
                "help": "nothing (it is not a config flag)"}

_SCALAR_SCHEMA = [{"type": "string", "maxLength": MAX_TEXT}, {"type": "number"},
                  {"type": "boolean"}, {"type": "null"}]
OVERRIDES_SCHEMA = {"maxProperties": MAX_OVERRIDES, "propertyNames": {
    "pattern": OVERRIDE_KEY.pattern, "maxLength": 64}, "additionalProperties": {
    "anyOf": [*_SCALAR_SCHEMA, {"type": "array", "maxItems": MAX_OVERRIDE_LIST,
                                "items": {"anyOf": _SCALAR_SCHEMA}}]}}


def _override_scalar(k: str, val: Any, in_list: bool = False) -> None:
    if val is None or isinstance(val, bool):
        return
    if isinstance(val, int):
        if abs(val) >= 2**63:
            raise ValueError(f"override {k!r}: {val} is out of range (|value| < 2^63)")
        return
    if isinstance(val, float):
        if not math.isfinite(val):
            raise ValueError(f"override {k!r}: {val} is not a finite number")
        return
    if isinstance(val, str):
        if len(val) > MAX_TEXT or "\x00" in val:
            raise ValueError(f"override {k!r}: a value is longer than {MAX_TEXT} characters "
                             "or contains NUL")
        if val.startswith("-"):
            raise ValueError(f"override {k!r}: value {val[:40]!r} starts with '-', which "
                             "the rank would read as a flag")
        if in_list and "," in val:
            raise ValueError(f"override {k!r}: list items may not contain ',' (lists are "
                             "passed comma-separated)")
        return
    what = "a list" if isinstance(val, list) else type(val).__name__
    raise ValueError(f"override {k!r}: {what} inside a list is not allowed; values are "
                     "scalars or flat lists of scalars" if in_list else
                     f"override {k!r}: a {what} is not a config flag value; use a scalar "
                     "or a flat list of scalars")


def _check_overrides(v: dict[str, Any], owned: dict[str, str]) -> dict[str, Any]:
    if len(v) > MAX_OVERRIDES:
        raise ValueError(f"at most {MAX_OVERRIDES} overrides")
    for k, val in v.items():
        if not isinstance(k, str) or len(k) > 64 or not OVERRIDE_KEY.match(k):
            raise ValueError(f"override key {str(k)[:70]!r} must be a snake_case config flag "
                             "name (at most 64 characters)")
        # argparse also takes an unambiguous prefix of a flag: `data_d` is `data_dir`.
        flag = next((o for o in owned if o.startswith(k)), None)
        if flag is not None:
            what = "is" if flag == k else f"abbreviates --{flag}, which is"
            raise ValueError(f"override {k!r} {what} set by the launcher; use "
                             f"{owned[flag]} instead")
        if isinstance(val, list):
            if len(val) > MAX_OVERRIDE_LIST:
                raise ValueError(f"override {k!r}: at most {MAX_OVERRIDE_LIST} list items")
            for item in val:
                _override_scalar(k, item, in_list=True)
        else:
            _override_scalar(k, val)
    return v


def _overrides_field(description: str | None = None) -> Any:
    return Field(default_factory=dict, description=description,
                 json_schema_extra=OVERRIDES_SCHEMA)


class CheckpointRef(_Model):
    """Which checkpoint a validate/export step uses."""

    path: PathStr | None = Field(None, description="an explicit checkpoint directory or file")
    fromStep: StepName | None = Field(None,
                                      description="workflow step whose checkpoints to use")
    select: Literal["best", "latest"] = "best"

    @model_validator(mode="after")
    def _one(self) -> CheckpointRef:
        if (self.path is None) == (self.fromStep is None):
            raise ValueError("give exactly one of path or fromStep")
        return self


DEFAULT_WORKLOAD = "volo"


def _known_workload(name: str) -> str:
    if name not in workloads.names():
        raise ValueError(f"unknown workload {name[:80]!r}; known: {', '.join(workloads.names())}")
    return name


# A workload registered by its adapter (launcher/workloads.py); the schema lists the built-in ones.
WorkloadName = Annotated[str, AfterValidator(_known_workload), WithJsonSchema(
    {"type": "string", "enum": list(workloads.BUILTIN)})]


class TrainSpec(_Model):
    workload: WorkloadName = Field(
        DEFAULT_WORKLOAD, description="the workload whose ranks run the job: volo (the VOLO "
        "train loop) or smoke (model-free burn-in ranks)")
    config: PathStr = Field(description="recipe YAML in MindCV's format")
    overrides: dict[str, Any] = _overrides_field("recipe flags, e.g. {epoch_size: 2}")
    data: Data
    resources: Resources = Field(default_factory=Resources)
    batch: Batch
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
                          description="higher runs first; FIFO within a priority")

    _ov = field_validator("overrides")(classmethod(
        lambda cls, v: _check_overrides(v, TRAIN_OWNED)))

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainSpec:
        lo, hi = self.resources.device_range()
        req = Request(lo, hi, self.batch.global_, self.batch.microBatchMax)
        why = explain_infeasible(req, self.resources.topology())
        if why:
            raise ValueError(why)
        return self

    def request(self) -> Request:
        lo, hi = self.resources.device_range()
        return Request(lo, hi, self.batch.global_, self.batch.microBatchMax)

    def feasible_counts(self) -> list[int]:
        r = self.request()
        return feasible_device_counts(r.global_batch, r.micro_batch_cap, r.min_devices,
                                      r.max_devices, self.resources.topology())


class ValidateSpec(_Model):
    workload: WorkloadName = DEFAULT_WORKLOAD
    config: PathStr
    overrides: dict[str, Any] = _overrides_field()
    data: Data
    checkpoint: CheckpointRef
    resources: Resources = Field(default_factory=Resources)
    restart: RestartPolicy = Field(default_factory=lambda: RestartPolicy(maxRestarts=1))
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    _ov = field_validator("overrides")(classmethod(
        lambda cls, v: _check_overrides(v, VALIDATE_OWNED)))

    @model_validator(mode="after")
    def _single(self) -> ValidateSpec:
        if self.resources.device_range() != (1, 1):
            raise ValueError("validation runs on exactly 1 device (devices: {min: 1, max: 1})")
        return self


class ExportSpec(_Model):
    workload: WorkloadName = DEFAULT_WORKLOAD
    model: ModelName = Field(description="model name, e.g. volo_tiny")
    checkpoint: CheckpointRef
    format: Literal["MINDIR", "AIR", "ONNX"] = "MINDIR"
    out: PathStr = Field(description="output file (relative: under the job's workspace)")
    overrides: dict[str, Any] = _overrides_field("extra export flags, e.g. {num_classes: 10}")
    restart: RestartPolicy = Field(default_factory=lambda: RestartPolicy(maxRestarts=0))
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    _ov = field_validator("overrides")(classmethod(
        lambda cls, v: _check_overrides(v, EXPORT_OWNED)))


class TrainJob(_Model):
    apiVersion: Literal["fleet/v1"]
    kind: Literal["TrainJob"]
    metadata: Metadata
    spec: TrainSpec


class ValidateJob(_Model):
    apiVersion: Literal["fleet/v1"]
    kind: Literal["ValidateJob"]
    metadata: Metadata
    spec: ValidateSpec


class ExportJob(_Model):
    apiVersion: Literal["fleet/v1"]
    kind: Literal["ExportJob"]
    metadata: Metadata
    spec: ExportSpec


class _StepBase(_Model):
    name: StepName
    needs: list[StepName] = Field(default_factory=list, max_length=MAX_WORKFLOW_STEPS)

    _check_name = field_validator("name")(classmethod(lambda cls, v: _dns_name(v)))


class TrainStep(_StepBase):
    kind: Literal["TrainJob"]
    spec: TrainSpec


class ValidateStep(_StepBase):
    kind: Literal["ValidateJob"]
    spec: ValidateSpec


class ExportStep(_StepBase):
    kind: Literal["ExportJob"]
    spec: ExportSpec


Step = Annotated[TrainStep | ValidateStep | ExportStep, Field(discriminator="kind")]


class WorkflowSpec(_Model):
    steps: list[Step] = Field(min_length=1, max_length=MAX_WORKFLOW_STEPS)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    @model_validator(mode="after")
    def _dag(self) -> WorkflowSpec:
        names = [s.name for s in self.steps]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate step names: {sorted(dup)}")
        known = set(names)
        needs = {s.name: set(s.needs) for s in self.steps}
        for s in self.steps:
            for n in s.needs:
                if n not in known:
                    raise ValueError(f"step {s.name!r} needs unknown step {n!r} "
                                     f"(steps: {', '.join(names)})")
        for s in self.steps:
            ref = getattr(s.spec, "checkpoint", None)
            if (isinstance(ref, CheckpointRef) and ref.fromStep is not None
                    and ref.fromStep not in _ancestors(s.name, needs)):
                raise ValueError(f"step {s.name!r} takes checkpoints from "
                                 f"{ref.fromStep!r}, so {ref.fromStep!r} must run first: "
                                 "list it (or a step that needs it) in needs:")
        # Cycle check: Kahn's algorithm.
        indeg = {s.name: len(s.needs) for s in self.steps}
        users: dict[str, list[str]] = {n: [] for n in names}
        for s in self.steps:
            for n in s.needs:
                users[n].append(s.name)
        ready = [n for n, d in indeg.items() if d == 0]
        seen = 0
        while ready:
            n = ready.pop()
            seen += 1
            for u in users[n]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    ready.append(u)
        if seen != len(names):
            raise ValueError("steps' needs: form a cycle")
        return self


def _ancestors(name: str, needs: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(needs.get(name, ()))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += needs.get(n, ())
    return seen


class Workflow(_Model):
    apiVersion: Literal["fleet/v1"]
    kind: Literal["Workflow"]
    metadata: Metadata
    spec: WorkflowSpec


JobDoc = Annotated[TrainJob | ValidateJob | ExportJob | Workflow, Field(discriminator="kind")]
KINDS = ("TrainJob", "ValidateJob", "ExportJob", "Workflow")


class _Root(BaseModel):
    doc: JobDoc


# ---------------------------------------------------------------- YAML + errors

class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses what a job spec never needs and an attacker would use.

    Aliases expand a few hundred bytes into gigabytes (a "billion laughs") after every
    size check has passed, and a self-referencing one makes a cyclic document that
    recursion over it never leaves; nesting deeper than any spec needs exhausts Python's
    stack in the composer. All three are refused while composing, before anything is
    built. Duplicate keys are refused too: YAML keeps the last one silently."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(event.start_mark, "anchors and aliases (&name, *name) are not "
                                             "allowed in a job spec; write the value out")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor):  # noqa: ANN001
        node = super().compose_mapping_node(anchor)
        seen: set = set()
        for k, _v in node.value:
            key = (k.tag, k.value) if isinstance(k, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise _Refused(k.start_mark, f"duplicate key {str(k.value)[:60]!r}")
            seen.add(key)
        return node


class _Refused(Exception):
    def __init__(self, mark: yaml.Mark, message: str):
        super().__init__(message)
        self.mark = mark
        self.message = message


def _line_index(root: yaml.Node | None) -> dict[tuple, int]:
    """Map each field path (tuple of keys / list indexes) to its 1-based line."""
    out: dict[tuple, int] = {}
    todo: list[tuple[yaml.Node, tuple]] = [] if root is None else [(root, ())]
    while todo:  # iterative: the loader bounds depth, but an index must not recurse anyway
        node, path = todo.pop()
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                out[path + (key,)] = k.start_mark.line + 1
                todo.append((v, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                todo.append((v, path + (i,)))
    return out


def _yaml_problem(e: yaml.YAMLError, file: str) -> tuple[str, str]:
    mark = getattr(e, "problem_mark", None)
    where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
    problem = getattr(e, "problem", None) or str(e)
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and ctx_mark is not None:
        # "while parsing a flow sequence" at the line it opened: usually the real mistake
        # (an unclosed bracket) is there, lines above where the parser gave up.
        problem += f" ({ctx} that opened at line {ctx_mark.line + 1}, column " \
                   f"{ctx_mark.column + 1})"
    return where, f"malformed YAML: {problem}"


def _flow_too_deep(text: str) -> int | None:
    """The line where `[`/`{` nesting first exceeds MAX_DEPTH, else None.

    Checked before PyYAML sees the text: its scanner keeps one possible simple key per
    open flow level and rescans them on every token, so deep flow nesting costs
    tokens x depth (256 KB of '[' would take hours) before the composer's own depth check
    could run. Quoted scalars and comments are skipped; block nesting is cheap to scan and
    is left to the composer."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    depth, line, i, n = 0, 1, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n"):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif c in "'\"" and (i == 0 or text[i - 1] in " \t\n[{,:-?"):
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if c == '"' and text[j] == "\\" else 1
            line += text.count("\n", i, j)
            i = j + 1
            continue
        i += 1
    return None


def load_yaml(text: str, file: str = "<spec>") -> tuple[Any, dict[tuple, int]]:
    """The document and its line index, from one bounded compose."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise SpecError(file, [("(file)", f"{size} bytes is larger than a job spec may be "
                                          f"({MAX_SPEC_BYTES} bytes)")])
    deep = _flow_too_deep(text)
    if deep is not None:
        raise SpecError(file, [(f"{file}:{deep}", f"nested deeper than {MAX_DEPTH} levels")])
    loader = None
    try:
        loader = _SpecLoader(text)  # reads the first chunk: may raise a ReaderError
        root = loader.get_single_node()
        doc = loader.construct_document(root) if root is not None else None
    except _Refused as e:
        raise SpecError(file, [(f"{file}:{e.mark.line + 1}:{e.mark.column + 1}",
                                e.message)]) from None
    except yaml.YAMLError as e:
        raise SpecError(file, [_yaml_problem(e, file)]) from None
    except (ValueError, OverflowError) as e:  # e.g. a timestamp PyYAML cannot build
        raise SpecError(file, [("(document)", f"malformed YAML value: {e}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return doc, _line_index(root)


def _fmt_path(path: tuple) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "(document)"


def _clean_loc(loc: tuple, doc: Any) -> tuple:
    """Drop pydantic's union/discriminator tags so the path matches the YAML."""
    out: list = []
    node = doc
    for p in loc[1:] if loc and loc[0] == "doc" else loc:
        if isinstance(p, str) and p in KINDS + ("TrainStep", "ValidateStep", "ExportStep") \
                and not (isinstance(node, dict) and p in node):
            continue
        if p == "global_":
            p = "global"
        out.append(p)
        if isinstance(node, dict):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            node = None
    return tuple(out)


def _allowed_fields(doc: Any, path: tuple) -> list[str]:
    """Field names allowed next to the unknown field at `path` (for "did you mean")."""
    model: Any = _Root
    node: Any = {"doc": doc}
    for p in ("doc", *path[:-1]):
        if isinstance(node, dict) and not isinstance(p, int):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
            node = node[p]
        else:
            return []
        model = _pick(_member_types(model, p), node)
        if model is None:
            return []
    fields = getattr(model, "model_fields", None) or {}
    return [f.alias or n for n, f in fields.items()]


def _member_types(model: Any, key: Any) -> list:
    """The types that may validate `model[key]`: a field's annotation, or a list's items."""
    if isinstance(key, int):
        args = typing.get_args(model) if typing.get_origin(model) is list else ()
        return _flatten(args[0]) if args else []
    fields = getattr(model, "model_fields", {})
    f = fields.get(key) or next((x for x in fields.values() if x.alias == key), None)
    return [] if f is None else _flatten(f.annotation)


def _flatten(tp: Any) -> list:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _flatten(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [x for a in typing.get_args(tp) for x in _flatten(a)]
    return [tp]


def _pick(cands: list, node: Any) -> Any:
    """The candidate type a value is validated by (a discriminated union: by its kind)."""
    for c in cands:
        if typing.get_origin(c) is list and isinstance(node, list):
            return c
        if isinstance(c, type) and issubclass(c, BaseModel) and isinstance(node, dict):
            kind = c.model_fields.get("kind")
            if kind is None or node.get("kind") in typing.get_args(kind.annotation):
                return c
    return None


def _explain(err: dict, doc: Any = None, path: tuple = ()) -> str:
    t = err["type"]
    msg = err["msg"]
    if t == "extra_forbidden":
        hint = ""
        if path and isinstance(path[-1], str):
            close = difflib.get_close_matches(path[-1], _allowed_fields(doc, path), n=1,
                                              cutoff=0.6)
            if close:
                hint = f"did you mean {close[0]!r}? "
        return (f"unknown field ({hint}check the spelling; `fleet schema` lists the allowed "
                "fields)")
    if t == "missing":
        return "required field is missing"
    if t == "literal_error":
        return f"{msg}"
    if t == "union_tag_invalid":
        tags = (err.get("ctx") or {}).get("expected_tags") or ", ".join(KINDS)
        return f"kind must be one of {tags}"
    if t == "int_parsing_size" or (t == "int_from_float" and isinstance(
            err.get("input"), float) and not math.isfinite(err["input"])):
        return "number out of range for this field (`fleet schema` gives its bounds)"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg


AnyJob = TrainJob | ValidateJob | ExportJob | Workflow


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_plain(doc: Any) -> None:
    """A document that did not come through `load_yaml` (the controller's `submit` over
    Ray) gets the same bounds: plain JSON-like values, bounded depth and size."""
    todo: list[tuple[Any, int]] = [(doc, 1)]
    count = 0
    while todo:
        v, depth = todo.pop()
        count += 1
        if depth > MAX_DEPTH or count > MAX_SPEC_BYTES:
            raise SpecError("<submitted>", [("(document)", f"nested deeper than {MAX_DEPTH} "
                                                           "levels or too large")])
        if isinstance(v, dict):
            todo += [(x, depth + 1) for x in v.values()]
            todo += [(k, depth + 1) for k in v]
        elif isinstance(v, list):
            todo += [(x, depth + 1) for x in v]
        elif not (v is None or isinstance(v, str | int | float | bool)):
            raise SpecError("<submitted>", [("(document)", f"{type(v).__name__} is not a "
                                                           "spec value")])


def parse_doc(doc: Any, file: str = "<spec>", text: str | None = None,
              origin: dict[tuple, str] | None = None,
              lines: dict[tuple, int] | None = None) -> AnyJob:
    """Validate a loaded YAML document; raise SpecError naming lines and field paths.

    `lines` is the document's line index (from `load_yaml`); without it but with `text`
    it is built here, once."""
    if lines is None:
        if text is not None:
            _, lines = load_yaml(text, file)
        else:
            _check_plain(doc)
            lines = {}
    if not isinstance(doc, dict):
        raise SpecError(file, [("(document)", "a job spec must be a YAML mapping with "
                                              "apiVersion, kind, metadata and spec")])
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError(file, [(_where(("apiVersion",), lines, file, origin),
                                f"apiVersion must be {API_VERSION!r}, got "
                                f"{_short(doc.get('apiVersion'))}")])
    if doc.get("kind") not in KINDS:
        raise SpecError(file, [(_where(("kind",), lines, file, origin),
                                f"kind must be one of {', '.join(KINDS)}, got "
                                f"{_short(doc.get('kind'))}")])
    try:
        return _Root.model_validate({"doc": doc}).doc
    except ValidationError as e:
        problems = []
        for err in e.errors():
            path = _clean_loc(err["loc"], doc)
            if err["type"] == "union_tag_invalid":
                path = path + ("kind",)
            problems.append((_where(path, lines, file, origin), _explain(err, doc, path)))
        raise SpecError(file, problems) from None


def _where(path: tuple, lines: dict[tuple, int], file: str,
           origin: dict[tuple, str] | None) -> str:
    if origin:
        for i in range(len(path), 0, -1):  # a --set of a mapping covers the fields in it
            if path[:i] in origin:
                return f"{origin[path[:i]]} {_fmt_path(path)}"
    p = path
    while p and p not in lines:
        p = p[:-1]  # a missing field: point at its parent mapping
    line = lines.get(p)
    return f"{file}:{line} {_fmt_path(path)}" if line else f"{file} {_fmt_path(path)}"


_SET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SET_STEP = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class _StepSelector(str):
    """`[name]` in a --set key: the list item whose `name` is this."""


def parse_set(item: str) -> tuple[tuple, Any]:
    """`spec.steps[0].spec.batch.global=64` -> (("spec", "steps", 0, "spec", "batch",
    "global"), 64). A list index is `[N]` (or `.N`); `[name]` picks the list item with that
    name (a workflow step). Values are YAML scalars or flow collections, without aliases."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. spec.batch.global=64")
    if len(item) > MAX_TEXT:
        raise ValueError(f"--set: longer than {MAX_TEXT} characters")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts: list = []
    i = 0
    while i < len(key):
        if key[i] == "[":
            j = key.find("]", i)
            inner = key[i + 1:j] if j > 0 else ""
            if not parts or not (inner.isdigit() or _SET_STEP.fullmatch(inner)):
                raise ValueError(f"--set {item!r}: expected [N] or [step-name] after a "
                                 "field name")
            parts.append(int(inner) if inner.isdigit() else _StepSelector(inner))
            i = j + 1
            continue
        if parts:
            if key[i] != ".":
                raise ValueError(f"--set {item!r}: expected '.' or '[' at {key[i:]!r}")
            i += 1
        m = re.compile(r"\d+|" + _SET_NAME.pattern).match(key, i)
        if m is None:
            raise ValueError(f"--set {item!r}: empty or invalid path component at "
                             f"{key[i:]!r}")
        tok = m.group()
        parts.append(int(tok) if tok.isdigit() else tok)
        i = m.end()
    if not parts:
        raise ValueError(f"--set {item!r}: empty key")
    value: Any = raw
    if raw != "":
        with contextlib.suppress(SpecError):
            value, _ = load_yaml(raw, "--set")
    return tuple(parts), value


def apply_sets(doc: Any, sets: list[str]) -> dict[tuple, str]:
    """Apply --set overrides in place; returns {path: '--set ...'} for error messages
    (every path a --set created or replaced, so errors inside it name the --set)."""
    origin: dict[tuple, str] = {}
    for item in sets:
        raw_path, value = parse_set(item)
        where = f"--set {item}"
        if isinstance(doc, dict) and doc.get("kind") == "Workflow" and len(raw_path) > 1 \
                and raw_path[0] == "spec" and raw_path[1] not in ("steps", "priority"):
            steps = [s.get("name") for s in (doc.get("spec") or {}).get("steps") or []
                     if isinstance(s, dict)]
            raise ValueError(
                f"--set {item!r}: a Workflow's spec has only steps and priority; a step's "
                f"field is spec.steps[N].spec.{'.'.join(map(str, raw_path[1:]))} or "
                f"spec.steps[<name>].spec.… (steps: {', '.join(map(str, steps))})")
        path: list = []
        node = doc
        for i, p in enumerate(raw_path):
            last = i == len(raw_path) - 1
            if isinstance(node, list):
                if isinstance(p, _StepSelector):
                    idx = next((k for k, x in enumerate(node)
                                if isinstance(x, dict) and x.get("name") == p), None)
                    if idx is None:
                        names = [x.get("name") for x in node if isinstance(x, dict)]
                        raise ValueError(f"--set {item!r}: no item named {str(p)!r} in "
                                         f"{_fmt_path(tuple(path))} (names: "
                                         f"{', '.join(map(str, names))})")
                    p = idx
                if not isinstance(p, int) or p >= len(node):
                    raise ValueError(f"--set {item!r}: {_fmt_path(tuple(path))} has "
                                     f"{len(node)} items; index {p} is out of range")
            elif isinstance(node, dict):
                if isinstance(p, int | _StepSelector):
                    raise ValueError(f"--set {item!r}: {_fmt_path(tuple(path))} is a "
                                     "mapping, not a list")
                if not last and (p not in node or node[p] is None):
                    nxt = raw_path[i + 1]
                    node[p] = [] if isinstance(nxt, int) else {}
                    origin.setdefault(tuple(path) + (p,), where)
            else:
                raise ValueError(f"--set {item!r}: {_fmt_path(tuple(path))} is not a "
                                 "mapping or list")
            path.append(str(p) if isinstance(p, _StepSelector) else p)
            if last:
                node[p] = value
            else:
                node = node[p]
        origin[tuple(path)] = where
    return origin


def load_text(text: str, file: str = "<spec>", sets: list[str] | None = None):
    doc, lines = load_yaml(text, file)
    origin: dict[tuple, str] = {}
    if sets:
        if not isinstance(doc, dict):
            raise SpecError(file, [("(document)", "cannot apply --set to a non-mapping")])
        try:
            origin = apply_sets(doc, list(sets))
        except ValueError as e:
            raise SpecError(file, [("--set", str(e))]) from None
    return parse_doc(doc, file, origin=origin, lines=lines), doc


def load_file(path: str | Path, sets: list[str] | None = None):
    """Load and validate a spec file (models only; see `check_paths` for files)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), [("(file)", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(str(path), [("(file)", f"cannot read: {e}")]) from None
    return load_text(text, str(path), sets)


# ---------------------------------------------------------------- paths

def project_root(spec_file: Path) -> Path:
    """The project a spec lives in: nearest ancestor with pyproject.toml or .git."""
    d = spec_file.resolve().parent
    for cand in (d, *d.parents):
        if (cand / "pyproject.toml").exists() or (cand / ".git").exists():
            return cand
    return d


# Operator-configured roots (set on Kubernetes by k8s/base): when set, every data,
# checkpoint or export path of a spec must resolve inside its root.
DATA_ROOT_ENV = "FLEET_DATA_ROOT"
EXPORT_ROOT_ENV = "FLEET_EXPORT_ROOT"
ROOT_OF = {"data_dir": DATA_ROOT_ENV, "ckpt_dir": CHECKPOINT_ROOT_ENV,
            "ckpt_path": CHECKPOINT_ROOT_ENV, "out": EXPORT_ROOT_ENV}
STEP_PATH_KEYS = ("config", "data_dir", "ckpt_path", "ckpt_dir", "out")


def resolve_path(raw: str, base: Path, root: Path, field: str, file: str,
                 allowed_root: str | None = None, root_env: str = "") -> Path:
    """Relative paths are taken from `base` and must stay under `root`; absolute paths
    (shared volumes at fixed mount points) are allowed, and with `allowed_root` (an
    operator's FLEET_*_ROOT) every path must resolve inside it."""
    p = Path(raw).expanduser()
    try:
        full = p.resolve() if p.is_absolute() else (base / p).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL...
        raise SpecError(file, [(field, f"cannot resolve {raw[:80]!r}: {e}")]) from None
    if not p.is_absolute() and not full.is_relative_to(root.resolve()):
        raise SpecError(file, [(field, f"relative path {raw!r} escapes its root {root}; "
                                       "use a path inside the project or an absolute path")])
    if allowed_root and not full.is_relative_to(Path(allowed_root).resolve()):
        raise SpecError(file, [(field, f"{full} is outside {root_env}={allowed_root}, where "
                                       "this fleet keeps them; use a path inside it")])
    return full


def _recipe_problems(spec: Any, cfg: Path, field: str) -> list[tuple[str, str]]:
    """The recipe's values as the workload's ranks check them before they start."""
    check = workloads.adapter(getattr(spec, "workload", DEFAULT_WORKLOAD)).check_recipe
    if check is None:
        return []
    return [(field, f"recipe {cfg}: key {key!r}: {why}" if key != "config" else why)
            for key, why in check(cfg, getattr(spec, "overrides", {}))]


def steps_of(job) -> list[tuple[str, str, Any]]:
    """[(step name, kind, spec)] - a single job is a one-step list."""
    if isinstance(job, Workflow):
        return [(s.name, s.kind, s.spec) for s in job.spec.steps]
    return [(job.metadata.name, job.kind, job.spec)]


def job_paths(job, base: Path, root: Path, file: str,
              environ: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Every step's paths resolved (no check that they exist): the client's view, and the
    controller's own recomputation from the same spec (it does not take the client's)."""
    env = os.environ if environ is None else environ
    is_wf = isinstance(job, Workflow)
    out: dict[str, dict[str, str]] = {}
    problems: list[tuple[str, str]] = []
    for i, (name, _kind, spec) in enumerate(steps_of(job)):
        prefix = f"spec.steps[{i}].spec" if is_wf else "spec"
        raw: dict[str, tuple[str, str]] = {}  # key -> (raw path, field)
        if hasattr(spec, "config"):
            raw["config"] = (spec.config, f"{prefix}.config")
        if hasattr(spec, "data"):
            raw["data_dir"] = (spec.data.dir, f"{prefix}.data.dir")
        ck = getattr(spec, "checkpoint", None)
        if isinstance(ck, CheckpointRef) and ck.path is not None:
            raw["ckpt_path"] = (ck.path, f"{prefix}.checkpoint.path")
        if isinstance(ck, Checkpoint) and ck.dir is not None:
            raw["ckpt_dir"] = (ck.dir, f"{prefix}.checkpoint.dir")
        if isinstance(spec, ExportSpec):
            raw["out"] = (spec.out, f"{prefix}.out")
        res: dict[str, str] = {}
        for key, (value, field) in raw.items():
            env_name = ROOT_OF.get(key, "")
            try:
                res[key] = str(resolve_path(value, base, root, field, file,
                                            env.get(env_name) or None, env_name))
            except SpecError as e:
                problems += e.problems
        out[name] = res
    if problems:
        raise SpecError(file, problems)
    return out


def check_paths(job, spec_file: str | Path, root: Path | None = None,
                create_data: bool = False) -> dict[str, dict[str, str]]:
    """Check files on this machine; return resolved absolute paths per step.

    With `create_data`, a missing data dir that has `data.create` is not an
    error (the submitter creates it before submitting).
    """
    f = Path(spec_file)
    base = f.resolve().parent
    root = root or project_root(f)
    out = job_paths(job, base, root, str(f))
    problems: list[tuple[str, str]] = []
    is_wf = isinstance(job, Workflow)
    created = {Path(out[name]["data_dir"]) for name, _k, sp in steps_of(job)
               if create_data and getattr(sp, "data", None) is not None
               and sp.data.create is not None}
    for i, (name, _kind, spec) in enumerate(steps_of(job)):
        prefix = f"spec.steps[{i}].spec" if is_wf else "spec"
        res = out[name]
        if "config" in res and not Path(res["config"]).is_file():
            problems.append((f"{prefix}.config", f"recipe file {res['config']} does not exist"))
        elif "config" in res:
            problems += _recipe_problems(spec, Path(res["config"]), f"{prefix}.config")
        if "data_dir" in res:
            d = Path(res["data_dir"])
            if not d.is_dir() and d not in created:
                hint = (" (it has data.create: `fleet submit` creates it)"
                        if spec.data.create else "; create it or fix the path")
                problems.append((f"{prefix}.data.dir", f"data directory {d} does not "
                                                        f"exist{hint}"))
        if "ckpt_path" in res and not Path(res["ckpt_path"]).exists():
            problems.append((f"{prefix}.checkpoint.path", f"{res['ckpt_path']} does not exist"))
    if problems:
        raise SpecError(str(f), problems)
    return out


def json_schema() -> dict:
    schema = _Root.model_json_schema(by_alias=True)
    doc_schema = schema["properties"]["doc"]
    schema.pop("properties", None)
    schema.pop("required", None)
    schema.pop("type", None)
    schema.pop("title", None)
    schema.update(doc_schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ascend-fleet job spec (apiVersion fleet/v1)"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


SCHEMA_FILE = Path(__file__).with_name("schema.json")
