"""llip_kernels: fused Llip mixer + contrastive logits and losses.

Public ops (see :mod:`llip_kernels.functional` for shapes): :func:`llip_logits`, :func:`llip_sigmoid_loss`,
:func:`llip_softmax_loss`, :func:`llip_mix`; pooled baselines :func:`sigmoid_loss`, :func:`softmax_loss`;
modules in :mod:`llip_kernels.nn`; :func:`backends` tells which backend can run what.

Importing this package touches no device and needs neither Triton nor a compiler.
"""

from .baselines import pooled_logits, sigmoid_loss, softmax_loss
from .dispatch import BACKEND_MODULES, deterministic_requested
from .functional import backends, llip_logits, llip_mix, llip_sigmoid_loss, llip_softmax_loss

__version__ = "0.1.0"

__all__ = [
    "BACKEND_MODULES",
    "backends",
    "deterministic_requested",
    "llip_logits",
    "llip_mix",
    "llip_sigmoid_loss",
    "llip_softmax_loss",
    "pooled_logits",
    "sigmoid_loss",
    "softmax_loss",
]
