"""The "Training" dashboard: one job, chosen with the $job variable."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import AnnotationQuery, Dashboard, QueryVariable, Row
from grafana_foundation_sdk.models.dashboard import VariableRefresh, VariableSort

from dashboards.common import (
    DATASOURCE,
    JOB_LABEL,
    datasource_variable,
    graph,
    query,
    right_axis,
    single_stat,
)

UID = "fleet-training"
SEL = f'{JOB_LABEL}="$job"'


def build() -> Dashboard:
    job_var = (
        QueryVariable("job")
        .label("Job")
        .datasource(DATASOURCE)
        .query(f"label_values(fleet_train_step, {JOB_LABEL})")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    # A restart bumps the attempt number: mark it on every graph so a jump in
    # loss or throughput can be read against it.
    restarts = (
        AnnotationQuery()
        .name("Restarts")
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color("red")
        .expr(f"changes(fleet_job_attempt{{{SEL}}}[1m]) > 0")
    )
    loss_lr_ref, loss_lr_props = right_axis("B", "none")
    overflow_ref, overflow_props = right_axis("B", "none")
    return (
        Dashboard("Fleet / Training")
        .uid(UID)
        .description("One training job: progress, optimisation, throughput and checkpoints.")
        .tags(["ascend-fleet", "training"])
        .time("now-6h", "now")
        .refresh("30s")
        .with_variable(datasource_variable())
        .with_variable(job_var)
        .annotation(restarts)
        .with_row(Row("Overview"))
        .with_panel(
            single_stat("Optimizer step", "Optimizer steps done by the job.", "none").with_target(
                query(f"fleet_train_step{{{SEL}}}", "step", "A")
            )
        )
        .with_panel(
            single_stat("Restarts", "Restarts since the job was submitted.", "none").with_target(
                query(f"fleet_job_restarts_total{{{SEL}}}", "restarts", "A")
            )
        )
        .with_panel(
            single_stat(
                "Checkpoint age", "Time since the last checkpoint that saved cleanly.", "s"
            ).with_target(
                query(
                    f"time() - fleet_checkpoint_last_success_timestamp_seconds{{{SEL}}}",
                    "age",
                    "A",
                )
            )
        )
        .with_panel(
            single_stat(
                "Goodput", "Time on optimizer steps that were kept / wall time.", "percentunit"
            ).with_target(query(f"fleet_goodput_ratio{{{SEL}}}", "goodput", "A"))
        )
        .with_row(Row("Optimisation"))
        .with_panel(
            graph("Loss and learning rate", "Training loss per rank; lr on the right.", "none")
            .with_target(query(f"fleet_train_loss{{{SEL}}}", "loss rank {{rank}}", "A"))
            .with_target(query(f"fleet_train_lr{{{SEL}}}", "lr", "B"))
            .override_by_query(loss_lr_ref, loss_lr_props)
        )
        .with_panel(
            graph("Validation top-1 / top-5", "Accuracy (%) at each validation.", "percent")
            .with_target(query(f"fleet_val_top1{{{SEL}}}", "top-1", "A"))
            .with_target(query(f"fleet_val_top5{{{SEL}}}", "top-5", "B"))
        )
        .with_panel(
            graph(
                "Loss scale and overflowed steps",
                "The loss scale of the last step (1 without loss scaling; a dynamic scale halves "
                "at each overflow and doubles after 2000 clean steps), and the optimizer steps "
                "whose gradients overflowed (dropped where the recipe drops them) on the right.",
                "none",
            )
            .with_target(query(f"fleet_train_loss_scale{{{SEL}}}", "loss scale", "A"))
            .with_target(
                query(f"fleet_train_overflow_steps_total{{{SEL}}}", "overflowed steps", "B")
            )
            .override_by_query(overflow_ref, overflow_props)
        )
        .with_row(Row("Throughput"))
        .with_panel(
            graph(
                "Throughput",
                "Images per second of the whole job (global batch / step time), as each "
                "rank timed it; a slow rank shows up below the others.",
                "none",
            )
            .with_target(
                query(
                    f"avg by ({JOB_LABEL}) (fleet_train_images_per_second{{{SEL}}})",
                    "job",
                    "A",
                )
            )
            .with_target(
                query(f"fleet_train_images_per_second{{{SEL}}}", "as timed by rank {{rank}}", "B")
            )
        )
        .with_panel(
            graph("Step time", "Wall time of one optimizer step, per rank.", "s").with_target(
                query(f"fleet_train_step_seconds{{{SEL}}}", "rank {{rank}}", "A")
            )
        )
        .with_row(Row("Elasticity and checkpoints"))
        .with_panel(
            graph(
                "Devices × micro-batch × accumulation = global batch",
                "Resizes change devices and accumulation; the global batch must stay fixed.",
                "none",
            )
            .with_target(query(f"fleet_job_devices{{{SEL}}}", "devices", "A"))
            .with_target(query(f"fleet_job_grad_accum{{{SEL}}}", "accumulation", "B"))
            .with_target(query(f"fleet_job_micro_batch{{{SEL}}}", "micro-batch", "C"))
            .with_target(
                query(
                    f"fleet_job_devices{{{SEL}}} * on ({JOB_LABEL}) fleet_job_micro_batch{{{SEL}}}"
                    f" * on ({JOB_LABEL}) fleet_job_grad_accum{{{SEL}}}",
                    "devices × micro-batch × accumulation",
                    "D",
                )
            )
            .with_target(query(f"fleet_job_global_batch{{{SEL}}}", "global batch (spec)", "E"))
        )
        .with_panel(
            graph(
                "Checkpoint age and save time",
                "Seconds since the last good checkpoint, and how long it took to save.",
                "s",
            )
            .with_target(
                query(
                    f"time() - fleet_checkpoint_last_success_timestamp_seconds{{{SEL}}}",
                    "age",
                    "A",
                )
            )
            .with_target(query(f"fleet_checkpoint_save_seconds{{{SEL}}}", "save time", "B"))
        )
        .with_panel(
            graph(
                "Heartbeat age",
                "Seconds since each rank's last heartbeat line: a stalled rank climbs.",
                "s",
            ).with_target(
                query(
                    f"time() - fleet_rank_last_heartbeat_timestamp_seconds{{{SEL}}}",
                    "rank {{rank}}",
                    "A",
                )
            )
        )
    )
