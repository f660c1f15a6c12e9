"""VOLO vision model workload: model, train, validate, export."""

from workloads.volo.model import VOLO, VoloConfig, create_model, list_models, model_config

__all__ = ["VOLO", "VoloConfig", "create_model", "list_models", "model_config"]
