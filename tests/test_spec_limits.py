"""Bounded spec input: what a spec may not do to the parser, the planner or the launcher.

Each case here is a spec that used to pass validation and then hurt something later (an
alias bomb expanding in the controller, a device range the planner enumerated, an
override replacing a launcher flag), or that crashed with a raw traceback."""

import time
from pathlib import Path

import pytest
from test_spec_validation import GOOD

from launcher import spec as S
from launcher.planner import Request, Topology, batch_split, explain_infeasible
from launcher.ranks import build_launch, override_flags

REPO = Path(__file__).resolve().parents[1]


def problems(text: str, sets: list[str] | None = None) -> list[tuple[str, str]]:
    try:
        S.load_text(text, "job.yaml", sets)
    except S.SpecError as e:
        return e.problems
    return []


def timed_problems(text: str, sets: list[str] | None = None, bound: float = 0.5):
    t = time.perf_counter()
    p = problems(text, sets)
    took = time.perf_counter() - t
    assert took < bound, f"took {took:.2f}s"
    return p


# ------------------------------------------------------------------ YAML structure

def test_alias_bomb_is_refused_before_it_expands():
    # 9 levels of 9 aliases: 9^9 = 387M list items once expanded.
    lines = ["  overrides:", "    l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    [(loc, msg)] = timed_problems(GOOD + "\n".join(lines) + "\n", bound=0.1)
    assert loc == "job.yaml:15:9" and "anchors and aliases" in msg


def test_self_referencing_alias_is_a_spec_error():
    [(loc, msg)] = timed_problems("a: &a [*a]\n")
    assert loc == "job.yaml:1:4" and "aliases" in msg


@pytest.mark.parametrize("text", [
    "a: " + "[" * 3000 + "]" * 3000 + "\n",
    "a:\n" + "".join("  " * i + "-\n" for i in range(1, 3000))[:200_000],
    "a: " + "{b: " * 3000 + "}" * 3000 + "\n",
], ids=["flow-seq", "block-seq", "flow-map"])
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(text):
    [(loc, msg)] = timed_problems(text)
    assert "nested deeper than" in msg and loc.startswith("job.yaml:")


def test_deep_flow_nesting_is_refused_before_the_quadratic_scanner():
    # PyYAML's scanner costs tokens x open flow levels: 20k '[' took ~minutes.
    [(_, msg)] = timed_problems("a: " + "[" * 20_000 + "\n", bound=0.2)
    assert "nested deeper than" in msg
    # brackets inside quoted strings and comments are not nesting
    quoted = GOOD + "  overrides: {note: '" + "[" * 40 + "'}  # " + "{" * 40 + "\n"
    assert problems(quoted) == []


def test_document_size_is_capped():
    big = GOOD + "# " + "x" * S.MAX_SPEC_BYTES + "\n"
    [(loc, msg)] = timed_problems(big)
    assert loc == "(file)" and f"({S.MAX_SPEC_BYTES} bytes)" in msg


def test_duplicate_keys_are_refused():
    [(loc, msg)] = problems(GOOD.replace("    global: 256\n", "    global: 256\n    global: 8\n"))
    assert loc == "job.yaml:13:5" and "duplicate key 'global'" in msg


def test_yaml_syntax_error_names_where_the_construct_opened():
    text = GOOD.replace("devices: {min: 8, max: 16}", "devices: {min: 8, max: 16")
    [(loc, msg)] = problems(text)
    assert loc == "job.yaml:11:8"  # where the parser gave up
    assert "flow mapping that opened at line 10, column 14" in msg  # the unclosed '{'


# ------------------------------------------------------------------ numbers and strings

@pytest.mark.parametrize("old,new,where,fragment", [
    ("{min: 8, max: 16}", "{min: 8, max: 100000000}", "spec.resources.devices.max",
     "less than or equal to 32768"),
    ("{min: 8, max: 16}", "{min: 8, max: 9223372036854775807}",
     "spec.resources.devices.max", "less than or equal to 32768"),
    ("devices: {min: 8, max: 16}", "nodes: {min: 1, max: 1000000}",
     "spec.resources.nodes.max", "less than or equal to 4096"),
    ("devices: {min: 8, max: 16}", "devicesPerNode: 1\n    devices: {min: 1, max: 32768}",
     "spec.resources", "at most 32768 devices on at most 4096 servers"),
    ("global: 256", "global: 1000000007", "spec.batch.global", "less than or equal to 16777216"),
    ("global: 256", "global: 1.0e+30", "spec.batch.global", "out of range"),
    ("microBatchMax: 32", "microBatchMax: .inf", "spec.batch.microBatchMax", "finite"),
    ("microBatchMax: 32", "microBatchMax: 32\n  priority: 1.0e+30", "spec.priority",
     "out of range"),
    ("microBatchMax: 32", "microBatchMax: 32\n  priority: -2000000000", "spec.priority",
     "greater than or equal to -1000000000"),
    ("devices: {min: 8, max: 16}", "devices: {min: 8, max: 16}\n    cpusPerDevice: .inf",
     "spec.resources.cpusPerDevice", "finite"),
    ("devices: {min: 8, max: 16}", "devices: {min: 8, max: 16}\n    cpusPerDevice: .nan",
     "spec.resources.cpusPerDevice", "finite"),
    ("microBatchMax: 32", "microBatchMax: 32\n  restart: {maxRestarts: 100000}",
     "spec.restart.maxRestarts", "less than or equal to 1000"),
    ("microBatchMax: 32", "microBatchMax: 32\n  restart: {backoffSeconds: 1.0e+300}",
     "spec.restart.backoffSeconds", "less than or equal to"),
    ("microBatchMax: 32", "microBatchMax: 32\n  checkpoint: {everySteps: 99999999999}",
     "spec.checkpoint.everySteps", "less than or equal to"),
    ("dir: data", "dir: " + "d" * 256, "spec.data.dir", "longer than 255 bytes"),
    ("dir: data", "dir: " + "/d" * 3000, "spec.data.dir", "at most 4096 characters"),
    ("config: recipe.yaml", 'config: "a\\0b"', "spec.config", "NUL"),
])
def test_every_number_and_path_is_bounded(old, new, where, fragment):
    text = GOOD.replace(old, new)
    assert text != GOOD
    found = timed_problems(text, bound=0.2)
    assert any(loc.endswith(where) and fragment in msg for loc, msg in found), found


def test_huge_counts_cost_no_more_than_normal_ones():
    # The planner works from the divisors of G and yields device counts lazily: a range of
    # 1e8 servers, a prime batch under a smaller cap, and the message listing counts all
    # answer at once (they enumerated every count, or tried every micro-batch, before).
    t = time.perf_counter()
    assert batch_split(16777213, 1, 2**23) == (1, 16777213)  # prime: only m = 1 divides
    assert batch_split(2**24, 1, 3 * 2**20) == (2**21, 8)
    why = explain_infeasible(Request(8, 8 * 10**8, 7, 7))
    assert why.startswith("global batch 7 is not divisible by any allowed device count (8, "
                          "16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, ...)")
    req = Request(1, 10**9, 16777213, 16777213)
    assert explain_infeasible(req) is None and req.candidates(Topology(8, 4)) == [1]
    assert time.perf_counter() - t < 0.05


def test_devices_may_be_a_fixed_count():
    job, _ = S.load_text(GOOD.replace("{min: 8, max: 16}", "16"))
    assert job.spec.resources.device_range() == (16, 16)
    job, _ = S.load_text(GOOD.replace("devices: {min: 8, max: 16}", "nodes: 2"))
    assert job.spec.resources.device_range() == (16, 16)
    [(loc, msg)] = problems(GOOD.replace("{min: 8, max: 16}", "true"))
    assert loc == "job.yaml:10 spec.resources.devices"


def test_unknown_field_suggests_the_close_one():
    [(loc, msg)] = problems(GOOD.replace("  resources:\n", "  resorces:\n"))
    assert loc == "job.yaml:9 spec.resorces" and "did you mean 'resources'?" in msg
    # ... inside a workflow step too, found through the step's kind
    wf = (REPO / "examples" / "quickstart.yaml").read_text()
    p = problems(wf.replace("          devicesPerNode: 8", "          devicesPerNod: 8"))
    assert any("spec.steps[0].spec.resources.devicesPerNod" in loc
               and "did you mean 'devicesPerNode'?" in m for loc, m in p), p
    [(_, msg)] = problems(GOOD.replace("  resources:\n", "  colour: red\n  resources:\n"))
    assert "did you mean" not in msg  # nothing close: no guess


def test_many_errors_in_a_large_spec_report_at_once():
    # 300 unknown fields in ~75 KB: the line index is built once, not per error.
    junk = "".join(f"  junk{i}: {'y' * 240}\n" for i in range(300))
    text = GOOD.replace("  batch:\n", junk + "  batch:\n")
    assert 70_000 < len(text) < S.MAX_SPEC_BYTES
    found = timed_problems(text, bound=1.0)
    assert len(found) == 300 and found[299][0] == "job.yaml:310 spec.junk299"


# ------------------------------------------------------------------ overrides

@pytest.mark.parametrize("owned", ["TRAIN_OWNED", "VALIDATE_OWNED", "EXPORT_OWNED"])
def test_overrides_cannot_replace_launcher_flags(owned):
    kind_owned = getattr(S, owned)
    with pytest.raises(ValueError, match="set by the launcher"):
        S._check_overrides({"data_dir": "/etc"} if "data_dir" in kind_owned
                           else {"out": "/etc/cron.d/x"}, kind_owned)
    for key in kind_owned:
        with pytest.raises(ValueError, match="set by the launcher"):
            S._check_overrides({key: "x"}, kind_owned)


@pytest.mark.parametrize("overrides,fragment", [
    ("{data_dir: /etc}", "'data_dir' is set by the launcher; use spec.data.dir"),
    ("{data_d: /etc}", "abbreviates --data_dir"),
    ("{resume: /tmp/other}", "'resume' is set by the launcher"),
    ("{distribute: false}", "'distribute' is set by the launcher"),
    ("{help: true}", "'help' is set by the launcher"),
    ("{epoch_size: --force}", "starts with '-'"),
    ("{scale: [0.5, '-x']}", "starts with '-'"),
    ("{scale: [[1], 2]}", "a list inside a list"),
    ("{scale: {a: 1}}", "a dict is not a config flag value"),
    ("{lr: .nan}", "not a finite number"),
    ("{Bad-Key: 1}", "snake_case"),
])
def test_override_values_are_plain_flags(overrides, fragment):
    p = problems(GOOD + f"  overrides: {overrides}\n")
    assert len(p) == 1 and p[0][0] == "job.yaml:14 spec.overrides" and fragment in p[0][1], p


def test_overrides_pass_as_single_argv_items():
    assert override_flags({"epoch_size": 2, "scale": [0.5, 1.0], "x": None, "lr": -0.1}) == [
        "--epoch_size=2", "--scale=0.5,1.0", "--lr=-0.1"]
    job, _ = S.load_text(GOOD + "  overrides: {epoch_size: 2}\n")
    from launcher.planner import NodeSlice, Plan
    [node] = build_launch(job_id="j-1", attempt=1, kind="TrainJob",
                          spec=job.spec.model_dump(by_alias=True, mode="json"),
                          paths={"config": "/c", "data_dir": "/d", "workdir": "/w"},
                          plan=Plan(8, 32, 1, (NodeSlice("a", tuple(range(8))),)),
                          home=Path("/h"))
    argv = node.ranks[1].argv
    # the launcher's own flag comes once, and the override cannot follow it with another
    assert argv.count("--data_dir") == 1 and argv[-1] == "--epoch_size=2"


# ------------------------------------------------------------------ --set

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_set_index_syntax_on_the_quickstart():
    text = QUICKSTART.read_text()
    job, _ = S.load_text(text, str(QUICKSTART), ["spec.steps[0].spec.batch.global=128"])
    assert job.spec.steps[0].spec.batch.global_ == 128
    job, _ = S.load_text(text, str(QUICKSTART),
                         ["spec.steps[train].spec.overrides.epoch_size=1",
                          "spec.steps.0.spec.resources.devices=2"])
    assert job.spec.steps[0].spec.overrides["epoch_size"] == 1
    assert job.spec.steps[0].spec.resources.device_range() == (2, 2)


def test_set_errors_name_the_set_not_a_file_line():
    text = QUICKSTART.read_text()
    [(loc, msg)] = problems(text, ["spec.steps[0].spec.batch.gobal=100"])
    assert loc.startswith("--set spec.steps[0].spec.batch.gobal=100 ")
    assert "did you mean 'global'?" in msg
    # a mapping the --set created: its errors are the --set's too
    [(loc, _)] = problems(text, ["spec.steps[0].spec.colour.x=1"])
    assert loc == "--set spec.steps[0].spec.colour.x=1 spec.steps[0].spec.colour"
    # the TrainJob path on a Workflow says where a step's fields are
    [(loc, msg)] = problems(text, ["spec.batch.global=512"])
    assert loc == "--set" and "spec.steps[N].spec.batch.global" in msg
    assert "steps: train, validate, export" in msg
    [(loc, msg)] = problems(text, ["spec.steps[deploy].spec.x=1"])
    assert "no item named 'deploy'" in msg
    # an alias in a value is not expanded: the value is the string as given
    job, _ = S.load_text(text, "q.yaml", ["spec.steps[0].spec.overrides.x=&a [*a]"])
    assert job.spec.steps[0].spec.overrides["x"] == "&a [*a]"


# ------------------------------------------------------------------ what a spec may run and touch

def test_data_create_runs_only_registered_dataset_makers():
    job, _ = S.load_text(GOOD.replace("    dir: data\n",
                                      "    dir: data\n    create: {module: workloads.volo.digits}\n"))
    assert job.spec.data.create.module == "workloads.volo.digits"
    [(loc, msg)] = problems(GOOD.replace("    dir: data\n",
                                         "    dir: data\n    create: {module: os}\n"))
    assert loc == "job.yaml:9 spec.data.create.module"
    assert "not a registered dataset maker" in msg and "workloads.volo.digits" in msg


def test_dataset_makers_run_without_the_submitters_secrets():
    env = S.maker_env({"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C",
                       "GRAFANA_TOKEN": "secret", "RAY_AUTH_TOKEN": "secret",
                       "AWS_SECRET_ACCESS_KEY": "secret", "PYTHONPATH": "/elsewhere"}, "/proj")
    assert env == {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C",
                   "PYTHONPATH": "/proj"}


def test_configured_roots_confine_absolute_and_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "recipe.yaml").write_text("model: volo_tiny\n")
    (tmp_path / "data").mkdir()
    f = tmp_path / "job.yaml"
    f.write_text(GOOD)
    job, _ = S.load_file(f)
    assert S.check_paths(job, f)["volo-digits"]["data_dir"] == str(tmp_path / "data")  # no roots
    monkeypatch.setenv("FLEET_DATA_ROOT", str(tmp_path / "datasets"))
    with pytest.raises(S.SpecError) as e:
        S.check_paths(job, f)
    [(loc, msg)] = e.value.problems
    assert loc == "spec.data.dir" and f"outside FLEET_DATA_ROOT={tmp_path / 'datasets'}" in msg
    (tmp_path / "datasets" / "d").mkdir(parents=True)
    monkeypatch.setenv("FLEET_CHECKPOINT_ROOT", "/mnt/checkpoints")
    monkeypatch.setenv("FLEET_EXPORT_ROOT", "/mnt/exports")
    text = GOOD.replace("dir: data", f"dir: {tmp_path / 'datasets' / 'd'}") + \
        "  checkpoint: {dir: /etc/cron.d}\n"
    f.write_text(text)
    job, _ = S.load_file(f)
    with pytest.raises(S.SpecError) as e:
        S.check_paths(job, f)
    assert [loc for loc, _ in e.value.problems] == ["spec.checkpoint.dir"]
    wf = S.load_text((REPO / "examples" / "quickstart.yaml").read_text(), "q.yaml")[0]
    with pytest.raises(S.SpecError) as e:
        S.job_paths(wf, REPO / "examples", REPO, "q.yaml")
    assert "spec.steps[2].spec.out" in [loc for loc, _ in e.value.problems]
    assert any("outside FLEET_EXPORT_ROOT=/mnt/exports" in m for _, m in e.value.problems)


