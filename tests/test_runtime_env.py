"""workloads/volo/runtime_env.py: the CPU ranks' host pipeline setting."""

from __future__ import annotations

import pytest

from workloads.volo.runtime_env import HOST_BLOCKING_ENV, host_blocking_on_cpu, host_pipeline


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(HOST_BLOCKING_ENV, raising=False)
    return monkeypatch


def test_cpu_runs_blocking(clean_env):
    host_blocking_on_cpu("CPU")
    assert host_pipeline() == "blocking"


@pytest.mark.parametrize("target", ["Ascend", "GPU"])
def test_devices_keep_the_async_pipeline(clean_env, target):
    host_blocking_on_cpu(target)
    assert host_pipeline() == "async"


def test_an_explicit_setting_wins(clean_env):
    clean_env.setenv(HOST_BLOCKING_ENV, "0")
    host_blocking_on_cpu("CPU")
    assert host_pipeline() == "async"
