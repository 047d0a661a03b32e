"""Pooled SigLIP and CLIP losses that never hold the ``[Bi, Bt]`` logits: the dedicated path of the open_clip
drop-ins (:mod:`llip_kernels.open_clip`).

``img: [Bi, D]``, ``txt: [Bt, D]`` are L2-normalised (autograd sees that step), then scored ``block`` image rows at
a time: forward keeps the loss (SigLIP) or the per-row and per-column log-sum-exps (CLIP, the columns merged
block by block); backward recomputes each block's logits and turns them into the block's gradient, so memory is
``O(block * Bt)`` instead of ``O(Bi * Bt)``. The price is one extra ``[block, D] x [D, Bt]`` product per block in
backward (8 instead of 6 ``Bi * Bt * D`` FLOPs), paid only where the logits would not fit.

Pooled SigLIP is also Llip with ``K = 1, H = 1, W_out = I`` (the softmax over one token is 1, so every mixed
embedding is the image's own), so the fused Llip kernels could serve it; bench/pooled.py measures that route
against this one (this one is faster on the CPU: it is plain GEMMs, while the Llip kernels carry the mixer's
machinery for a one-token mixture).

Accumulation is float32 (float64 for float64 inputs) and the loss is returned in that dtype, as
:mod:`llip_kernels.baselines` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import autocast_off, check_pooled_inputs, check_pos_offset, check_scalar

DEFAULT_BLOCK = 1024  # image rows scored at once: [1024, Bt] float32 is 128 MB at Bt = 32,768


def fused_sigmoid_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    pos_offset: int | None = 0,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """:func:`llip_kernels.sigmoid_loss` (same value and gradients, to rounding) in ``O(block * Bt)`` memory."""
    pos_offset = check_pos_offset(pos_offset)
    check_pooled_inputs(img, txt, square=False)
    t = check_scalar("logit_scale", logit_scale, img.device, None)
    b = check_scalar("logit_bias", logit_bias, img.device, None)
    acc = _accumulation_dtype(img, txt)
    with autocast_off(img.device):
        i, x = F.normalize(img.to(acc), dim=-1), F.normalize(txt.to(acc), dim=-1)
        if i.shape[0] == 0 or x.shape[0] == 0:
            return (i.sum() + x.sum()) * 0.0 + (t + b) * 0.0
        return _BlockedSigmoid.apply(i, x, t.to(acc), b.to(acc), pos_offset, check_block(block))


def fused_softmax_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale, *, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """:func:`llip_kernels.softmax_loss` (CLIP, ``Bi == Bt``, diagonal positives) in ``O(block * B)`` memory."""
    check_pooled_inputs(img, txt, square=True)
    t = check_scalar("logit_scale", logit_scale, img.device, None)
    acc = _accumulation_dtype(img, txt)
    with autocast_off(img.device):
        i, x = F.normalize(img.to(acc), dim=-1), F.normalize(txt.to(acc), dim=-1)
        if i.shape[0] == 0:
            return (i.sum() + x.sum()) * 0.0 + t * 0.0
        return _BlockedSoftmax.apply(i, x, t.to(acc), check_block(block))


def _accumulation_dtype(img: torch.Tensor, txt: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32


def check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (image rows scored at once), got {block!r}")
    return block


def _positives(rows: range, Bt: int, pos_offset: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row in block, column)`` of the positive pairs among image rows ``rows``: ``j = i + pos_offset`` where that
    text exists (none for ``pos_offset=None``)."""
    if pos_offset is None:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    i = torch.arange(rows.start, rows.stop, device=device)
    j = i + pos_offset
    inside = (j >= 0) & (j < Bt)
    return (i - rows.start)[inside], j[inside]


