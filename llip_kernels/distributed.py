"""Contrastive losses over the GLOBAL batch with ``torch.distributed`` (one process per device, e.g. under DDP).

Llip: each rank keeps its own images' keys and values (``k, v: [B, H, K, d]``, K*D numbers per image) and only
the text side (``q, y``: 2D numbers per text) moves, by one all-gather or around a ring, K times less traffic
than moving images (docs/design.md section 3). Every rank then scores its images against every text of the global batch
with the public fused op; the positives are the diagonal of its own block.

Normalisation (exact under DDP). Let ``N`` be the global number of images (= texts), ``W`` the world size and
``l_ij`` the per-pair SigLIP term ``-log sigmoid(label * logit)``. Each rank returns

    L_r = (W / N) * sum_{i in rank r's images, j in all N texts} l_ij

which, with equal local batches ``B = N / W``, is exactly ``llip_sigmoid_loss`` of the local images against the
gathered texts (normalised by the local ``Bi = B``, the SigLIP convention). So ``mean_r L_r`` is the
single-process loss of the concatenated batch, and ``sum_r L_r = W * L``. The gradients of the gathered texts
are SUMMED back to the rank that owns them, so each rank's backward produces ``d(sum_r L_r) / d(its
activations)`` = ``W * dL/d(its activations)``; DDP's averaging over ranks (the 1/W) then yields exactly the
single-process parameter gradients. Unequal local batches are supported (the W/N factor keeps this exact).

``softmax_loss_distributed`` (CLIP) gathers both sides and uses open_clip's "local loss": each rank's rows of
the image->text and text->image cross-entropies, normalised the same way. ``llip_softmax_loss_distributed``
does the same with Llip scores, gathering texts and the per-text partial log-sum-exps (never the images).

Without an initialised process group, or with a world size of 1, every function here is exactly the local
public op (``llip_sigmoid_loss(..., pos_offset=0)``, ``llip_softmax_loss``, ``sigmoid_loss``, ``softmax_loss``).

Collectives run on ``group`` (default: the default group); with gloo the tensors may live on the CPU, with
NCCL on the current CUDA device. Every rank must call these functions in the same order (they communicate in
forward and in backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import baselines, functional, pooled
from ._validate import autocast_inputs, check_llip_inputs, check_pooled_inputs

MODES = ("all_gather", "ring")


def llip_sigmoid_loss_distributed(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    y: torch.Tensor,
    w_out: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    tau: float,
    group=None,
    backend: str | None = None,
    mode: str = "all_gather",
) -> torch.Tensor:
    """Llip SigLIP loss of this rank's images against every rank's texts -> ``[]`` float32 (see the module
    docstring for the normalisation that makes DDP exact).

    ``k, v: [B, H, K, d]``, ``q: [B, H, d]``, ``y: [B, D]`` are this rank's images and their captions (image i
    pairs with text i); ``w_out``, ``logit_scale`` (the multiplier t), ``logit_bias`` are replicated parameters.
    ``mode="all_gather"``: one gather of the texts and one fused call over all ``N`` texts (the fastest when the
    ``N`` gathered texts fit, which they do: 2D numbers each). ``mode="ring"``: ``W`` calls, each against one
    rank's block of texts passed around the ring with send/recv, the block's gradient passed back the other way.
    ``backend`` is forwarded to :func:`llip_kernels.llip_sigmoid_loss`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    k, v, q, y, w_out = autocast_inputs(k, v, q, y, w_out)  # one dtype before the texts are packed and sent
    world = _world(group)
    if world is None:
        return functional.llip_sigmoid_loss(
            k, v, q, y, w_out, logit_scale, logit_bias, tau=tau, pos_offset=0, backend=backend
        )
    problem = check_llip_inputs("sigmoid_loss", k, v, q, y, w_out, tau=tau)  # fail here, before communicating
    if problem.Bi != problem.Bt:
        raise ValueError(
            f"each rank must hold as many texts as images (image i pairs with text i), got Bi={problem.Bi}, "
            f"Bt={problem.Bt}"
        )
    W, rank = world
    B, H, d = problem.Bi, problem.H, problem.d
    sizes = _all_sizes(B, k.device, group)
    N = sum(sizes)
    txt = torch.cat([q.reshape(B, H * d), y], dim=1)  # [B, 2D]: one message per exchange

    def loss_against(block: torch.Tensor, pos_offset):
        qb, yb = block[:, : H * d].reshape(-1, H, d), block[:, H * d :]
        return functional.llip_sigmoid_loss(
            k, v, qb, yb, w_out, logit_scale, logit_bias, tau=tau, pos_offset=pos_offset, backend=backend
        )

    if mode == "all_gather":
        loss = loss_against(_AllGather.apply(txt, sizes, group), sum(sizes[:rank]))
    else:
        loss = loss_against(txt, 0)
        block = txt
        for step in range(1, W):  # after `step` shifts this rank holds rank (rank - step) % W's texts
            block = _RingShift.apply(block, sizes[(rank - step) % W], group)
            loss = loss + loss_against(block, None)
    return loss * (B * W / N) if B * W != N else loss


