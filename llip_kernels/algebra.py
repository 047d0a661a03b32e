"""The algebra every backend shares: the op names, the three algebraic forms and their FLOP model, the per-text
and per-image precomputations of form 3, the positives of the sigmoid loss, and the losses from logits.

This is the bottom layer of ``llip_kernels``: it imports nothing of the package, and every backend, the
dispatcher, the benchmarks and the tests take these definitions from here instead of restating them.
The maths is in ``docs/design.md`` (section 3: the op contract; section 4: the forms and their cost; section 7:
the gradients of form 3).

Shapes: ``k, v: [Bi, H, K, d]``, ``q: [Bt, H, d]``, ``y: [Bt, D]``, ``w_out: [D, D]`` with ``D = H * d``.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

EPS = 1e-12  # F.normalize's clamp on a norm (cos uses max(||z||, EPS))


class Op(enum.StrEnum):
    """The op family. The value is the public name (``llip_kernels.backend_reasons(op="sigmoid_loss")``); ``code``
    is the integer the compiled kernels switch on (``OP_*`` constants of the Triton kernels, ``enum Op`` of the C++
    kernel; tests check that both agree with these)."""

    LOGITS = ("logits", 0)  # all-pairs logits t * cos + b (the kernels compute cos)
    SIGMOID_LOSS = ("sigmoid_loss", 1)  # SigLIP loss over all pairs
    SOFTMAX_LOSS = ("softmax_loss", 2)  # symmetric InfoNCE (CLIP) loss, diagonal positives
    MIX = ("mix", 3)  # the mixed embeddings z themselves (no kernel: reference and torch backends)

    def __new__(cls, name: str, code: int):
        member = str.__new__(cls, name)
        member._value_ = name
        member.code = code
        return member


PAIR_OPS = (Op.LOGITS, Op.SIGMOID_LOSS, Op.SOFTMAX_LOSS)  # the ops that score pairs (what the kernels fuse)


# ---- FLOP model (docs/design.md section 4) -----------------------------------------------------------------
#
# One model for every backend and every benchmark. A backend's ``flops()`` adds up the pieces it runs: pair work
# (forward, and form 3's gradient work), per-image and per-text precomputations, and whatever it recomputes.


def pair_flops(form: int, H: int, K: int, d: int) -> int:
    """Forward FLOPs per (image, text) pair of algebraic form ``form``:

    1. as written, ``m = a V`` per head then ``z = m W_out``: ``4KD + 2D^2``;
    2. values pre-projected once per image, ``V'_i[h] = V_i[h] W_out[h]``: ``2KD(1 + H)``;
    3. output projection moved to the text side, ``U_j = W_out y_hat_j``, and ``||z||^2 = a G_i a^T``:
       ``4KD + 2(HK)^2``.
    """
    D = H * d
    if form == 1:
        return 4 * K * D + 2 * D * D
    if form == 2:
        return 2 * K * D * (1 + H)
    if form == 3:
        return 4 * K * D + 2 * (H * K) ** 2
    raise ValueError(f"form must be 1, 2 or 3, got {form!r}")


def pair_grad_flops(H: int, K: int, d: int) -> int:
    """Form 3's gradient work per pair on top of the recomputed forward: dK, dQ, dV, dU (``2KD`` each) and the
    pair's rank-one update of dG (``2(HK)^2``): ``8KD + 2(HK)^2``."""
    return 8 * K * H * d + 2 * (H * K) ** 2


def image_flops(form: int, H: int, K: int, d: int, *, gram_from_m: bool = False) -> int:
    """Forward FLOPs per image of the precomputation of ``form``: ``V'`` (``2KD^2``) for forms 2 and 3, plus the
    Gram matrix for form 3, either ``V' V'^T`` (``2(HK)^2 D``) or, ``gram_from_m``, ``V M V^T`` with
    ``M = W_out W_out^T`` (``2(HK)^2 d``; ``M`` itself is :func:`gram_factor_flops`, once per call)."""
    D = H * d
    if form == 1:
        return 0
    vp = 2 * K * D * D
    if form == 2:
        return vp
    if form == 3:
        return vp + 2 * (H * K) ** 2 * (d if gram_from_m else D)
    raise ValueError(f"form must be 1, 2 or 3, got {form!r}")


def text_flops(form: int, H: int, d: int) -> int:
    """Forward FLOPs per text of the precomputation of ``form``: ``U_j = W_out y_hat_j`` (``2D^2``) for form 3."""
    return 2 * (H * d) ** 2 if form == 3 else 0


def gram_factor_flops(D: int) -> int:
    """``M = W_out W_out^T`` once per call (``2D^3``), for Gram matrices formed as ``V M V^T``."""
    return 2 * D**3


def call_flops(form: int, Bi: int, Bt: int, H: int, K: int, d: int) -> int:
    """Forward FLOPs of a whole call in ``form``: the pairs plus the per-image and per-text precomputations."""
    return Bi * Bt * pair_flops(form, H, K, d) + Bi * image_flops(form, H, K, d) + Bt * text_flops(form, H, d)


def cheapest_form(op: str, H: int, K: int, d: int, Bi: int | None = None, Bt: int | None = None) -> int:
    """The form with the fewest forward FLOPs for this call (ties: the lower number).

    With the batch sizes the precomputations count too: form 3's Gram matrices pay off only against enough texts
    per image (hundreds at B/16), so small batches take form 2 or 1. Without them, per pair only. ``mix`` needs
    ``z`` itself, which form 3 never builds, so it chooses between forms 1 and 2."""
    allowed = (1, 2) if op == Op.MIX else (1, 2, 3)
    if Bi is None or Bt is None:
        return min(allowed, key=lambda f: (pair_flops(f, H, K, d), f))
    return min(allowed, key=lambda f: (call_flops(f, Bi, Bt, H, K, d), f))


