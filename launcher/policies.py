"""The controller's policies: small classes with one decision method each, pure functions
of what they are given (no store, no backend, no clock of their own). Their defaults are
the spec's (launcher/spec.py `RestartPolicy`), never restated here."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from launcher import spec as specmod
from launcher import workloads
from launcher.contract import NON_RETRYABLE_EXIT_CODES

# 2**62 times any base a spec allows is still a finite float: the delay is capped by
# maxBackoffSeconds long before, and a long crash loop cannot overflow it.
MAX_BACKOFF_EXPONENT = 62
JITTER = 0.25  # up to +25 %: many jobs failing together (a node loss) do not retry in lockstep


def restart_policy(spec: dict | specmod.RestartPolicy | None) -> specmod.RestartPolicy:
    """The typed restart policy of a stored spec (or of its `restart` mapping)."""
    if isinstance(spec, specmod.RestartPolicy):
        return spec
    return specmod.RestartPolicy.model_validate(spec or {})


class FailureKind(StrEnum):
    EXIT = "exit"            # a rank exited non-zero; the agents live on
    LOST = "lost"            # an agent's node or actor is gone
    HANG = "hang"            # heartbeats stalled past hangTimeoutSeconds
    STARTUP = "startup"      # no first heartbeat within startupTimeoutSeconds
    START = "start"          # the ranks did not start
    RECOVERY = "recovery"    # agents gone while the controller was down


# Failures after which the agents are alive, so the ranks may restart on the same devices.
AGENTS_ALIVE = frozenset({FailureKind.EXIT, FailureKind.HANG, FailureKind.STARTUP})


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    reason: str
    exit_code: int | None = None


@dataclass(frozen=True)
class FailureDecision:
    retry: bool
    in_place: bool          # keep the placement (when the backend can hold it)
    delay: float            # seconds before the next attempt
    streak: int             # failed attempts in a row without a new checkpoint
    restart: int            # the restart this would be (1-based)
    max_restarts: int
    retryable: bool         # False: the failure itself rules out a restart

    def message(self, attempt: int, reason: str, held: bool) -> str:
        if self.retry:
            in_a_row = (f", {self.streak} failures in a row without a new checkpoint"
                        if self.streak > 1 else "")
            where = " in place" if held else ""
            return (f"attempt {attempt} failed: {reason}; restart {self.restart}/"
                    f"{self.max_restarts}{where} in {self.delay:.1f}s{in_a_row}")
        return reason


def failure_streak(previous: int, progress: dict) -> int:
    """The backoff's exponent after a failed attempt: failed attempts in a row that saved no
    checkpoint past the step they resumed from. A failure after a new checkpoint (a fault in
    a run that was training well) starts again from the base delay, as Kubernetes forgets a
    CrashLoopBackOff once a container has run a while."""
    saved = progress.get("checkpoint_ok") and \
        (progress.get("checkpoint_step") or 0) > (progress.get("resumed_step") or 0)
    return 1 if saved else previous + 1


def backoff_seconds(policy: dict | specmod.RestartPolicy, streak: int) -> float:
    p = restart_policy(policy)
    exponent = min(max(0, streak - 1), MAX_BACKOFF_EXPONENT)
    delay = min(p.maxBackoffSeconds, p.backoffSeconds * float(2 ** exponent))
    return delay * (1.0 + JITTER * random.random())  # noqa: S311 - not crypto


class WarmStart(StrEnum):
    COLD = "cold"        # fresh rank processes
    STANDBY = "standby"  # processes that imported the workload ahead
    PREJOIN = "prejoin"  # ...and joined the next attempt's cluster and compiled ahead


class RestartPlacementPolicy:
    """Whether a failed attempt's ranks restart on the devices they had, and how warm.

    A rank that exited or hung on a healthy node says nothing against its devices, and
    keeping them skips the placement and the agents (with standbys, the imports). A rank
    that keeps failing with no new checkpoint may have a bad device: after `max_streak`
    such failures in a row the job is planned afresh."""

    def __init__(self, max_streak: int = specmod.IN_PLACE_MAX_FAILURES):
        self.max_streak = max_streak

    def keep(self, policy: dict | specmod.RestartPolicy, streak: int) -> bool:
        return restart_policy(policy).inPlace and streak <= self.max_streak

    @staticmethod
    def warm_start(kind: str, spec: dict) -> WarmStart:
        """The warm start a restart in place of this job may use. Prejoin where the
        workload's adapter says its ranks can hold after joining on this device type
        (launcher/workloads.py)."""
        p = restart_policy(spec.get("restart"))
        if kind != "TrainJob" or not (p.inPlace and p.standby):
            return WarmStart.COLD
        device = specmod.Resources.model_validate(spec.get("resources") or {}).deviceType
        if workloads.of_spec(spec).prejoins_on(device):
            return WarmStart.PREJOIN
        return WarmStart.STANDBY


class FailurePolicy:
    """Retry or fail, in place or afresh, after how long."""

    def __init__(self, placement: RestartPlacementPolicy | None = None,
                 non_retryable: frozenset[int] = NON_RETRYABLE_EXIT_CODES):
        self.placement = placement or RestartPlacementPolicy()
        self.non_retryable = non_retryable

    def decide(self, failure: Failure, policy: specmod.RestartPolicy, restarts: int,
               previous_streak: int, progress: dict, cancelled: bool = False
               ) -> FailureDecision:
        retryable = not (failure.kind == FailureKind.EXIT and
                         failure.exit_code in self.non_retryable)
        streak = failure_streak(previous_streak, progress)
        retry = retryable and not cancelled and restarts < policy.maxRestarts
        in_place = retry and failure.kind in AGENTS_ALIVE and self.placement.keep(policy, streak)
        delay = backoff_seconds(policy, streak) if retry else 0.0
        return FailureDecision(retry, in_place, delay, streak, restarts + 1,
                               policy.maxRestarts, retryable)


class Watchdog:
    """Whether a running attempt counts as hung. A rank's first heartbeat only comes after
    its interpreter start, imports and collective join, which on a busy node take far longer
    than a step: until then it is held to the startup timeout, not to the hang timeout."""

    def decide(self, policy: specmod.RestartPolicy, ranks: int, started: float,
               rank_heartbeat: dict[int, float], now: float) -> Failure | None:
        hang, startup = policy.hangTimeoutSeconds, policy.startupTimeoutSeconds
        for r in range(max(ranks, 1)):
            seen = rank_heartbeat.get(r)
            if seen is None and now - started > startup:
                return Failure(FailureKind.STARTUP, (
                    f"rank-{r} sent no heartbeat in {now - started:.0f}s since launch "
                    f"(startupTimeoutSeconds={startup:g})"))
            if seen is not None and now - seen > hang:
                return Failure(FailureKind.HANG, (
                    f"heartbeat stalled for {now - seen:.0f}s on rank-{r} "
                    f"(hangTimeoutSeconds={hang:g})"))
        return None


class ResizeVia(StrEnum):
    REQUEST = "request"    # ask the ranks to save the next step and exit EXIT_CHECKPOINTED
    PERIODIC = "periodic"  # wait for the next periodic checkpoint, then stop the ranks


@dataclass(frozen=True)
class ResizeDecision:
    to_devices: int
    from_devices: int
    via: ResizeVia


class ScalingPolicy:
    """Grow a running elastic job when a better plan exists and nothing waits: waiting jobs
    always come first, growth only uses devices the queue cannot."""

    def decide(self, current: int, max_devices: int, better: int | None, queue_waits: bool,
               can_request: bool = True) -> ResizeDecision | None:
        if queue_waits or current >= max_devices or better is None or better <= current:
            return None
        return ResizeDecision(better, current,
                              ResizeVia.REQUEST if can_request else ResizeVia.PERIODIC)
