import json
import pickle
from pathlib import Path

import pytest
import yaml

from launcher import spec as S

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
apiVersion: fleet/v1
kind: TrainJob
metadata:
  name: volo-digits
spec:
  config: recipe.yaml
  data:
    dir: data
  resources:
    devices: {min: 8, max: 16}
  batch:
    global: 256
    microBatchMax: 32
"""


@pytest.fixture()
def proj(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "recipe.yaml").write_text("model: volo_tiny\n")
    (tmp_path / "data").mkdir()
    return tmp_path


def write(proj, text, name="job.yaml"):
    p = proj / name
    p.write_text(text)
    return p


def problems(text, proj=None, sets=None, paths=False):
    try:
        if proj is not None:
            f = write(proj, text)
            job, _ = S.load_file(f, sets)
            if paths:
                S.check_paths(job, f)
        else:
            S.load_text(text, "job.yaml", sets)
    except S.SpecError as e:
        return e.problems
    return []


def test_good_spec_parses_with_defaults(proj):
    f = write(proj, GOOD)
    job, _ = S.load_file(f)
    assert job.kind == "TrainJob" and job.metadata.name == "volo-digits"
    assert job.spec.restart.maxRestarts == 3  # restarts on by default
    assert job.spec.feasible_counts() == [8, 16]
    resolved = S.check_paths(job, f)
    assert resolved["volo-digits"]["config"] == str(proj / "recipe.yaml")


def test_malformed_yaml_names_line_and_column():
    p = problems("apiVersion: fleet/v1\nkind: [TrainJob\nmetadata: {}\n")
    assert len(p) == 1
    loc, msg = p[0]
    assert loc.startswith("job.yaml:") and "malformed YAML" in msg


def test_unknown_field_has_line_and_path():
    text = GOOD.replace("    microBatchMax: 32\n", "    microBatchMax: 32\n    colour: red\n")
    [(loc, msg)] = problems(text)
    assert loc == "job.yaml:14 spec.batch.colour"
    assert "unknown field" in msg


def test_bad_dns_name():
    [(loc, msg)] = problems(GOOD.replace("volo-digits", "Volo_Digits"))
    assert loc == "job.yaml:4 metadata.name" and "DNS-1123" in msg


def test_device_count_not_multiple_of_devices_per_node():
    [(loc, msg)] = problems(GOOD.replace("{min: 8, max: 16}", "{min: 8, max: 12}"))
    assert "spec.resources" in loc and "multiple of devicesPerNode=8" in msg


def test_partial_server_must_be_ring_slice():
    [(loc, msg)] = problems(GOOD.replace("{min: 8, max: 16}", "{min: 3, max: 8}"))
    assert "devices.min=3" in msg and "1, 2, 4" in msg


def test_global_batch_not_divisible():
    [(loc, msg)] = problems(GOOD.replace("global: 256", "global: 100"))
    assert loc.startswith("job.yaml:") and "spec" in loc
    assert "not divisible by any allowed device count (8, 16)" in msg


def test_deepspeed_1920_spec_is_accepted_on_valid_counts_only():
    text = GOOD.replace("global: 256", "global: 1920").replace(
        "{min: 8, max: 16}", "{min: 1, max: 32}")
    job, _ = S.load_text(text)
    counts = job.spec.feasible_counts()
    assert counts == [1, 2, 4, 8, 16, 24, 32]
    assert not {10, 12, 15, 20, 30} & set(counts)


def test_missing_data_dir_and_config(proj):
    text = GOOD.replace("dir: data", "dir: nodata").replace("recipe.yaml", "nope.yaml")
    p = problems(text, proj, paths=True)
    locs = {loc for loc, _ in p}
    assert locs == {"spec.data.dir", "spec.config"}
    assert any("does not exist" in m for _, m in p)


def test_path_escaping_root(proj):
    p = problems(GOOD.replace("dir: data", "dir: ../../etc"), proj, paths=True)
    assert p and p[0][0] == "spec.data.dir" and "escapes its root" in p[0][1]


def test_absolute_paths_allowed(proj):
    assert problems(GOOD.replace("dir: data", f"dir: {proj / 'data'}"), proj, paths=True) == []


def test_set_overrides_and_errors_point_at_set():
    job, doc = S.load_text(GOOD, "job.yaml", ["spec.batch.global=512", "spec.priority=7"])
    assert job.spec.batch.global_ == 512 and job.spec.priority == 7
    assert doc["spec"]["batch"]["global"] == 512
    [(loc, msg)] = problems(GOOD, sets=["metadata.name=BAD"])
    assert loc == "--set metadata.name=BAD metadata.name"
    assert problems(GOOD, sets=["novalue"])[0][0] == "--set"


def test_wrong_api_version_and_kind():
    assert "apiVersion must be 'fleet/v1'" in problems(GOOD.replace("fleet/v1", "v2"))[0][1]
    assert "kind must be one of" in problems(GOOD.replace("TrainJob", "Job"))[0][1]


def test_not_a_mapping():
    assert "must be a YAML mapping" in problems("- a\n- b\n")[0][1]


WF = """\
apiVersion: fleet/v1
kind: Workflow
metadata: {name: wf}
spec:
  steps:
    - name: train
      kind: TrainJob
      spec:
        config: recipe.yaml
        data: {dir: data}
        batch: {global: 8, microBatchMax: 8}
    - name: validate
      kind: ValidateJob
      needs: [train]
      spec:
        config: recipe.yaml
        data: {dir: data}
        checkpoint: {fromStep: train}
    - name: export
      kind: ExportJob
      needs: [validate]
      spec:
        model: volo_tiny
        out: out/model.mindir
        checkpoint: {fromStep: train}
