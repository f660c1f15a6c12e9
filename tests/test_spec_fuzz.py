"""Spec fuzzer: whatever a spec holds, parsing ends in a valid job or a clean SpecError,
fast and in bounded memory, and a valid job is one the controller can store and launch.

Two generators: mutations of a spec that sets every field (each field replaced by huge,
negative, NaN and infinite numbers, long or odd strings, wrong types, nested values), and
raw YAML text (deep nesting, anchors and aliases, tags, brackets, fragments spliced into a
valid spec). Derandomized, so a CI run always tries the same specs."""

from __future__ import annotations

import copy
import json
import math
import time
import tracemalloc
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher import spec as S
from launcher.planner import NodeSlice, Plan
from launcher.ranks import build_launch

PER_SPEC_S = 0.5          # "a fraction of a second", with room for a loaded 2-core CI box
PEAK_BYTES = 64 * 2**20   # memory one parse may take



def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    print_blob=False, suppress_health_check=[
                        HealthCheck.too_slow, HealthCheck.data_too_large,
                        HealthCheck.filter_too_much])


RAN: dict[str, int] = {}

FULL_TRAIN = {
    "workload": "volo", "config": "recipe.yaml",
    "overrides": {"epoch_size": 2, "scale": [0.5, 1.0], "auto_augment": None, "ema": True},
    "data": {"dir": "data", "create": {"module": "workloads.volo.digits"}},
    "resources": {"deviceType": "CPU", "devicesPerNode": 8, "devices": {"min": 1, "max": 16},
                  "cpusPerDevice": 1.5},
    "batch": {"global": 256, "microBatchMax": 32},
    "checkpoint": {"dir": "ckpt", "everySteps": 10, "keep": 3},
    "restart": {"maxRestarts": 3, "backoffSeconds": 2.0, "maxBackoffSeconds": 60.0,
                "hangTimeoutSeconds": 600.0, "startupTimeoutSeconds": 600.0, "inPlace": True,
                "standby": True, "saveOnFailure": True},
    "priority": 5,
}
FULL_WORKFLOW = {
    "apiVersion": "fleet/v1", "kind": "Workflow",
    "metadata": {"name": "wf", "labels": {"team": "vision"}},
    "spec": {"priority": 1, "steps": [
        {"name": "train", "kind": "TrainJob", "spec": FULL_TRAIN},
        {"name": "validate", "kind": "ValidateJob", "needs": ["train"], "spec": {
            "config": "recipe.yaml", "data": {"dir": "data"}, "overrides": {"num_samples": 64},
            "checkpoint": {"fromStep": "train", "select": "best"},
            "resources": {"deviceType": "CPU", "devices": {"min": 1, "max": 1}}}},
        {"name": "export", "kind": "ExportJob", "needs": ["validate"], "spec": {
            "model": "volo_tiny", "checkpoint": {"path": "ckpt/best.ckpt"}, "format": "MINDIR",
            "out": "out/model.mindir", "overrides": {"num_classes": 10}}},
    ]},
}
FULL_TRAINJOB = {"apiVersion": "fleet/v1", "kind": "TrainJob", "metadata": {"name": "job"},
                 "spec": FULL_TRAIN}


