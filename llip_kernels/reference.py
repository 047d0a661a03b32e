"""Backend ``"reference"``: the Llip score exactly as written (SPEC section 4, form 1).

It materialises the ``[Bi, Bt, H, K]`` attention weights and the ``[Bi, Bt, D]`` mixed features and lets
torch autograd differentiate plain ops. It is the oracle of the test suite and the baseline of the
benchmarks, not a fast path: memory grows as Bi * Bt * (H * K + D).

Arithmetic runs in the inputs' dtype (as the reference code does under autocast); logits and losses are
returned in float32, or float64 for float64 inputs (the test oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import LlipProblem


def not_supported_reasons(op: str, problem: LlipProblem) -> list[str]:
    return []  # plain torch: runs anything, anywhere (memory permitting)


def mix_all_pairs(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, w_out: torch.Tensor, tau: float) -> torch.Tensor:
    """``z[i, j] = concat_h(sum_k softmax_k(<K_i[h,k], Q_j[h]> / tau) V_i[h,k]) @ w_out`` -> ``[Bi, Bt, D]``."""
    Bi, H, K, d = k.shape
    Bt = q.shape[0]
    scores = torch.einsum("ihkc,jhc->ijhk", k, q) / tau  # [Bi, Bt, H, K]
    attn = torch.softmax(scores, dim=-1)  # [Bi, Bt, H, K]
    mixed = torch.einsum("ijhk,ihkc->ijhc", attn, v).reshape(Bi, Bt, H * d)  # [Bi, Bt, D]
    return mixed @ w_out  # [Bi, Bt, D]


def mix_aligned(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, w_out: torch.Tensor, tau: float) -> torch.Tensor:
    """The mixer for aligned pairs (image i with text i) -> ``[B, D]``."""
    B, H, K, d = k.shape
    scores = torch.einsum("bhkc,bhc->bhk", k, q) / tau  # [B, H, K]
    attn = torch.softmax(scores, dim=-1)
    mixed = torch.einsum("bhk,bhkc->bhc", attn, v).reshape(B, H * d)  # [B, D]
    return mixed @ w_out


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


def sigmoid_labels(Bi: int, Bt: int, pos_offset: int | None, device) -> torch.Tensor:
    """``[Bi, Bt]`` float32 labels: +1 where text ``i + pos_offset`` exists for image ``i``, -1 elsewhere."""
    labels = -torch.ones(Bi, Bt, dtype=torch.float32, device=device)
    if pos_offset is not None:
        rows = torch.arange(Bi, device=device)
        cols = rows + pos_offset
        ok = (cols >= 0) & (cols < Bt)
        labels[rows[ok], cols[ok]] = 1.0
    return labels


def sigmoid_loss_from_logits(lg: torch.Tensor, pos_offset: int | None) -> torch.Tensor:
    """SigLIP: ``-(1/Bi) * sum_ij log sigmoid(l_ij * logit_ij)``; 0 for an empty batch."""
    Bi, Bt = lg.shape
    if Bi == 0 or Bt == 0:
        return lg.sum() * 0.0
    labels = sigmoid_labels(Bi, Bt, pos_offset, lg.device)
    return -F.logsigmoid(labels * lg).sum() / Bi


def softmax_loss_from_logits(lg: torch.Tensor) -> torch.Tensor:
    """CLIP: mean of the image->text and text->image cross-entropies, diagonal positives; 0 when empty."""
    B = lg.shape[0]
    if B == 0:
        return lg.sum() * 0.0
    target = torch.arange(B, device=lg.device)
    return 0.5 * (F.cross_entropy(lg, target) + F.cross_entropy(lg.t(), target))


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    return sigmoid_loss_from_logits(logits(k, v, q, y, w_out, t, b, tau=tau), pos_offset)


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    return softmax_loss_from_logits(t * cosine_all_pairs(k, v, q, y, w_out, tau))
