"""The "Fleet" dashboard: all jobs and all devices."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.models import common

from dashboards.common import JOB_LABEL, datasource_variable, graph, query, single_stat

UID = "fleet-overview"


def build() -> Dashboard:
    return (
        Dashboard("Fleet / Overview")
        .uid(UID)
        .description("Jobs, devices, queue, recovery and goodput across the fleet.")
        .tags(["ascend-fleet", "fleet"])
        .time("now-24h", "now")
        .refresh("1m")
        .with_variable(datasource_variable())
        .with_row(Row("Jobs"))
        .with_panel(
            graph("Jobs by state", "Jobs the controller knows, by state.", "none")
            .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
            .with_target(query("sum by (state) (fleet_jobs)", "{{state}}", "A"))
        )
        .with_panel(
            graph("Devices used / free", "Devices held by running jobs and left free.", "none")
            .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
            .with_target(query("sum by (state) (fleet_devices)", "{{state}}", "A"))
        )
        .with_row(Row("NPUs (Huawei npu-exporter)"))
        .with_panel(
            graph(
                "NPU utilisation",
                "AI core utilisation per chip, from npu-exporter where the fleet runs it.",
                "percent",
            )
            .with_target(
                query(
                    "avg by (instance, id) (npu_chip_info_utilization)",
                    "{{instance}} chip {{id}}",
                    "A",
                )
            )
            .with_target(query("avg(npu_chip_info_utilization)", "fleet mean", "B"))
        )
        .with_panel(
            graph("NPU HBM used", "HBM in use per chip (npu-exporter reports MB).", "decmbytes")
            .with_target(
                query(
                    "sum by (instance, id) (npu_chip_info_hbm_used_memory)",
                    "{{instance}} chip {{id}}",
                    "A",
                )
            )
        )
        .with_row(Row("Queue, recovery and goodput"))
        .with_panel(
            graph("Queue", "Jobs waiting, and how long each waited before it started.", "none")
            .with_target(query('sum(fleet_jobs{state="pending"})', "pending jobs", "A"))
            .with_target(query("fleet_queue_wait_seconds", f"wait s {{{{{JOB_LABEL}}}}}", "B"))
        )
        .with_panel(
            graph(
                "Recovery time",
                "Per job, its last restart: failed attempt's last heartbeat to first new step.",
                "s",
            ).with_target(query("fleet_recovery_seconds", f"{{{{{JOB_LABEL}}}}}", "A"))
        )
        .with_panel(
            graph("Goodput", "Kept optimizer-step time / wall time, per job.", "percentunit")
            .min(0)
            .max(1)
            .with_target(query("fleet_goodput_ratio", f"{{{{{JOB_LABEL}}}}}", "A"))
        )
        .with_panel(
            single_stat("Restarts in the last hour", "All jobs together.", "none").with_target(
                query("sum(increase(fleet_job_restarts_total[1h]))", "restarts", "A")
            )
        )
    )
