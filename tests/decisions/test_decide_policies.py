"""The policies alone: pure decisions, their defaults the spec's."""

from __future__ import annotations

import pytest

from launcher import policies as P
from launcher.spec import IN_PLACE_MAX_FAILURES, RestartPolicy

EXIT, LOST, HANG, START = (P.FailureKind.EXIT, P.FailureKind.LOST, P.FailureKind.HANG,
                           P.FailureKind.START)
NO_CKPT: dict = {}
NEW_CKPT = {"resumed_step": 10, "checkpoint_step": 20, "checkpoint_ok": True}

# kind, exit code, restarts so far, streak before, progress, cancelled ->
# retry, in place, retryable, streak after
FAILURES = [
    ("exit 1", EXIT, 1, 0, 0, NO_CKPT, False, True, True, True, 1),
    ("exit 2", EXIT, 2, 0, 0, NO_CKPT, False, False, False, False, 1),
    ("exit 3", EXIT, 3, 0, 0, NO_CKPT, False, False, False, False, 1),
    ("lost node", LOST, None, 0, 0, NO_CKPT, False, True, False, True, 1),
    ("hang", HANG, None, 0, 0, NO_CKPT, False, True, True, True, 1),
    ("start failure", START, None, 0, 0, NO_CKPT, False, True, False, True, 1),
    ("budget spent", EXIT, 1, 3, 0, NO_CKPT, False, False, False, True, 1),
    ("cancelled meanwhile", EXIT, 1, 0, 0, NO_CKPT, True, False, False, True, 1),
    ("streak past the limit", EXIT, 1, 0, IN_PLACE_MAX_FAILURES, NO_CKPT, False, True,
     False, True, IN_PLACE_MAX_FAILURES + 1),
    ("a new checkpoint resets the streak", EXIT, 1, 0, 5, NEW_CKPT, False, True, True,
     True, 1),
]


@pytest.mark.parametrize(("kind", "code", "restarts", "streak", "progress", "cancelled",
                          "retry", "in_place", "retryable", "after"),
                         [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_failure_policy(kind, code, restarts, streak, progress, cancelled, retry, in_place,
                        retryable, after):
    d = P.FailurePolicy().decide(P.Failure(kind, "why", code), RestartPolicy(), restarts,
                                 streak, progress, cancelled)
    assert (d.retry, d.in_place, d.retryable, d.streak) == (retry, in_place, retryable, after)
    assert d.max_restarts == RestartPolicy().maxRestarts


def test_backoff_is_capped_with_jitter_and_defaults_from_the_spec(monkeypatch):
    monkeypatch.setattr(P.random, "random", lambda: 1.0)
    spec = RestartPolicy()
    assert P.backoff_seconds({}, 1) == spec.backoffSeconds * (1 + P.JITTER)
    assert P.backoff_seconds({}, 10**6) == spec.maxBackoffSeconds * (1 + P.JITTER)


# (ranks' heartbeats relative to now, seconds since launch) -> the failure kind or None
WATCH = [
    ("starting, inside the startup timeout", {}, 599, None),
    ("no first heartbeat", {}, 601, P.FailureKind.STARTUP),
    ("beating", {0: -1}, 700, None),
    ("stalled", {0: -601}, 700, P.FailureKind.HANG),
]


@pytest.mark.parametrize(("beats", "since", "kind"), [w[1:] for w in WATCH],
                         ids=[w[0] for w in WATCH])
def test_watchdog_defaults_are_the_specs(beats, since, kind):
    assert RestartPolicy().hangTimeoutSeconds == RestartPolicy().startupTimeoutSeconds == 600
    now = 10_000.0
    got = P.Watchdog().decide(RestartPolicy(), 1, now - since,
                              {k: now + v for k, v in beats.items()}, now)
    assert (got.kind if got else None) == kind


# current, max, best plan now, a job waits, the backend can ask -> resize to / via
SCALING = [
    ("better plan, nothing waits", 8, 16, 16, False, True, (16, P.ResizeVia.REQUEST)),
    ("no request support", 8, 16, 16, False, False, (16, P.ResizeVia.PERIODIC)),
    ("a job waits", 8, 16, 16, True, True, None),
    ("already at max", 16, 16, 16, False, True, None),
    ("no better plan", 8, 16, 8, False, True, None),
    ("no plan at all", 8, 16, None, False, True, None),
]


@pytest.mark.parametrize(("cur", "hi", "better", "waits", "ask", "want"),
                         [s[1:] for s in SCALING], ids=[s[0] for s in SCALING])
def test_scaling_policy(cur, hi, better, waits, ask, want):
    d = P.ScalingPolicy().decide(cur, hi, better, waits, ask)
    assert (None if d is None else (d.to_devices, d.via)) == want


# spec -> the warm start a restart in place may use
WARM = [
    ("volo on CPU", {"workload": "volo", "resources": {"deviceType": "CPU"}}, P.WarmStart.PREJOIN),
    ("volo on NPU", {"workload": "volo", "resources": {"deviceType": "NPU"}}, P.WarmStart.STANDBY),
    ("smoke", {"workload": "smoke", "resources": {"deviceType": "CPU"}}, P.WarmStart.STANDBY),
    ("standby off", {"restart": {"standby": False}}, P.WarmStart.COLD),
    ("in place off", {"restart": {"inPlace": False}}, P.WarmStart.COLD),
]


@pytest.mark.parametrize(("spec", "warm"), [w[1:] for w in WARM], ids=[w[0] for w in WARM])
def test_warm_start_strategy(spec, warm):
    assert P.RestartPlacementPolicy.warm_start("TrainJob", spec) == warm
    assert P.RestartPlacementPolicy.warm_start("ValidateJob", spec) == P.WarmStart.COLD


def test_the_spec_text_and_the_placement_policy_are_one_fact():
    desc = RestartPolicy.model_fields["inPlace"].description
    assert f"after {IN_PLACE_MAX_FAILURES + 1} failures in a row" in desc
    p = P.RestartPlacementPolicy()
    assert p.keep({}, IN_PLACE_MAX_FAILURES) and not p.keep({}, IN_PLACE_MAX_FAILURES + 1)
