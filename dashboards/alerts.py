"""Prometheus alerting rules as code.

Each rule is split into the *signal* (the measured quantity, one series per
job) and the *condition* applied to it. The generated alerts.yaml only carries
the combined expression; the split lets the integration test prove that every
signal returns real, plausible series from a real run, even while no alert
fires (a healthy run must not fire them).
"""

from __future__ import annotations

from dataclasses import dataclass

from dashboards.common import JOB_LABEL

RUNNING = 'fleet_job_state{state="running"} == 1'


@dataclass(frozen=True)
class AlertRule:
    name: str
    signal: str
    condition: str
    for_: str
    severity: str
    summary: str
    description: str
    only_running: bool = True

    @property
    def expr(self) -> str:
        expr = f"({self.signal}) {self.condition}"
        if self.only_running:
            # A finished job stops heartbeating and checkpointing on purpose.
            expr += f" and on ({JOB_LABEL}) ({RUNNING})"
        return expr

    def to_rule(self) -> dict[str, object]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "description": self.description},
        }


RULES = (
    AlertRule(
        name="FleetJobStalled",
        signal=f"time() - max by ({JOB_LABEL}) (fleet_rank_last_heartbeat_timestamp_seconds)",
        condition="> 300",
        for_="1m",
        severity="critical",
        summary="Job {{ $labels.job_name }} has not heartbeated for 5 minutes",
        description="No rank of {{ $labels.job_name }} wrote a heartbeat for "
        "{{ $value | humanizeDuration }} while the job is running: a hung collective "
        "or a dead node the controller has not noticed.",
    ),
    AlertRule(
        name="FleetJobRestartsClimbing",
        signal="increase(fleet_job_restarts_total[1h])",
        condition=">= 3",
        for_="0m",
        severity="warning",
        summary="Job {{ $labels.job_name }} restarted 3 or more times in an hour",
        description="{{ $labels.job_name }} restarted {{ $value | humanize }} times in the "
        "last hour: a crash loop or a flaky node.",
        only_running=False,
    ),
    AlertRule(
        name="FleetGoodputLow",
        signal="fleet_goodput_ratio",
        condition="< 0.8",
        for_="30m",
        severity="warning",
        summary="Job {{ $labels.job_name }} goodput below 80%",
        description="Only {{ $value | humanizePercentage }} of {{ $labels.job_name }}'s wall "
        "time went into optimizer steps that were kept.",
    ),
    AlertRule(
        name="FleetCheckpointTooOld",
        signal="time() - fleet_checkpoint_last_success_timestamp_seconds",
        condition="> 3600",
        for_="5m",
        severity="warning",
        summary="Job {{ $labels.job_name }} has no checkpoint from the last hour",
        description="The newest good checkpoint of {{ $labels.job_name }} is "
        "{{ $value | humanizeDuration }} old: a failure now loses that much training.",
    ),
    AlertRule(
        name="FleetCheckpointFailing",
        signal="increase(fleet_checkpoint_failures_total[30m])",
        condition="> 0",
        for_="0m",
        severity="warning",
        summary="Checkpoint saves of {{ $labels.job_name }} are failing",
        description="{{ $value | humanize }} checkpoint saves of {{ $labels.job_name }} "
        "failed in the last 30 minutes.",
        only_running=False,
    ),
)


def rule_groups() -> dict[str, object]:
    return {"groups": [{"name": "ascend-fleet", "rules": [r.to_rule() for r in RULES]}]}
