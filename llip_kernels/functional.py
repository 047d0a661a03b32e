"""The public Llip ops. Each validates its inputs, picks a backend and calls it.

Shapes: ``k, v: [Bi, H, K, d]`` (per-image keys and values of the K mixture tokens), ``q: [Bt, H, d]``
(one query per head per text), ``y: [Bt, D]`` (text embeddings), ``w_out: [D, D]`` with ``D = H * d``.
The five share one dtype (float32, bfloat16 or float16) and device. Accumulation is float32 and logits and
losses are float32 (float64 inputs, which the reference and torch backends accept, give float64 results).
``logit_scale`` is the multiplier ``t`` itself (already exponentiated), ``logit_bias`` the additive ``b``;
each may be a number or a 0-dim tensor (gradients flow to tensors).

Empty batches: logits come back with the empty shape; losses are 0.0 (connected to the inputs, zero grads).

Under ``torch.autocast`` the ops act as matmul-class ops: their floating inputs are cast to the autocast dtype
(float64 excepted) and the backend runs with autocast off, following its own precision policy (docs/design.md
section 3). ``logit_scale`` is tested up to 1e3 (the model clamps it at 100).
"""

from __future__ import annotations

import torch

from . import dispatch
from ._validate import autocast_inputs, autocast_off, check_llip_inputs, check_op, check_pos_offset, check_scalar
from .algebra import Op


def llip_logits(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    y: torch.Tensor,
    w_out: torch.Tensor,
    *,
    tau: float,
    logit_scale=None,
    logit_bias=None,
    backend: str | None = None,
) -> torch.Tensor:
    """All-pairs Llip logits ``logit_scale * cos(z[i, j], y_j) + logit_bias`` -> ``[Bi, Bt]`` float32.

    ``z[i, j] = concat_h(sum_k softmax_k(<k[i,h,k], q[j,h]> / tau) * v[i,h,k]) @ w_out`` (docs/design.md section 1).
    ``logit_scale=None`` means 1 and ``logit_bias=None`` means 0 (so the result is the cosine itself).
    """
    k, v, q, y, w_out = autocast_inputs(k, v, q, y, w_out)
    problem = check_llip_inputs(Op.LOGITS, k, v, q, y, w_out, tau=tau)
    t = check_scalar("logit_scale", logit_scale, k.device, 1.0)
    b = check_scalar("logit_bias", logit_bias, k.device, 0.0)
    if problem.Bi == 0 or problem.Bt == 0:
        return _empty_connected((problem.Bi, problem.Bt), k, v, q, y, w_out, t, b)
    impl = dispatch.select_backend(problem, backend)
    with autocast_off(k.device):
        return impl.logits(k, v, q, y, w_out, t, b, tau=problem.tau)


