"""Backend ``"triton"``: fused all-pairs Llip logits, sigmoid loss and softmax loss, forward and backward.

Algebraic form: **form 3** of docs/design.md section 4 for every shape. Per pair it costs ``4KD + 2(HK)^2`` FLOPs
(scores + value dots + the quadratic form ``||z||^2 = a G_i a^T``) against ``2KD(1+H)`` for form 2 and
``4KD + 2D^2`` for form 1. It is the cheapest form at every paper config but B/32 (0.66 vs 0.59 MFLOP/pair,
11% more), and the only one whose per-pair working set does not grow with D: form 2 accumulates a D-wide
``z`` per pair (D up to 4096 does not fit a register tile next to its [BT, HK] weights), form 3 only
[BT, BK] blocks. The output projection moves to the text side (``U_j = W_out y_hat_j``, once per text) and
the norm to a per-image Gram matrix ``G_i = V'_i V'_i^T`` (``[HK, HK]``, once per image), both plain torch,
so autograd carries their gradients back to v, w_out, y. Cost of the choice: G takes ``Bi (HK)^2`` memory
(1 MiB per image at HK = 512 in fp32, and as much again for dG; 256 MiB per image at the H=16, K=512 extreme:
that is why ``not_supported_reasons`` caps HK at 8192) and ``2(HK)^2`` FLOPs per pair dominate when
HK^2 >> KD (large K*H, small d). A form-2 kernel for those shapes is future work; :func:`flops` reports what
runs.

Never allocated: anything of Bi*Bt*K or Bi*Bt*D elements, nor Bi*Bt for the losses. Kernels are persistent
(one program per SM) and loop over work items (image-stationary: an image against its share of text blocks;
text-stationary: the reverse), keep the softmax weights of one [BT texts x HK] tile in a per-program scratch
(programs * BT * HK floats: 132 * 64 * 512 * 4 B = 17 MB on an H200 at HK = 512, twice that in the backward),
and the backward recomputes tiles. The sigmoid loss kernel sums ``softplus(logit)`` over all pairs as
negatives; the O(Bi) positives are corrected in torch (``-log sigmoid(x) = softplus(x) - x``). The softmax
loss keeps row and column log-sum-exps (an image-stationary and a text-stationary pass, Inf-CL style) and the
diagonal in torch.

Modules: ``kernels.py`` (tile helpers and the forward kernel), ``kernels_backward.py`` (the backward kernel),
``launch.py`` (tile configuration, precision, the autograd Function, the ops), ``aot.py`` (compiling for a GPU
without one, for the spill table), ``interpreter.py`` (a fix of the CPU interpreter's bf16 products).

Precision: fp32 inputs use IEEE fp32 products (``$LLIP_KERNELS_ALLOW_TF32=1`` opts into TF32); bf16/fp16
inputs use tensor-core products with fp32 accumulation; all outputs fp32.

Determinism: by default the backward is one image-stationary pass that adds every gradient (dK, dV, dG of
the images, dQ, dU of the texts) with fp32 atomics, so gradients can differ in the last bits run to run on a
GPU. :func:`llip_kernels.settings.deterministic_requested` (``$LLIP_KERNELS_DETERMINISTIC=1`` or
``torch.use_deterministic_algorithms(True)``) switches to one program per image with ordered read-modify-write
for dK, dV, dG and a second, text-stationary pass for dQ, dU: bitwise repeatable, at the price of recomputing
every tile once more (about 1.6x the backward's FLOPs, see :func:`flops`) and less parallelism when Bi is small.

Importing this package needs no Triton; the kernels load on first use.
"""

from __future__ import annotations

import importlib.util

import torch

from ... import settings
from ..._validate import LlipProblem
from ...algebra import PAIR_OPS, image_flops, pair_flops, pair_grad_flops, text_flops

MAX_HK = 8192  # H * K: G_i is [HK, HK] per image
BACKWARD_BLOCK_K = 32  # the backward's token tile (launch.MAX_BLOCK_K_BWD): K beyond it costs a recomputation
FLOP_FORM = "triton: form 3, 4KD + 2(HK)^2 per pair fwd; bwd recomputes it and adds 8KD + 2(HK)^2"


