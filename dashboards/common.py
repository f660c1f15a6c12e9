"""Shared pieces of the fleet dashboards: datasource, query and panel helpers."""

from __future__ import annotations

from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.dashboard import DatasourceVariable
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, DynamicConfigValue

# The SDK release these dashboards are built with is generated from Grafana
# 11.6's schema; README states the Grafana versions they target.
GRAFANA_VERSION = "11.6"
JOB_LABEL = "job_name"

# Users pick their Prometheus once per dashboard instead of us hard-coding a uid.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


def datasource_variable() -> DatasourceVariable:
    return DatasourceVariable("datasource").label("Prometheus").type("prometheus")


def query(expr: str, legend: str, ref_id: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .range()
    )


def graph(title: str, description: str, unit: str, width: int = 12) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
    )


def right_axis(ref_id: str, unit: str) -> tuple[str, list[DynamicConfigValue]]:
    """Override putting one query's series on a right-hand axis with its own unit."""
    return ref_id, [
        DynamicConfigValue(id_val="custom.axisPlacement", value=common.AxisPlacement.RIGHT),
        DynamicConfigValue(id_val="unit", value=unit),
    ]


def single_stat(title: str, description: str, unit: str, width: int = 6) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
    )
