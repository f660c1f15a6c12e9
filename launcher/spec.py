"""Job specs (`apiVersion: fleet/v1`): pydantic models, YAML loading, precise errors.

A spec is checked in two layers: the models (types, unknown fields, names, device
counts, batch feasibility - everything decidable from the document alone) and
`check_paths` (files on this machine: config and data exist, relative paths stay
inside the project root). Every error names file, line, field path and what is
allowed, because a user fixing a YAML file needs the line, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launcher.planner import Request, Topology, explain_infeasible, feasible_device_counts

API_VERSION = "fleet/v1"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
OVERRIDE_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


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
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Metadata(_Model):
    name: str = Field(description="DNS-1123 job name, e.g. volo-digits")
    labels: dict[str, str] = Field(default_factory=dict)

    _check_name = field_validator("name")(classmethod(lambda cls, v: _dns_name(v)))


class Range(_Model):
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class Resources(_Model):
    deviceType: Literal["NPU", "CPU"] = Field(
        "NPU", description="NPU on a fleet; CPU runs ranks as CPU processes (local stand-in)")
    devicesPerNode: int = Field(8, ge=1, le=64, description="chips per server (Ascend 910: 8)")
    devices: Range | None = Field(None, description="total devices, min..max")
    nodes: Range | None = Field(None, description="whole servers, min..max (alternative)")
    cpusPerDevice: float = Field(1.0, gt=0, description="Ray CPUs reserved per device")

    @model_validator(mode="after")
    def _one_of(self) -> Resources:
        if self.devices is not None and self.nodes is not None:
            raise ValueError("give either devices or nodes, not both")
        topo = self.topology()
        lo, hi = self.device_range()
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
    global_: int = Field(alias="global", ge=1, description="samples per optimizer step, fixed")
    microBatchMax: int = Field(ge=1, description="per-device micro-batch cap (memory bound)")


class Checkpoint(_Model):
    dir: str | None = Field(None, description="default: $FLEET_CHECKPOINT_ROOT/<job> when set "
                            "(Kubernetes), else <fleet home>/jobs/<job>/checkpoints")
    everySteps: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps")
    keep: int = Field(3, ge=1, description="keep the newest K (plus best)")


class RestartPolicy(_Model):
    maxRestarts: int = Field(3, ge=0, description="restarts are on by default")
    backoffSeconds: float = Field(2.0, ge=0)
    maxBackoffSeconds: float = Field(60.0, ge=0)
    hangTimeoutSeconds: float = Field(600.0, gt=0,
                                      description="heartbeat stall that counts as a hang")
    startupTimeoutSeconds: float = Field(600.0, gt=0, description=(
        "time a rank has from launch to its first heartbeat (interpreter start, imports, "
        "joining the collective); the hang timeout counts only after that"))
    inPlace: bool = Field(True, description=(
        "restart after a rank exit or hang on the same devices, keeping the placement "
        "(after 3 failures in a row without a new checkpoint the job is planned afresh)"))
    standby: bool = Field(True, description=(
        "keep one standby process per rank that has imported the workload (VOLO on CPU: "
        "and joined the next attempt's cluster and compiled), so that a restart in place "
        "skips the imports (and the join and graph loads); about 0.5 GB of host memory per "
        "rank"))
    saveOnFailure: bool = Field(True, description=(
        "when a rank fails, one surviving rank per node saves the last optimizer step all "
        "ranks completed, so the restart redoes no step (where parameters are in host "
        "memory, i.e. CPU ranks; on NPUs the restart resumes from the periodic checkpoint)"))


class DataCreate(_Model):
    module: str = Field(description="python -m MODULE --out DIR creates the data if missing")

    @field_validator("module")
    @classmethod
    def _mod(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", v):
            raise ValueError(f"{v!r} is not a python module path like workloads.volo.digits")
        return v


class Data(_Model):
    dir: str = Field(description="dataset root (relative paths: from the spec file)")
    create: DataCreate | None = None


def _check_overrides(v: dict[str, Any]) -> dict[str, Any]:
    for k, val in v.items():
        if not OVERRIDE_KEY.match(k):
            raise ValueError(f"override key {k!r} must be a snake_case config flag name")
        if isinstance(val, dict):
            raise ValueError(f"override {k!r}: nested mappings are not config flags")
    return v


class CheckpointRef(_Model):
    """Which checkpoint a validate/export step uses."""

    path: str | None = Field(None, description="an explicit checkpoint directory or file")
    fromStep: str | None = Field(None, description="workflow step whose checkpoints to use")
    select: Literal["best", "latest"] = "best"

    @model_validator(mode="after")
    def _one(self) -> CheckpointRef:
        if (self.path is None) == (self.fromStep is None):
            raise ValueError("give exactly one of path or fromStep")
        return self


WORKLOADS = ("volo", "smoke")


class TrainSpec(_Model):
    workload: Literal["volo", "smoke"] = Field(
        "volo", description="volo: workloads.volo.train; smoke: model-free burn-in ranks")
    config: str = Field(description="recipe YAML in MindCV's format")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="recipe flags, e.g. {epoch_size: 2}")
    data: Data
    resources: Resources = Field(default_factory=Resources)
    batch: Batch
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    priority: int = Field(0, description="higher runs first; FIFO within a priority")

    _ov = field_validator("overrides")(classmethod(lambda cls, v: _check_overrides(v)))

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
    workload: Literal["volo", "smoke"] = "volo"
    config: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    data: Data
    checkpoint: CheckpointRef
    resources: Resources = Field(default_factory=Resources)
    restart: RestartPolicy = Field(default_factory=lambda: RestartPolicy(maxRestarts=1))
    priority: int = 0

    _ov = field_validator("overrides")(classmethod(lambda cls, v: _check_overrides(v)))

    @model_validator(mode="after")
    def _single(self) -> ValidateSpec:
        if self.resources.device_range() != (1, 1):
            raise ValueError("validation runs on exactly 1 device (devices: {min: 1, max: 1})")
        return self


class ExportSpec(_Model):
    workload: Literal["volo", "smoke"] = "volo"
    model: str = Field(description="model name, e.g. volo_tiny")
    checkpoint: CheckpointRef
    format: Literal["MINDIR", "AIR", "ONNX"] = "MINDIR"
    out: str = Field(description="output file (relative: under the job's workspace)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="extra export flags, e.g. {num_classes: 10}")
    restart: RestartPolicy = Field(default_factory=lambda: RestartPolicy(maxRestarts=0))
    priority: int = 0

    _ov = field_validator("overrides")(classmethod(lambda cls, v: _check_overrides(v)))


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
    name: str
    needs: list[str] = Field(default_factory=list)

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
    steps: list[Step] = Field(min_length=1)
    priority: int = 0

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

def _line_index(text: str) -> dict[tuple, int]:
    """Map each field path (tuple of keys / list indexes) to its 1-based line."""
    out: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out

    def walk(node: yaml.Node, path: tuple) -> None:
        out[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                out[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
                out[path + (key,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return out


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


def _explain(err: dict) -> str:
    t = err["type"]
    msg = err["msg"]
    if t == "extra_forbidden":
        return "unknown field (check the spelling; `fleet schema` lists the allowed fields)"
    if t == "missing":
        return "required field is missing"
    if t == "literal_error":
        return f"{msg}"
    if t == "union_tag_invalid":
        tags = (err.get("ctx") or {}).get("expected_tags") or ", ".join(KINDS)
        return f"kind must be one of {tags}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg


AnyJob = TrainJob | ValidateJob | ExportJob | Workflow


def parse_doc(doc: Any, file: str = "<spec>", text: str | None = None,
              origin: dict[tuple, str] | None = None) -> AnyJob:
    """Validate a loaded YAML document; raise SpecError naming lines and field paths."""
    if not isinstance(doc, dict):
        raise SpecError(file, [("(document)", "a job spec must be a YAML mapping with "
                                              "apiVersion, kind, metadata and spec")])
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError(file, [(_where(("apiVersion",), text, file, origin),
                                f"apiVersion must be {API_VERSION!r}, got "
                                f"{doc.get('apiVersion')!r}")])
    if doc.get("kind") not in KINDS:
        raise SpecError(file, [(_where(("kind",), text, file, origin),
                                f"kind must be one of {', '.join(KINDS)}, got "
                                f"{doc.get('kind')!r}")])
    try:
        return _Root.model_validate({"doc": doc}).doc
    except ValidationError as e:
        problems = []
        for err in e.errors():
            path = _clean_loc(err["loc"], doc)
            if err["type"] == "union_tag_invalid":
                path = path + ("kind",)
            problems.append((_where(path, text, file, origin), _explain(err)))
        raise SpecError(file, problems) from None


def _where(path: tuple, text: str | None, file: str, origin: dict[tuple, str] | None) -> str:
    if origin and path in origin:
        return f"{origin[path]} {_fmt_path(path)}"
    lines = _line_index(text) if text else {}
    p = path
    while p and p not in lines:
        p = p[:-1]  # a missing field: point at its parent mapping
    line = lines.get(p)
    return f"{file}:{line} {_fmt_path(path)}" if line else f"{file} {_fmt_path(path)}"


def parse_set(item: str) -> tuple[tuple, Any]:
    """`spec.batch.global=64` -> (("spec","batch","global"), 64). Values are YAML scalars."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. spec.batch.global=64")
    key, raw = item.split("=", 1)
    parts: list = []
    for p in key.strip().split("."):
        if not p:
            raise ValueError(f"--set {item!r}: empty path component")
        parts.append(int(p) if p.isdigit() else p)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return tuple(parts), value