@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    """Whether Triton can be imported (asked once per call site; a constant for torch.compile)."""
    return importlib.util.find_spec("triton") is not None


def environment_reasons() -> list[str]:
    """What this machine lacks for the triton backend (empty: it can run on a CUDA device or the interpreter)."""
    if not _triton_installed():
        return ["triton is not installed (pip install triton)"]
    if settings.triton_interpreting():
        return []
    if not torch.cuda.is_available():
        return ["needs a CUDA device or TRITON_INTERPRET=1"]
    return []


def not_supported_reasons(problem: LlipProblem) -> list[str]:
    """Why this backend cannot run ``problem``; empty if it can."""
    reasons = []
    if not _triton_installed():
        return ["triton is not installed (pip install triton)"]
    if problem.op not in PAIR_OPS:
        reasons.append(f"does not implement llip {problem.op}")
    interpreting = settings.triton_interpreting()
    if problem.device.type == "cpu":
        if not interpreting:
            reasons.append("CPU tensors: needs a CUDA device or TRITON_INTERPRET=1")
    elif problem.device.type == "cuda":
        if interpreting:
            reasons.append("TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only")
        elif torch.cuda.get_device_capability(problem.device) < (8, 0):
            reasons.append("needs a GPU of compute capability >= 8.0 (Ampere or newer)")
    else:
        reasons.append(f"{problem.device.type} tensors are not supported (CUDA, or CPU under TRITON_INTERPRET=1)")
    if problem.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"dtype {problem.dtype} is not supported (float32, bfloat16, float16)")
    if problem.H * problem.K > MAX_HK:
        reasons.append(f"H*K = {problem.H * problem.K} > {MAX_HK}: the per-image Gram matrices would not fit")
    return reasons


def algebraic_form(problem: LlipProblem) -> int:
    return 3


def flops(
    op: str,
    Bi: int,
    Bt: int,
    H: int,
    K: int,
    d: int,
    backward: bool = False,
    *,
    deterministic: bool = False,
    block_k: int = BACKWARD_BLOCK_K,
) -> float:
    """FLOPs the kernels perform for ``op``: the forward pass, or the backward pass alone when ``backward``.

    Per pair, forward: ``4KD + 2(HK)^2``; the softmax loss runs it twice (row and column statistics). Backward:
    the forward recomputed with ``P = G a`` kept, plus ``8KD + 2(HK)^2`` of gradients; ``2KD`` more when K spans
    several token tiles (``block_k``; the value dots are recomputed per head for the softmax backward); the
    deterministic mode recomputes the forward once more in its text-stationary pass. Precomputations: ``V'``
    and ``G`` per image, ``U`` per text; their backward costs about twice their forward."""
    if op not in PAIR_OPS:
        raise ValueError(f"op must be logits, sigmoid_loss or softmax_loss, got {op!r}")
    D = H * d
    pre = Bi * image_flops(3, H, K, d) + Bt * text_flops(3, H, d)
    fwd = pair_flops(3, H, K, d)
    if not backward:
        passes = 2 if op == "softmax_loss" else 1
        return float(passes * Bi * Bt * fwd + pre)
    pair = fwd + pair_grad_flops(H, K, d)
    if block_k < K:
        pair += 2 * K * D
    if deterministic:
        pair += fwd
    return float(Bi * Bt * pair + 2 * pre)


def logits(k, v, q, y, w_out, t, b, *, tau: float):
    """``[Bi, Bt]`` float32 logits ``t * cos(z_ij, y_j) + b`` (see :func:`llip_kernels.llip_logits`)."""
    from .launch import logits as impl

    return impl(k, v, q, y, w_out, t, b, tau=tau)


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset):
    """0-dim float32 SigLIP loss (see :func:`llip_kernels.llip_sigmoid_loss`); never builds [Bi, Bt]."""
    from .launch import sigmoid_loss as impl

    return impl(k, v, q, y, w_out, t, b, tau=tau, pos_offset=pos_offset)


def softmax_loss(k, v, q, y, w_out, t, *, tau: float):
    """0-dim float32 symmetric InfoNCE loss (see :func:`llip_kernels.llip_softmax_loss`); never builds [Bi, Bt]."""
    from .launch import softmax_loss as impl

    return impl(k, v, q, y, w_out, t, tau=tau)
