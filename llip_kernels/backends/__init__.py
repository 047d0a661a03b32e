"""The backends: interchangeable implementations of the Llip op family, one module (or package) each.

| backend | module | where | what |
|---|---|---|---|
| ``triton`` | ``backends/triton/`` | GPU (CPU under ``TRITON_INTERPRET=1``) | fused Triton kernels, form 3 |
| ``cuda`` | ``backends/cuda.py`` + ``csrc/cuda/`` | GPU | hand-written tensor-core kernels, form 3 |
| ``cpu`` | ``backends/cpu.py`` + ``csrc/cpu/`` | CPU | C++/OpenMP kernels, form 3 |
| ``torch`` | ``backends/torch.py`` | anywhere | chunked plain torch, the cheapest form per shape |
| ``reference`` | ``llip_kernels/reference.py`` | anywhere | the formula as written; the test oracle |

Every backend is a module that implements :class:`Backend`; :mod:`llip_kernels.dispatch` is the only caller,
after the public op has validated the inputs (so a backend may assume the invariants of
:class:`llip_kernels._validate.LlipProblem`, with ``t`` and ``b`` 0-dim float32 tensors on the inputs' device,
float64 for float64 inputs). A backend imports only the bottom layer (:mod:`llip_kernels.algebra`,
:mod:`llip_kernels.settings`, ``_validate``, ``_build``, ``_custom_ops``): never another backend, the dispatcher or
the test helpers (``tests/kernels/test_layers.py`` checks it). Importing this package imports no backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from .._validate import LlipProblem


class Backend(Protocol):
    """What a backend module provides. Optional members are listed in :data:`OPTIONAL`."""

    def environment_reasons(self) -> list[str]:
        """What this machine lacks for the backend (Triton, a compiler, a GPU), judged without heavy work;
        empty when it could run here."""

    def not_supported_reasons(self, problem: LlipProblem) -> list[str]:
        """Why the backend cannot run this call (device, dtype, op, shape limits, a failed build); empty if it can.
        An explicit ``backend=`` request that gets reasons raises with all of them."""

    def algebraic_form(self, problem: LlipProblem) -> int:
        """The algebraic form (1, 2 or 3 of docs/design.md section 4) this backend evaluates for the call."""

    def flops(self, op: str, Bi: int, Bt: int, H: int, K: int, d: int, backward: bool = False) -> float:
        """FLOPs it performs for ``op``: the forward pass, or the backward pass alone when ``backward`` (a training
        step costs the sum), counted with :mod:`llip_kernels.algebra`'s model for what it really runs."""

    def logits(self, k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
        """``t * cos(z_ij, y_j) + b`` -> ``[Bi, Bt]`` float32."""

    def sigmoid_loss(self, k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
        """SigLIP loss over all pairs, normalised by Bi -> ``[]`` float32."""

    def softmax_loss(self, k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
        """Symmetric InfoNCE with diagonal positives (``Bi == Bt``) -> ``[]`` float32."""


REQUIRED = (
    "environment_reasons",
    "not_supported_reasons",
    "algebraic_form",
    "flops",
    "logits",
    "sigmoid_loss",
    "softmax_loss",
)

OPTIONAL = {
    "mix": "mix(k, v, q, w_out, *, tau, all_pairs) -> z; without it the backend reports that it cannot run mix",
    "FUSED_TRAINING_OPS": "ops whose gradients come out of the forward call under autograd (bench reports no "
    "separate backward for them)",
    "FLOP_FORM": "a one-line statement of the FLOP formula, printed by the benchmarks",
}
