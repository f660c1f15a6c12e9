"""Shared test setup: loopback-only Ray, quiet MindSpore, both MindSpore execution modes."""

import os

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