def _paths(node, prefix=()):
    """Every field path of a document (mappings and list items), leaves and inner nodes."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


DOCS = [FULL_TRAINJOB, FULL_WORKFLOW]
PATHS = [(i, p) for i, d in enumerate(DOCS) for p in _paths(d) if p]

huge_ints = st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1,
                             10**30, 10**400, 4096, 4097, 32768, 32769, 2**24, 2**24 + 1,
                             16777213, 1000000007])
floats = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324,
                                    0.0, -0.0, 0.5, 1e30]),
                   st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "-", "--force", "-c", "a\x00b", "../../etc", "/etc/passwd",
                     "~", "x" * 300, "/".join(["y" * 255] * 3), "0" * 5000, "-" * 4097, "é" * 200,
                     "volo-digits", "TrainJob", "best", "CPU", "NPU", "1e30", ".nan"]),
    st.integers(1, 600).map(lambda n: "z" * n),
)
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.integers(), floats, texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _check(text: str, kind: str) -> None:
    """Parse `text`; only a job or a SpecError may come out, in time and memory."""
    RAN[kind] = RAN.get(kind, 0) + 1
    tracemalloc.reset_peak()
    # CPU time of this process: other processes on a shared CI machine do not count
    t = time.process_time()
    try:
        job, _doc = S.load_text(text, "fuzz.yaml")
    except S.SpecError as e:
        assert e.problems and all(isinstance(loc, str) and isinstance(msg, str)
                                  for loc, msg in e.problems)
        assert len(e.render()) < 200_000
        job = None
    took = time.process_time() - t
    assert took < PER_SPEC_S, f"{took:.2f}s"
    if tracemalloc.is_tracing():
        assert tracemalloc.get_traced_memory()[1] < PEAK_BYTES
    if job is not None:
        _usable(job)
        assert time.process_time() - t < PER_SPEC_S


def _usable(job) -> None:
    """A spec that validates is one the controller can parse again, store and launch."""
    again = S.parse_doc(json.loads(json.dumps(job.model_dump(by_alias=True, mode="json"),
                                              allow_nan=False)), "<submitted>")
    assert again == job
    for _name, kind, sp in S.steps_of(job):
        if kind == "TrainJob":
            counts = sp.feasible_counts()
            assert counts and all(sp.request().global_batch % d == 0 for d in counts)
        assert -(2**63) <= sp.priority < 2**63
        plan = Plan(1, 1, 1, (NodeSlice("n0", (0,)),)) if kind != "ExportJob" else \
            Plan(0, 0, 0, (NodeSlice("n0", ()),))
        paths = {"config": "/c", "data_dir": "/d", "ckpt_path": "/k", "out": "/o",
                 "workdir": "/w"}
        for node in build_launch(job_id="j-1", attempt=1, kind=kind, plan=plan, paths=paths,
                                 spec=sp.model_dump(by_alias=True, mode="json"),
                                 home=Path("/h")):
            for r in node.ranks:
                assert all("\x00" not in a for a in r.argv)
                owned = {"--data_dir", "--ckpt_save_dir", "--ckpt_path", "--out", "--resume"}
                assert sum(a.split("=")[0] in owned for a in r.argv) == sum(
                    a in owned for a in r.argv)  # overrides never repeat an owned flag


def _set(doc, path, value):
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


@fuzz(700)
@given(st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=1, max_size=3),
       st.sampled_from([None, "extra", "drop"]))
def _fuzz_fields(mutations, extra):
    doc = copy.deepcopy(DOCS[mutations[0][0][0]])
    for (i, path), value in mutations:
        if i != mutations[0][0][0]:
            continue
        try:
            _set(doc, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced the parent
    if extra == "extra" and isinstance(doc.get("spec"), dict):
        doc["spec"]["colour"] = "red"
    elif extra == "drop":
        doc.pop("metadata", None)
    try:
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, UnicodeError):
        return
    _check(text, "fields")


TOKENS = st.sampled_from([
    "[", "]", "{", "}", ",", ": ", "- ", "\n", "\n  ", "\n    ", "&a ", "*a", "&b ", "*b",
    "!!str ", "!!python/object:os.system ", "!!binary ", "? ", "|\n  ", ">\n  ", "'", '"',
    "#", "---\n", "...\n", "%YAML 1.1\n", "<<: ", ".inf", "-.inf", ".nan", "1e30", "1.0e+30",
    "0x7fffffffffffffff", "9" * 30, "-1", "0", "null", "~", "true", "2026-13-45",
    "apiVersion: fleet/v1\n", "kind: TrainJob\n", "spec:\n  ", "metadata: {name: x}\n",
    "devices: ", "overrides: ", "global: ", "x", "é", "\t", "\x00", "\ufeff",
])
GOOD_TEXT = yaml.safe_dump(FULL_TRAINJOB, sort_keys=False)


@fuzz(400)
@given(st.lists(TOKENS, max_size=60).map("".join), st.integers(0, len(GOOD_TEXT)),
       st.booleans())
def _fuzz_raw_yaml(fragment, at, splice):
    _check(GOOD_TEXT[:at] + fragment + GOOD_TEXT[at:] if splice else fragment, "raw")


@fuzz(60)
@given(st.integers(1, 60_000), st.sampled_from(["[", "{a: ", "- ", "&x [*x, "]),
       st.booleans())
def _fuzz_nesting(depth, opener, indent):
    if opener == "- ":
        body = "".join("  " * i + "-\n" for i in range(min(depth, 400))) if indent \
            else "- " * depth + "x\n"
    else:
        body = opener * depth + ("}" if opener.startswith("{") else "]") * depth
    _check("spec:\n  overrides:\n    a: " + body + "\n", "nesting")


def test_spec_fuzzer():
    """At least 1,000 specs per run (fields 700, raw YAML 400, nesting 60). Memory is traced
    for the raw YAML, where a small text can expand (tracing costs 5x the time; a mutated
    field holds Python values of bounded size already)."""
    RAN.clear()
    _fuzz_fields()
    tracemalloc.start()
    try:
        _fuzz_raw_yaml()
        _fuzz_nesting()
    finally:
        tracemalloc.stop()
    assert RAN["fields"] >= 600 and RAN["raw"] >= 350 and RAN["nesting"] >= 50, RAN
    assert sum(RAN.values()) >= 1000, RAN
