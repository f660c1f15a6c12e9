"""RayBackend without a cluster: agent handles are fakes and `ray.get` hands their
answers back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launcher.backend import AgentState
from launcher.backend_ray import RayBackend
from launcher.planner import NodeSlice, Plan


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a):
        return self.fn(*a)


def _group(agents):
    plan = Plan(1, 8, 1, (NodeSlice("n0", (0,)),))
    return SimpleNamespace(job_id="j", attempt=1, plan=plan, pg_name="fleet-pg-j-a1",
                           pg=None, agents=agents)


class _Dead:
    """What `.remote()` of a dead actor returns: `ray.get` raises on it."""


@pytest.fixture(autouse=True)
def _ray_get(monkeypatch):
    import ray

    def get(x, timeout=None):
        if isinstance(x, _Dead):
            raise RuntimeError("actor died")
        return x
    monkeypatch.setattr(ray, "get", get)


# what each agent answers to request_checkpoint -> whether the ranks were asked
REQUESTS = [
    ("agents of a version without the method", None, False),
    ("every agent passes it on", [True, None], True),
    ("one agent's workload cannot save on request", [True, False], False),
]


@pytest.mark.parametrize(("answers", "asked"), [r[1:] for r in REQUESTS],
                         ids=[r[0] for r in REQUESTS])
def test_request_checkpoint_tolerates_agents_without_it(answers, asked):
    if answers is None:
        agents = [SimpleNamespace(poll=None), SimpleNamespace(poll=None)]
    else:
        agents = [SimpleNamespace(request_checkpoint=_Call(lambda v=v: v)) for v in answers]
    assert RayBackend().request_checkpoint(_group(agents)) is asked


def test_poll_types_each_agent_and_stops_at_a_lost_one():
    ok = {"status": "failed", "exit_code": 75, "reason": "rank-0 exited", "events": [],
          }
    status = RayBackend().poll(_group([SimpleNamespace(poll=_Call(lambda: ok)),
                                       SimpleNamespace(poll=_Call(_Dead))]))
    first, lost = status.agents
    assert first.state == AgentState.FAILED and first.exit_code == 75
    assert lost.state == AgentState.LOST and "agent 1 lost (RuntimeError" in lost.reason
    assert status.lost()[0] == 1
