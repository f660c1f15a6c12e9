"""Decision tests: the real controller over the real store, on the in-memory backend
(launcher/backend_fake.py), with a clock the test moves. Ray is made unimportable for
every test here (`import ray` raises ImportError), so nothing below can reach a cluster."""

from __future__ import annotations

import sys

import pytest
from decisions_harness import Clock, Fleet

from launcher.backend_fake import FakeBackend


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setenv("FLEET_METRICS", "0")
    monkeypatch.delenv("FLEET_K8S_RAYCLUSTER", raising=False)
    monkeypatch.delenv("FLEET_MAX_PENDING", raising=False)


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def fleet(tmp_path, clock):
    """Two 8-device servers."""
    return Fleet(tmp_path, FakeBackend.servers(2, clock=clock), clock)


@pytest.fixture()
def make_fleet(tmp_path, clock):
    def make(servers: int = 2, devices: int = 8) -> Fleet:
        return Fleet(tmp_path, FakeBackend.servers(servers, devices, clock=clock), clock)
    return make
