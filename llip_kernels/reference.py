"""Backend ``"reference"``: the Llip score exactly as written (form 1 of docs/design.md section 4).

It materialises the ``[Bi, Bt, H, K]`` attention weights and the ``[Bi, Bt, D]`` mixed features and lets
torch autograd differentiate plain ops. It is the oracle of the test suite and the baseline of the
benchmarks, not a fast path: memory grows as Bi * Bt * (H * K + D).

Arithmetic runs in the inputs' dtype (as the official code does under autocast); logits and losses are
returned in float32, or float64 for float64 inputs (the test oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import LlipProblem
from .algebra import call_flops, mix_aligned, sigmoid_loss_from_logits, softmax_loss_from_logits

FLOP_FORM = "reference: form 1, 4KD + 2D^2 per pair; backward = 2 x forward (autograd)"


def environment_reasons() -> list[str]:
    return []  # plain torch


def not_supported_reasons(problem: LlipProblem) -> list[str]:
    return []  # runs anything, anywhere (memory permitting)


def algebraic_form(problem: LlipProblem) -> int:
    return 1


def flops(op: str, Bi: int, Bt: int, H: int, K: int, d: int, backward: bool = False) -> float:
    """Form 1 as written: ``4KD + 2D^2`` per pair; autograd's backward costs two matmuls per forward matmul."""
    fwd = float(call_flops(1, Bi, Bt, H, K, d))
    return 2.0 * fwd if backward else fwd


def mix_all_pairs(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, w_out: torch.Tensor, tau: float) -> torch.Tensor:
    """``z[i, j] = concat_h(sum_k softmax_k(<K_i[h,k], Q_j[h]> / tau) V_i[h,k]) @ w_out`` -> ``[Bi, Bt, D]``."""
    Bi, H, K, d = k.shape
    Bt = q.shape[0]
    scores = torch.einsum("ihkc,jhc->ijhk", k, q) / tau  # [Bi, Bt, H, K]
    attn = torch.softmax(scores, dim=-1)  # [Bi, Bt, H, K]
    mixed = torch.einsum("ijhk,ihkc->ijhc", attn, v).reshape(Bi, Bt, H * d)  # [Bi, Bt, D]
    return mixed @ w_out  # [Bi, Bt, D]


def mix(k, v, q, w_out, *, tau: float, all_pairs: bool) -> torch.Tensor:
    return (mix_all_pairs if all_pairs else mix_aligned)(k, v, q, w_out, tau)


def cosine_all_pairs(k, v, q, y, w_out, tau: float) -> torch.Tensor:
    """``cos(z[i, j], y_j)`` for every pair -> ``[Bi, Bt]`` float32 (float64 for float64 inputs; F.normalize
    convention, eps 1e-12)."""
    z = mix_all_pairs(k, v, q, w_out, tau)  # [Bi, Bt, D]
    cos = (F.normalize(z, dim=-1) * F.normalize(y, dim=-1).unsqueeze(0)).sum(-1)
    return cos if cos.dtype == torch.float64 else cos.float()


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
    return t * cosine_all_pairs(k, v, q, y, w_out, tau) + b


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    return sigmoid_loss_from_logits(logits(k, v, q, y, w_out, t, b, tau=tau), pos_offset)


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    return softmax_loss_from_logits(t * cosine_all_pairs(k, v, q, y, w_out, tau))
