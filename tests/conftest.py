"""Shared test setup: loopback-only Ray, quiet MindSpore, both MindSpore execution modes, one
digits dataset for the session."""

import os
from pathlib import Path

# Ray must advertise 127.0.0.1 for every node: tests never touch another address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
# Ray waits 30 s for a new GCS to publish its port; on a loaded 2-core CI machine starting
# a head node took longer ("Failed to start GCS. Last 0 lines of error files").
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

import pytest  # noqa: E402


@pytest.fixture(params=["pynative", "graph"])
def ms_mode(request):
    """Run the test once in PyNative and once in Graph mode."""
    import mindspore as ms

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=previous)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The digits dataset (workloads/volo/digits.py), written once for the whole session:
    each write costs a scikit-learn load and 1,797 PNG encodes, and every test that trains on
    it, scans it or cuts a smaller set from it only reads it. Tests that check the writer
    itself (tests/test_data_digits.py, the quickstart's `create`) write their own. A test
    that changes a file here fails the session's teardown: the files are compared with what
    was written."""
    from workloads.volo.digits import write_digits

    out = tmp_path_factory.mktemp("digits-shared") / "digits"
    write_digits(out)
    written = _tree(out)
    yield out
    changed = sorted(set(written.items()) ^ set(_tree(out).items()))
    assert not changed, f"a test changed the shared digits dataset: {changed[:5]}"


@pytest.fixture(scope="session")
def tiny_reference(digits, tmp_path_factory) -> Path:
    """The tiny recipe's uninterrupted reference run (tests/tiny_run.py), once per session:
    the e2e resume checks, the compile-cache test (as its compiling run) and the
    sample-provenance check compare with it, and its compile store serves later runs of the
    same recipe. Its checkpoints must stay as written: the teardown compares them."""
    from tiny_run import run_reference

    ref = run_reference(digits, tmp_path_factory.mktemp("tiny-reference"))
    written = _tree(ref / "ckpt")
    yield ref
    changed = sorted(set(written.items()) ^ set(_tree(ref / "ckpt").items()))
    assert not changed, f"a test changed the reference run's checkpoints: {changed[:5]}"
