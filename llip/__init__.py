"""llip: the Llip model (Latent Language Image Pretraining) and its CLIP / SigLIP baselines, on llip_kernels.

Public API (the contract with the trainer):

- :func:`list_models` / :func:`create_model` (``name, **config overrides``) -> :class:`LlipModel`;
- :func:`get_tokenizer` (``context_length=77``, ``file=None``) -> callable ``str | list[str] -> LongTensor [N, L]``;
  :func:`tokenizer_for` (a model's config) -> the one that model reads;
- :func:`image_transform` (``image_size, train``) -> callable ``PIL.Image | uint8 [H, W, 3] -> float32 [3, S, S]``;
- :class:`LlipHead` and :class:`MixtureTokens`: Llip on any ViT and text tower (an open_clip model, say);
- :mod:`llip.evaluation`: zero-shot classification and retrieval.
"""

from llip_kernels import __version__

from .configs import ModelConfig, get_config, list_models
from .model import LlipHead, LlipModel, MixtureTokens, create_model
from .tokenizer import get_tokenizer, tokenizer_for
from .transforms import image_transform

__all__ = [
    "__version__",
    "LlipHead",
    "LlipModel",
    "MixtureTokens",
    "ModelConfig",
    "create_model",
    "get_config",
    "get_tokenizer",
    "image_transform",
    "list_models",
    "tokenizer_for",
]