class _BlockedSigmoid(torch.autograd.Function):
    """``-(1/Bi) sum_ij log sigmoid(s_ij (t <i_i, x_j> + b))`` over normalised ``i [Bi, D]``, ``x [Bt, D]``.

    Every pair is first scored as a negative, ``-log sigmoid(-z) = softplus(z)`` with gradient ``sigmoid(z)``; the
    few positives are then corrected in place: ``softplus(-z) - softplus(z) = -z`` and ``-sigmoid(-z) =
    sigmoid(z) - 1``. So no ``[block, Bt]`` label matrix is built and each block costs two elementwise passes."""

    @staticmethod
    def forward(ctx, i, x, t, b, pos_offset, block):
        Bi, Bt = i.shape[0], x.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=i.device)  # a long sum: float64 totals
        for s in range(0, Bi, block):
            rows = range(s, min(s + block, Bi))
            logits = t * (i[s : rows.stop] @ x.t()) + b  # [blk, Bt]
            r, c = _positives(rows, Bt, pos_offset, i.device)
            total += F.softplus(logits).sum(dtype=torch.float64) - logits[r, c].sum(dtype=torch.float64)
        ctx.save_for_backward(i, x, t, b)
        ctx.pos_offset, ctx.block = pos_offset, block
        return (total / Bi).to(i.dtype)

    @staticmethod
    def backward(ctx, grad):
        i, x, t, b = ctx.saved_tensors
        Bi, Bt = i.shape[0], x.shape[0]
        di, dx = torch.empty_like(i), torch.zeros_like(x)
        dt = torch.zeros((), dtype=torch.float64, device=i.device)
        db = torch.zeros((), dtype=torch.float64, device=i.device)
        for s in range(0, Bi, ctx.block):
            rows = range(s, min(s + ctx.block, Bi))
            cos = i[s : rows.stop] @ x.t()  # [blk, Bt]
            g = torch.sigmoid(t * cos + b)  # d/dlogit of softplus(logit): every pair as a negative
            r, c = _positives(rows, Bt, ctx.pos_offset, i.device)
            g[r, c] -= 1.0  # the positives: sigmoid(z) - 1 = -sigmoid(-z)
            g *= grad / Bi
            dt += (g * cos).sum(dtype=torch.float64)
            db += g.sum(dtype=torch.float64)
            g *= t  # d/dcos
            di[s : rows.stop] = g @ x
            dx += g.t() @ i[s : rows.stop]
        return di, dx, dt.to(t.dtype), db.to(b.dtype), None, None


class _BlockedSoftmax(torch.autograd.Function):
    """``(1/2B) sum_i [(lse_row_i - l_ii) + (lse_col_i - l_ii)]`` over ``l = t <i, x>`` (normalised ``[B, D]``)."""

    @staticmethod
    def forward(ctx, i, x, t, block):
        B = i.shape[0]
        row_lse = torch.empty(B, dtype=i.dtype, device=i.device)
        col_lse = torch.full((B,), float("-inf"), dtype=i.dtype, device=i.device)
        for s in range(0, B, block):
            e = min(s + block, B)
            logits = t * (i[s:e] @ x.t())  # [blk, B]
            row_lse[s:e] = torch.logsumexp(logits, dim=1)
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
        diag = t * (i * x).sum(dim=1)  # [B] the positives' logits
        loss = row_lse.sum(dtype=torch.float64) + col_lse.sum(dtype=torch.float64) - 2 * diag.sum(dtype=torch.float64)
        ctx.save_for_backward(i, x, t, row_lse, col_lse)
        ctx.block = block
        return (loss / (2 * B)).to(i.dtype)

    @staticmethod
    def backward(ctx, grad):
        i, x, t, row_lse, col_lse = ctx.saved_tensors
        B = i.shape[0]
        scale = grad / (2 * B)
        di, dx = torch.empty_like(i), torch.zeros_like(x)
        dt = torch.zeros((), dtype=torch.float64, device=i.device)
        for s in range(0, B, ctx.block):
            e = min(s + ctx.block, B)
            cos = i[s:e] @ x.t()  # [blk, B]
            logits = t * cos
            # d loss / d logit_ij = (softmax_row_ij + softmax_col_ij - 2 [i == j]) / 2B
            g = torch.exp(logits - row_lse[s:e, None]) + torch.exp(logits - col_lse[None, :])
            g[torch.arange(e - s), torch.arange(s, e)] -= 2.0
            g *= scale
            dt += (g * cos).sum(dtype=torch.float64)
            g *= t  # d/dcos
            di[s:e] = g @ x
            dx += g.t() @ i[s:e]
        return di, dx, dt.to(t.dtype), None