def llip_softmax_loss_distributed(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    y: torch.Tensor,
    w_out: torch.Tensor,
    logit_scale,
    *,
    tau: float,
    group=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Llip InfoNCE (CLIP) loss over the global batch -> ``[]`` float32, open_clip's local-loss style.

    Texts are gathered (2D numbers each) and this rank's ``[B, N]`` logits built with
    :func:`llip_kernels.llip_logits` (its output: B * N, never B * N * K or B * N * D). Image->text rows are
    complete locally; each text's column log-sum-exp over ALL images is merged from every rank's partial
    column log-sum-exps (one all-gather of N numbers, differentiable). Each rank returns
    ``L_r = (W / N) * (sum_local_rows CE + sum_local_columns CE) / 2``, so ``mean_r L_r`` is the single-process
    loss and DDP's gradient averaging is exact, as for the other losses here.
    """
    k, v, q, y, w_out = autocast_inputs(k, v, q, y, w_out)  # one dtype before the texts are packed and sent
    world = _world(group)
    if world is None:
        return functional.llip_softmax_loss(k, v, q, y, w_out, logit_scale, tau=tau, backend=backend)
    problem = check_llip_inputs("softmax_loss", k, v, q, y, w_out, tau=tau)  # also checks Bi == Bt
    W, rank = world
    B, H, d = problem.Bi, problem.H, problem.d
    sizes = _all_sizes(B, k.device, group)
    N, start = sum(sizes), sum(sizes[:rank])
    txt_all = _AllGather.apply(torch.cat([q.reshape(B, H * d), y], dim=1), sizes, group)  # [N, 2D]
    q_all, y_all = txt_all[:, : H * d].reshape(N, H, d), txt_all[:, H * d :]
    lg = functional.llip_logits(k, v, q_all, y_all, w_out, tau=tau, logit_scale=logit_scale, backend=backend)
    target = torch.arange(B, device=k.device) + start
    rows = F.cross_entropy(lg, target, reduction="sum")
    col_parts = _AllGather.apply(torch.logsumexp(lg, dim=0).unsqueeze(0), [1] * W, group)  # [W, N]
    col_lse = torch.logsumexp(col_parts[:, start : start + B], dim=0)  # [B]: this rank's texts, all images
    cols = (col_lse - lg[torch.arange(B, device=k.device), target]).sum()
    return (rows + cols) * (0.5 * W / N)


def sigmoid_loss_distributed(
    img: torch.Tensor, txt: torch.Tensor, logit_scale, logit_bias, *, group=None, block: int | None = None
):
    """Pooled SigLIP over the global batch (the baseline): this rank's ``img: [B, D]`` against every rank's
    ``txt: [B, D]``, texts gathered with summed gradients, normalised as the module docstring says. ``block``:
    score that many image rows at a time (:func:`llip_kernels.pooled.fused_sigmoid_loss`) instead of holding the
    ``[B, N]`` logits."""

    def local(txt_all, pos_offset=0):
        if block is None:
            return baselines.sigmoid_loss(img, txt_all, logit_scale, logit_bias, pos_offset=pos_offset)
        return pooled.fused_sigmoid_loss(img, txt_all, logit_scale, logit_bias, pos_offset=pos_offset, block=block)

    world = _world(group)
    if world is None:
        return local(txt)
    check_pooled_inputs(img, txt, square=True)
    W, rank = world
    sizes = _all_sizes(img.shape[0], img.device, group)
    N = sum(sizes)
    txt_all = _AllGather.apply(txt, sizes, group)
    loss = local(txt_all, pos_offset=sum(sizes[:rank]))
    return loss * (img.shape[0] * W / N) if img.shape[0] * W != N else loss


def softmax_loss_distributed(img: torch.Tensor, txt: torch.Tensor, logit_scale, *, group=None) -> torch.Tensor:
    """Pooled CLIP (InfoNCE) over the global batch, open_clip's local-loss style: this rank's rows of both
    cross-entropies against the gathered other side, ``L_r = (W / N) * (sum_local CE_img + sum_local CE_txt) / 2``,
    so ``mean_r L_r`` is the single-process loss and DDP's gradient averaging is exact."""
    world = _world(group)
    if world is None:
        return baselines.softmax_loss(img, txt, logit_scale)
    check_pooled_inputs(img, txt, square=True)
    W, rank = world
    B, D = img.shape
    sizes = _all_sizes(B, img.device, group)
    N = sum(sizes)
    both = _AllGather.apply(torch.cat([img, txt.to(img.dtype)], dim=1), sizes, group)  # [N, 2D]
    img_all, txt_all = both[:, :D], both[:, D:]
    target = torch.arange(B, device=img.device) + sum(sizes[:rank])
    per_image = baselines.pooled_logits(img, txt_all, logit_scale)  # [B, N]
    per_text = baselines.pooled_logits(txt, img_all, logit_scale)  # [B, N]
    ce = F.cross_entropy(per_image, target, reduction="sum") + F.cross_entropy(per_text, target, reduction="sum")
    return ce * (0.5 * W / N)


# ---- communication ----------------------------------------------------------------------------------------


def _world(group) -> tuple[int, int] | None:
    """``(world size, rank)`` in ``group``, or None when running alone (no process group, or one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    W = dist.get_world_size(group)
    return None if W == 1 else (W, dist.get_rank(group))


def _all_sizes(n: int, device, group) -> list[int]:
    """Every rank's local batch size (one tiny all-gather), so ranks may hold different numbers of pairs."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(s) for s in torch.cat(out).tolist()]


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _AllGather(torch.autograd.Function):
    """``[n_r, C]`` on each rank -> ``[sum_r n_r, C]`` in rank order on every rank. Backward: every rank's
    gradient of the gathered tensor is summed and each rank keeps its own rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        m = max(sizes)
        padded = x.new_zeros(m, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.sizes, ctx.group
        rank, m = dist.get_rank(group), max(sizes)
        start = sum(sizes[:rank])
        if dist.get_backend(group) == "nccl":  # reduce-scatter moves 1/W of what an all-reduce does
            stacked = grad.new_zeros(len(sizes), m, *grad.shape[1:])
            for r, piece in enumerate(grad.split(sizes)):
                stacked[r, : sizes[r]] = piece
            out = grad.new_empty(m, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, stacked.flatten(0, 1), group=group)
            return out[: sizes[rank]], None, None
        total = grad.contiguous().clone()  # gloo has no reduce-scatter: all-reduce, keep our rows
        dist.all_reduce(total, group=group)
        return total[start : start + sizes[rank]], None, None


class _RingShift(torch.autograd.Function):
    """Send ``x`` to the next rank, receive ``[n_in, C]`` from the previous one. Backward: the gradient goes
    the other way (to the previous rank, from the next)."""

    @staticmethod
    def forward(ctx, x, n_in, group):
        ctx.n_out, ctx.group = x.shape[0], group
        return _exchange(x.contiguous(), x.new_empty(n_in, *x.shape[1:]), +1, group)

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(ctx.n_out, *grad.shape[1:])
        return _exchange(grad.contiguous(), back, -1, ctx.group), None, None


def _exchange(send: torch.Tensor, recv: torch.Tensor, direction: int, group) -> torch.Tensor:
    """Send to rank + direction and receive from rank - direction (mod W), both in flight at once."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    ops = [
        dist.P2POp(dist.isend, send, _global_rank(group, (rank + direction) % W), group),
        dist.P2POp(dist.irecv, recv, _global_rank(group, (rank - direction) % W), group),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv
