"""The Llip model and its baselines: :class:`LlipModel` built from a :class:`~llip.configs.ModelConfig`."""

from __future__ import annotations

import contextlib
import os

import torch

from ..configs import ModelConfig, get_config, list_models
from .head import LlipHead, MixtureTokens
from .model import MAX_LOGIT_SCALE, LlipModel
from .pretrained import load_open_clip

__all__ = ["MAX_LOGIT_SCALE", "LlipHead", "LlipModel", "MixtureTokens", "ModelConfig", "create_model", "list_models"]


def create_model(
    name: str, device=None, *, pretrained: str | os.PathLike | dict | None = None, **overrides
) -> LlipModel:
    """Build the registered model ``name`` (see :func:`list_models`) with config ``overrides``, e.g.
    ``create_model("llip-tiny", K=16, tau=3.0)``. ``device="meta"`` builds it without allocating memory.

    ``pretrained``: an open_clip ViT CLIP checkpoint (a path or its state dict) to start from (llip/model/pretrained.py:
    exact for ``clip-*`` / ``siglip-*``, the new parts of ``llip-*`` by a documented rule); pass the ``activation``
    its weights were trained with."""
    config = get_config(name, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = LlipModel(config)
    if pretrained is not None:
        load_open_clip(model, pretrained)
    return model