"""


def test_workflow_ok(proj):
    f = write(proj, WF)
    job, _ = S.load_file(f)
    assert [s.name for s in job.spec.steps] == ["train", "validate", "export"]
    out = S.check_paths(job, f)
    assert out["export"]["out"] == str(proj / "out" / "model.mindir")


def test_workflow_unknown_need_and_cycle():
    p = problems(WF.replace("needs: [validate]", "needs: [nope]"))
    assert "needs unknown step 'nope'" in p[0][1]
    p = problems(WF.replace("    - name: train\n      kind: TrainJob\n",
                            "    - name: train\n      kind: TrainJob\n      needs: [export]\n"))
    assert "cycle" in p[0][1]


def test_workflow_checkpoint_source_must_run_first():
    p = problems(WF.replace("needs: [train]", "needs: []"))
    assert "'train' must run first" in p[0][1]


def test_workflow_step_bad_kind_lists_step_kinds():
    p = problems(WF.replace("kind: ExportJob", "kind: Deploy"))
    assert p[0][0] == "job.yaml:20 spec.steps[2].kind"
    assert "TrainJob" in p[0][1] and "ExportJob" in p[0][1]


def test_validate_job_single_device():
    text = WF.split("    - name: validate")[0]  # train only
    assert problems(text) == []
    vt = WF.replace("checkpoint: {fromStep: train}\n    - name: export",
                    "checkpoint: {fromStep: train}\n        resources: {devices: {min: 2, "
                    "max: 2}}\n    - name: export")
    assert "exactly 1 device" in problems(vt)[0][1]


def test_spec_error_pickles():
    e = S.SpecError("f.yaml", [("a", "b")])
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.problems == [("a", "b")] and str(e2) == str(e)


def test_schema_file_matches_model():
    """launcher/schema.json is generated; regenerate with `fleet schema > launcher/schema.json`."""
    assert S.SCHEMA_FILE.read_text() == S.schema_text()


def test_schema_accepts_examples():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(S.schema_text())
    for f in sorted((REPO / "examples").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(f.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(GOOD.replace("global: 256", "global: x")), schema)


def test_examples_validate():
    for f in sorted((REPO / "examples").glob("*.yaml")):
        job, _ = S.load_file(f)
        if f.name == "quickstart.yaml":  # the others point at a fleet's volumes
            S.check_paths(job, f, create_data=True)


def test_imagenet_example_keeps_global_batch_on_every_size():
    job, _ = S.load_file(REPO / "examples" / "volo_d1_imagenet.yaml")
    from launcher.planner import batch_split
    plans = {d: batch_split(1024, d, 128) for d in job.spec.feasible_counts()}
    # 24 devices (3 servers) cannot split 1024 evenly, so it is never planned.
    assert plans == {8: (128, 1), 16: (64, 1), 32: (32, 1)}


def test_nodes_range_means_whole_servers():
    text = GOOD.replace("devices: {min: 8, max: 16}", "nodes: {min: 1, max: 3}").replace(
        "global: 256", "global: 384")
    job, _ = S.load_text(text)
    assert job.spec.resources.device_range() == (8, 24)
    assert job.spec.feasible_counts() == [8, 16, 24]
    both = GOOD.replace("devices: {min: 8, max: 16}",
                        "devices: {min: 8, max: 16}\n    nodes: {min: 1, max: 2}")
    assert "either devices or nodes" in problems(both)[0][1]


def test_min_above_max_is_rejected():
    p = problems(GOOD.replace("{min: 8, max: 16}", "{min: 16, max: 8}"))
    assert "min (16) must not exceed max (8)" in p[0][1]


@pytest.mark.parametrize("recipe,key", [
    ("model: volo_tiny\nloss_scale: 0\n", "loss_scale"),
    ("model: volo_tiny\namp_level: O4\n", "amp_level"),
    ("model: volo_tiny\nema_decay: 1.5\n", "ema_decay"),
])
def test_bad_recipe_value_is_a_spec_problem(proj, recipe, key):
    """fleet validate / submit --dry-run refuse what the train loop would, before any rank."""
    (proj / "recipe.yaml").write_text(recipe)
    p = problems(GOOD, proj, paths=True)
    assert [loc for loc, _ in p] == ["spec.config"]
    assert key in p[0][1] and str(proj / "recipe.yaml") in p[0][1]


def test_bad_override_value_is_a_spec_problem(proj):
    text = GOOD + "  overrides: {clip_value: -1}\n"
    p = problems(text, proj, paths=True)
    assert [loc for loc, _ in p] == ["spec.config"] and "clip_value" in p[0][1]


def test_workload_names_and_recipe_checks_come_from_the_adapters(proj, monkeypatch):
    from launcher import workloads

    assert problems(GOOD.replace("spec:\n", "spec:\n  workload: nope\n")) == [
        ("job.yaml:6 spec.workload", "unknown workload 'nope'; known: smoke, volo")]
    seen = []
    mine = workloads.WorkloadAdapter(
        name="mine", modules={workloads.TRAIN: "mine.train"},
        select_checkpoint=lambda d, how: None,
        check_recipe=lambda cfg, ov: seen.append(cfg.name) or [("lr", "must be > 0")],
        dataset_makers=frozenset({"mine.make_data"}))
    monkeypatch.setitem(workloads._loaded, "mine", mine)
    text = GOOD.replace("spec:\n", "spec:\n  workload: mine\n").replace(
        "    dir: data\n", "    dir: data\n    create: {module: mine.make_data}\n")
    f = write(proj, text)
    job, _ = S.load_file(f)  # the adapter's name and dataset maker are known to the spec
    with pytest.raises(S.SpecError) as e:
        S.check_paths(job, f)
    assert seen == ["recipe.yaml"]
    assert e.value.problems == [("spec.config", f"recipe {proj / 'recipe.yaml'}: key 'lr': "
                                                "must be > 0")]