def apply_sets(doc: Any, sets: list[str]) -> dict[tuple, str]:
    """Apply --set overrides in place; returns {path: '--set ...'} for error messages."""
    origin: dict[tuple, str] = {}
    for item in sets:
        path, value = parse_set(item)
        node = doc
        for i, p in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(node, list):
                if not isinstance(p, int) or p >= len(node):
                    raise ValueError(f"--set {item!r}: index {p} out of range")
                node = node[p]
                continue
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {_fmt_path(path[:i])} is not a mapping")
            if p not in node or node[p] is None:
                node[p] = [] if isinstance(nxt, int) else {}
            node = node[p]
        last = path[-1]
        if isinstance(node, dict) or (
                isinstance(node, list) and isinstance(last, int) and last < len(node)):
            node[last] = value
        else:
            raise ValueError(f"--set {item!r}: cannot set {_fmt_path(path)}")
        origin[path] = f"--set {item}"
    return origin


def load_text(text: str, file: str = "<spec>", sets: list[str] | None = None):
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(file, [(where, f"malformed YAML: {problem}")]) from None
    origin: dict[tuple, str] = {}
    if sets:
        if not isinstance(doc, dict):
            raise SpecError(file, [("(document)", "cannot apply --set to a non-mapping")])
        try:
            origin = apply_sets(doc, list(sets))
        except ValueError as e:
            raise SpecError(file, [("--set", str(e))]) from None
    return parse_doc(doc, file, text, origin), doc


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


