"""The Llip model and its baselines: :class:`LlipModel` built from a :class:`~llip.configs.ModelConfig`."""

from __future__ import annotations

import torch

from ..configs import ModelConfig, get_config, list_models
from .model import MAX_LOGIT_SCALE, LlipModel

__all__ = ["MAX_LOGIT_SCALE", "LlipModel", "ModelConfig", "create_model", "list_models"]


def create_model(name: str, device=None, **overrides) -> LlipModel:
    """Build the registered model ``name`` (see :func:`list_models`) with config ``overrides``, e.g.
    ``create_model("llip-tiny", K=16, tau=3.0)``. ``device="meta"`` builds it without allocating memory."""
    config = get_config(name, **overrides)
    if device is None:
        return LlipModel(config)
    with torch.device(device):
        return LlipModel(config)