def llip_sigmoid_loss(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    y: torch.Tensor,
    w_out: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    tau: float,
    pos_offset: int | None = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """SigLIP loss over every (image, text) pair, scored by the Llip mixer -> ``[]`` float32.

    ``loss = -(1/Bi) * sum_ij log sigmoid(l_ij * logit_ij)`` with ``l_ij = +1`` when ``j == i + pos_offset``
    (if that text exists) and -1 otherwise. ``pos_offset=None`` makes every pair negative, as for a block of
    texts gathered from another rank. Never builds a ``[Bi, Bt]`` tensor on the fused backends.
    """
    k, v, q, y, w_out = autocast_inputs(k, v, q, y, w_out)
    problem = check_llip_inputs(Op.SIGMOID_LOSS, k, v, q, y, w_out, tau=tau)
    pos_offset = check_pos_offset(pos_offset)
    t = check_scalar("logit_scale", logit_scale, k.device, None)
    b = check_scalar("logit_bias", logit_bias, k.device, None)
    if problem.Bi == 0 or problem.Bt == 0:
        return _empty_connected((), k, v, q, y, w_out, t, b)
    impl = dispatch.select_backend(problem, backend)
    with autocast_off(k.device):
        return impl.sigmoid_loss(k, v, q, y, w_out, t, b, tau=problem.tau, pos_offset=pos_offset)


def llip_softmax_loss(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    y: torch.Tensor,
    w_out: torch.Tensor,
    logit_scale,
    *,
    tau: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss with Llip scores -> ``[]`` float32. Needs ``Bi == Bt``; pair ``(i, i)``
    is the positive. ``loss = (CE(logits, diag) + CE(logits^T, diag)) / 2`` with ``logits = logit_scale * cos``."""
    k, v, q, y, w_out = autocast_inputs(k, v, q, y, w_out)
    problem = check_llip_inputs(Op.SOFTMAX_LOSS, k, v, q, y, w_out, tau=tau)
    t = check_scalar("logit_scale", logit_scale, k.device, None)
    if problem.Bi == 0:
        return _empty_connected((), k, v, q, y, w_out, t)
    impl = dispatch.select_backend(problem, backend)
    with autocast_off(k.device):
        return impl.softmax_loss(k, v, q, y, w_out, t, tau=problem.tau)


def llip_mix(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    w_out: torch.Tensor,
    *,
    tau: float,
    all_pairs: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The text-conditioned image embeddings ``z`` themselves, in the inputs' dtype.

    ``all_pairs=False``: image i mixed by text i (needs ``Bi == Bt``) -> ``[B, D]``.
    ``all_pairs=True``: every pair -> ``[Bi, Bt, D]``; this is the tensor the fused ops avoid, so use it for
    analysis and small sets only.
    """
    k, v, q, w_out = autocast_inputs(k, v, q, w_out)
    problem = check_llip_inputs(Op.MIX, k, v, q, None, w_out, tau=tau)
    if not isinstance(all_pairs, bool):
        raise TypeError(f"all_pairs must be a bool, got {type(all_pairs).__name__}")
    if not all_pairs and problem.Bi != problem.Bt:
        raise ValueError(
            f"llip_mix(all_pairs=False) pairs image i with text i and needs Bi == Bt, got Bi={problem.Bi}, "
            f"Bt={problem.Bt}; pass all_pairs=True for every pair"
        )
    shape = (problem.Bi, problem.Bt, problem.D) if all_pairs else (problem.Bi, problem.D)
    if problem.Bi == 0 or problem.Bt == 0:
        return _empty_connected(shape, k, v, q, w_out).to(k.dtype)
    impl = dispatch.select_backend(problem, backend)
    with autocast_off(k.device):
        return impl.mix(k, v, q, w_out, tau=problem.tau, all_pairs=all_pairs)


def _empty_connected(shape, *inputs: torch.Tensor) -> torch.Tensor:
    """A float32 zero tensor of ``shape`` that depends on ``inputs`` (so ``.backward()`` works and gives zero
    gradients) without touching their (possibly empty) data."""
    out = torch.zeros(shape, dtype=torch.float32, device=inputs[0].device)
    for x in inputs:
        if x.requires_grad:
            out = out + x.sum().float() * 0.0
    return out


def backend_reasons(
    k=None, v=None, q=None, y=None, w_out=None, *, tau: float = 1.0, op: str = "sigmoid_loss"
) -> dict[str, list[str]]:
    """Every backend and why it cannot run the given call (an empty list: it can).

    Without tensors, reports only what is missing in this environment (e.g. Triton not installed),
    judged on a tiny float32 CPU problem. ``op`` is one of ``logits``, ``sigmoid_loss``, ``softmax_loss``, ``mix``.
    """
    op = check_op(op)
    if k is None:
        return {name: dispatch.environment_reasons(name) for name in dispatch.BACKEND_MODULES}
    problem = check_llip_inputs(op, k, v, q, y, w_out, tau=tau)
    return {name: dispatch.reasons_for(name, problem) for name in dispatch.BACKEND_MODULES}