# ---- the precomputations of form 3 (docs/design.md section 4) ----------------------------------------------
#
# Plain differentiable torch ops, O(Bt) and O(Bi) work: autograd carries the kernels' dU and dG back to y, w_out
# and v. They compute in the dtype of their arguments (callers cast first: float32 for the kernels).


def text_projection(y: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """``U_j = W_out @ y_hat_j`` for every text: ``y [Bt, D]`` -> ``[Bt, D]`` (view it as ``[Bt, H, d]``).
    Then ``<z_ij, y_hat_j> = sum_h <m_ij[h], U_j[h]>``: the output projection moves to the text side."""
    return F.normalize(y, dim=-1, eps=EPS) @ w_out.t()


def projected_values(v: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """``V'_i[h, k] = V_i[h, k] @ W_out[h*d:(h+1)*d, :]``: ``v [Bi, H, K, d]`` -> ``[Bi, H*K, D]`` (one matmul per
    head over all images' tokens; ``z_ij = a_ij V'_i`` with ``a_ij`` flattened to ``H*K``)."""
    Bi, H, K, d = v.shape
    D = H * d
    per_head = torch.matmul(v.transpose(0, 1).reshape(H, Bi * K, d), w_out.view(H, d, D))  # [H, Bi*K, D]
    return per_head.view(H, Bi, K, D).transpose(0, 1).reshape(Bi, H * K, D)


def gram_matrices(v: torch.Tensor, w_out: torch.Tensor, *, pad_tokens_to: int = 1) -> torch.Tensor:
    """Per-image Gram matrices ``G_i = V'_i V'_i^T``: ``[Bi, H*Kp, H*Kp]``, so that ``||z_ij||^2 = a G_i a^T``.

    ``pad_tokens_to``: each head's K tokens are zero-padded to ``Kp``, the next multiple of it (tensor-core tiles
    of 16 in the CUDA kernels); the padded rows and columns are zero."""
    Bi, H, K, d = v.shape
    vp = projected_values(v, w_out)  # [Bi, HK, D]
    Kp = -(-K // pad_tokens_to) * pad_tokens_to
    if Kp != K:
        vp = F.pad(vp.view(Bi, H, K, -1), (0, 0, 0, Kp - K)).reshape(Bi, H * Kp, -1)
    return torch.bmm(vp, vp.transpose(1, 2))


def gram_factor(w_out: torch.Tensor) -> torch.Tensor:
    """``M = W_out W_out^T`` ``[D, D]``: ``G_i[(h,k), (g,m)] = V_i[h,k] M[h-block, g-block] V_i[g,m]^T``, which a
    kernel can form per block of images without ever holding ``V'`` (``2(HK)^2 d`` per image instead of
    ``2(HK)^2 D``)."""
    return w_out @ w_out.t()


# ---- the mixer for aligned pairs, and losses from logits ---------------------------------------------------


def mix_aligned(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, w_out: torch.Tensor, tau: float) -> torch.Tensor:
    """Image i mixed by text i (no all-pairs work): ``k, v [B, H, K, d]``, ``q [B, H, d]`` -> ``z [B, D]``, in the
    inputs' dtype: ``z_i = concat_h(sum_k softmax_k(<K_i[h,k], Q_i[h]> / tau) V_i[h,k]) @ W_out``."""
    B, H, K, d = k.shape
    attn = torch.softmax(torch.einsum("bhkc,bhc->bhk", k, q) / tau, dim=-1)  # [B, H, K]
    mixed = torch.einsum("bhk,bhkc->bhc", attn, v).reshape(B, H * d)  # [B, D]
    return mixed @ w_out


def positives(Bi: int, Bt: int, pos_offset: int | None) -> range:
    """The images whose positive text ``i + pos_offset`` exists in a block of ``Bt`` texts (SigLIP labels are +1
    there, -1 everywhere else); ``pos_offset=None``: none (a block of texts gathered from another rank)."""
    if pos_offset is None:
        return range(0)
    return range(max(0, -pos_offset), max(0, min(Bi, Bt - pos_offset)))


def sigmoid_labels(Bi: int, Bt: int, pos_offset: int | None, device) -> torch.Tensor:
    """``[Bi, Bt]`` float32 labels: +1 at ``(i, i + pos_offset)`` for the :func:`positives`, -1 elsewhere."""
    labels = -torch.ones(Bi, Bt, dtype=torch.float32, device=device)
    rows = positives(Bi, Bt, pos_offset)
    if len(rows):
        idx = torch.arange(rows.start, rows.stop, device=device)
        labels[idx, idx + pos_offset] = 1.0
    return labels


def sigmoid_loss_from_logits(logits: torch.Tensor, pos_offset: int | None) -> torch.Tensor:
    """SigLIP: ``-(1/Bi) * sum_ij log sigmoid(l_ij * logit_ij)`` over ``logits [Bi, Bt]``; 0 for an empty batch."""
    Bi, Bt = logits.shape
    if Bi == 0 or Bt == 0:
        return logits.sum() * 0.0
    labels = sigmoid_labels(Bi, Bt, pos_offset, logits.device)
    return -F.logsigmoid(labels * logits).sum() / Bi


def softmax_loss_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """CLIP: the mean of the image->text and text->image cross-entropies of ``logits [B, B]`` with diagonal
    positives; 0 for an empty batch."""
    B = logits.shape[0]
    if B == 0:
        return logits.sum() * 0.0
    target = torch.arange(B, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