def test_a_dry_run_at_the_largest_allowed_job_is_quick():
    from launcher import cli as C
    text = GOOD.replace("{min: 8, max: 16}", "{min: 8, max: 32768}").replace(
        "global: 256", "global: 32768")
    job, _ = S.load_text(text)
    recipe = str(REPO / "workloads" / "volo" / "configs" / "volo_tiny_digits.yaml")
    ctx = {"workdir": "/w", "steps": {"volo-digits": {"config": recipe, "data_dir": "/d"}}}
    t = time.process_time()
    d = C._dry_run(job, ctx, Path("/h"))
    took = time.process_time() - t
    assert d["steps"][0]["plan"]["devices"] == 32768 and len(d["steps"][0]["processes"]) == 4096
    assert took < 3.0, took  # 25 s before: every rank's env deep-copied by asdict


def test_the_controller_bounds_a_submitted_document_too():
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(S.SpecError, match="nested deeper than"):
        S.parse_doc({"apiVersion": "fleet/v1", "kind": "TrainJob", "spec": deep}, "<submitted>")
    with pytest.raises(S.SpecError, match="is not a spec value"):
        S.parse_doc({"apiVersion": "fleet/v1", "kind": "TrainJob", "spec": {1j: 2}},
                    "<submitted>")


def test_every_set_example_in_the_help_works(tmp_path):
    import re

    from click.testing import CliRunner

    from launcher import cli as C
    examples = re.findall(r"--set '?([^ ';]+)'?", C.SET_HELP)
    assert len(examples) == 3
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "recipe.yaml").write_text("model: volo_tiny\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "job.yaml").write_text(GOOD)
    for ex in examples:
        target = QUICKSTART if ex.startswith("spec.steps") else tmp_path / "job.yaml"
        r = CliRunner().invoke(C.cli, ["--home", str(tmp_path / "home"), "submit", str(target),
                                       "--dry-run", "--set", ex])
        assert r.exit_code == 0, (ex, r.output)
        assert "dry run:" in r.output
    # the epilog's example too
    epilog = re.search(r"fleet submit (\S+) --set '([^']+)' --dry-run", C.EPILOG)
    assert epilog and epilog.group(1) == "examples/quickstart.yaml"
    r = CliRunner().invoke(C.cli, ["--home", str(tmp_path / "home"), "submit", str(QUICKSTART),
                                   "--dry-run", "--set", epilog.group(2)])
    assert r.exit_code == 0, r.output