def resolve_path(raw: str, base: Path, root: Path, field: str, file: str) -> Path:
    """Relative paths are taken from `base` and must stay under `root`.

    Absolute paths are allowed: shared volumes live at fixed mount points.
    """
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p.resolve()
    full = (base / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise SpecError(file, [(field, f"relative path {raw!r} escapes its root {root}; "
                                       "use a path inside the project or an absolute path")])
    return full


def _recipe_problems(cfg: Path, overrides: dict[str, Any], field: str) -> list[tuple[str, str]]:
    """The recipe's values as the train loop checks them before any rank starts."""
    from workloads.volo.config import recipe_file_problems

    return [(field, f"recipe {cfg}: key {key!r}: {why}" if key != "config" else why)
            for key, why in recipe_file_problems(cfg, overrides)]


def steps_of(job) -> list[tuple[str, str, Any]]:
    """[(step name, kind, spec)] - a single job is a one-step list."""
    if isinstance(job, Workflow):
        return [(s.name, s.kind, s.spec) for s in job.spec.steps]
    return [(job.metadata.name, job.kind, job.spec)]


def check_paths(job, spec_file: str | Path, root: Path | None = None,
                create_data: bool = False) -> dict[str, dict[str, str]]:
    """Check files on this machine; return resolved absolute paths per step.

    With `create_data`, a missing data dir that has `data.create` is not an
    error (the submitter creates it before submitting).
    """
    f = Path(spec_file)
    base = f.resolve().parent
    root = root or project_root(f)
    out: dict[str, dict[str, str]] = {}
    problems: list[tuple[str, str]] = []
    is_wf = isinstance(job, Workflow)
    created: set[Path] = set()  # data dirs some step's data.create will make
    if create_data:
        for _n, _k, sp in steps_of(job):
            data = getattr(sp, "data", None)
            if data is not None and data.create is not None:
                with contextlib.suppress(SpecError):
                    created.add(resolve_path(data.dir, base, root, "", str(f)))
    for i, (name, _kind, spec) in enumerate(steps_of(job)):
        prefix = f"spec.steps[{i}].spec" if is_wf else "spec"
        res: dict[str, str] = {}
        try:
            if hasattr(spec, "config"):
                cfg = resolve_path(spec.config, base, root, f"{prefix}.config", str(f))
                if not cfg.is_file():
                    problems.append((f"{prefix}.config", f"recipe file {cfg} does not exist"))
                elif getattr(spec, "workload", "volo") == "volo":
                    problems += _recipe_problems(cfg, getattr(spec, "overrides", {}),
                                                 f"{prefix}.config")
                res["config"] = str(cfg)
            if hasattr(spec, "data"):
                d = resolve_path(spec.data.dir, base, root, f"{prefix}.data.dir", str(f))
                if not d.is_dir() and d not in created:
                    hint = (" (it has data.create: `fleet submit` creates it)"
                            if spec.data.create else
                            "; create it or fix the path")
                    problems.append((f"{prefix}.data.dir", f"data directory {d} does not "
                                                            f"exist{hint}"))
                res["data_dir"] = str(d)
            ck = getattr(spec, "checkpoint", None)
            if isinstance(ck, CheckpointRef) and ck.path is not None:
                c = resolve_path(ck.path, base, root, f"{prefix}.checkpoint.path", str(f))
                if not c.exists():
                    problems.append((f"{prefix}.checkpoint.path", f"{c} does not exist"))
                res["ckpt_path"] = str(c)
            if isinstance(ck, Checkpoint) and ck.dir is not None:
                res["ckpt_dir"] = str(resolve_path(ck.dir, base, root,
                                                   f"{prefix}.checkpoint.dir", str(f)))
            if isinstance(spec, ExportSpec):
                res["out"] = str(resolve_path(spec.out, base, root, f"{prefix}.out", str(f)))
        except SpecError as e:
            problems += e.problems
        out[name] = res
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
