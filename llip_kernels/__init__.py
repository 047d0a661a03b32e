"""llip_kernels: fused Llip mixer + contrastive logits and losses.

Public ops (see :mod:`llip_kernels.functional` for shapes): :func:`llip_logits`, :func:`llip_sigmoid_loss`,
:func:`llip_softmax_loss`, :func:`llip_mix`; pooled baselines :func:`sigmoid_loss`, :func:`softmax_loss`;
modules in :mod:`llip_kernels.nn`; :func:`backend_reasons` tells which backend can run what. The backends
themselves live in :mod:`llip_kernels.backends` (one module or package each) behind :mod:`llip_kernels.dispatch`;
the algebra they share is :mod:`llip_kernels.algebra`; docs/design.md explains the whole.

Importing this package touches no device and needs neither Triton nor a compiler.
"""

from .algebra import Op
from .baselines import pooled_logits, sigmoid_loss, softmax_loss
from .dispatch import BACKEND_MODULES
from .functional import backend_reasons, llip_logits, llip_mix, llip_sigmoid_loss, llip_softmax_loss
from .settings import deterministic_requested

__version__ = "0.1.0"

__all__ = [
    "BACKEND_MODULES",
    "Op",
    "backend_reasons",
    "deterministic_requested",
    "llip_logits",
    "llip_mix",
    "llip_sigmoid_loss",
    "llip_softmax_loss",
    "pooled_logits",
    "sigmoid_loss",
    "softmax_loss",
]
