"""Backward kernel: recompute each (image, text block) tile, then apply the form-3 gradients of docs/design.md
section 7. Per pair, with ``g = dLoss/dlogit``, ``n = sqrt(max(n2, eps^2))``:

    dt += g*cos;  db += g;  ddot = g*t/n;  dn2 = -g*t*dot / (2 n^3)   (0 where the norm is clamped)
    da[h,k]  = ddot * c[h,k] + 2 * dn2 * (G_i a)[h,k]
    ds[h,k]  = a[h,k] * (da[h,k] - sum_k' a[h,k'] da[h,k'])            # softmax backward, per head
    dK_i[h] += ds^T Q[h] / tau     dV_i[h] += (ddot a)^T U[h]        dG_i += A^T diag(dn2) A   (image side)
    dQ[h]   += ds K_i[h] / tau     dU[h]   += (ddot a) V_i[h]                                  (text side)

``g`` per op: ``OP_LOGITS`` reads the upstream ``[Bi, Bt]`` gradient; ``OP_SIGMOID_LOSS`` is the all-negative
SigLIP sum's ``sigmoid(x) * gout``; ``OP_SOFTMAX_LOSS`` the log-sum-exp part of InfoNCE,
``gout * (softmax_row + softmax_col)`` (``gout`` already holds the 1/2B).

Image-side sums run over texts, text-side sums over images, so the kernel runs one of three passes (``PASS``):

- ``"atomic"`` (default): image-stationary, an image possibly split over several programs; every gradient is
  added with fp32 atomics (not bitwise repeatable on a GPU).
- ``"image"`` (deterministic mode, first launch): one program per image updates dK, dV, dG by ordered
  read-modify-write, in text order; no text-side gradients.
- ``"text"`` (deterministic mode, second launch): text-stationary, the program owning a text block walks every
  image in order and is the only one writing dQ, dU of those texts (a second recomputation of every tile).

Helper conventions (keyword arguments, the ``shape`` / ``tiles`` / ``precision`` tuples, ``pairs``) are those of
:mod:`.kernels`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (
    EPS2,
    OP_LOGITS,
    OP_SIGMOID_LOSS,
    pair_dot,
    tile_coordinates,
    tile_dot,
    tile_forward,
)


@triton.jit
def _accumulate(ptr, val, mask, ATOMIC: tl.constexpr):
    """``*ptr += val`` into a float64 gradient: every gradient is a long sum (over texts, or over images), so each
    tile's float32 partial joins it in float64 and the error does not grow with the batch."""
    val = val.to(tl.float64)
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask)
    else:
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def _token_grads(
    pairs,
    grads,
    b_ds,
    b_w,
    i,
    h,
    t0,
    k0,
    Bt,
    shape: tl.constexpr,
    tiles: tl.constexpr,
    PREC: tl.constexpr,
    PASS: tl.constexpr,
):
    """Scatter one [BT, BK] block of ``ds`` (already / tau) and ``w = ddot * a`` into dK, dV (image i) and / or
    dQ, dU (texts t0..), as ``PASS`` says, looping over d in chunks of BD. ``grads = (dq, dk, du, dv)``, laid out
    like ``pairs``; the ones ``PASS`` does not write are None."""
    q_ptr, k_ptr, u_ptr, v_ptr = pairs
    dq_ptr, dk_ptr, du_ptr, dv_ptr = grads
    H, K, d = shape
    BT, BK, BD, BG = tiles
    ATOMIC: tl.constexpr = PASS == "atomic"
    o_t = t0 + tl.arange(0, BT)
    o_k = k0 + tl.arange(0, BK)
    m_t = o_t < Bt
    m_k = o_k < K
    img_off = (i.to(tl.int64) * H + h) * K * d  # image i, head h: [K, d]
    if PREC == "lowp":
        b_ds = b_ds.to(q_ptr.dtype.element_ty)
        b_w = b_w.to(q_ptr.dtype.element_ty)
    for c0 in range(0, d, BD):
        o_c = c0 + tl.arange(0, BD)
        m_c = o_c < d
        m_tc = m_t[:, None] & m_c[None, :]
        m_kc = m_k[:, None] & m_c[None, :]
        o_tc = (o_t[:, None] * H + h) * d + o_c[None, :]  # [BT, BD]
        o_kc = img_off + o_k[:, None] * d + o_c[None, :]  # [BK, BD]
        if PASS != "text":
            b_q = tl.load(q_ptr + o_tc, mask=m_tc, other=0.0)  # [BT, BD]
            b_u = tl.load(u_ptr + o_tc, mask=m_tc, other=0.0)
            b_dk = tile_dot(a=tl.trans(b_ds), b=b_q, PREC=PREC)  # [BK, BD]
            b_dv = tile_dot(a=tl.trans(b_w), b=b_u, PREC=PREC)
            _accumulate(ptr=dk_ptr + o_kc, val=b_dk, mask=m_kc, ATOMIC=ATOMIC)
            _accumulate(ptr=dv_ptr + o_kc, val=b_dv, mask=m_kc, ATOMIC=ATOMIC)
        if PASS != "image":
            b_k = tl.load(k_ptr + o_kc, mask=m_kc, other=0.0)  # [BK, BD]
            b_v = tl.load(v_ptr + o_kc, mask=m_kc, other=0.0)
            b_dq = tile_dot(a=b_ds, b=b_k, PREC=PREC)  # [BT, BD]
            b_du = tile_dot(a=b_w, b=b_v, PREC=PREC)
            _accumulate(ptr=dq_ptr + o_tc, val=b_dq, mask=m_tc, ATOMIC=ATOMIC)
            _accumulate(ptr=du_ptr + o_tc, val=b_du, mask=m_tc, ATOMIC=ATOMIC)


@triton.jit
def _head_grads(
    pairs,
    grads,
    sa,
    sp,
    ddot,
    dn2,
    i,
    h,
    t0,
    Bt,
    inv_tau,
    shape: tl.constexpr,
    tiles: tl.constexpr,
    PREC: tl.constexpr,
    PASS: tl.constexpr,
):
    """Gradients of head ``h`` for one tile, from the weights ``a`` (scratch ``sa``), ``P = G a`` (``sp``) and the
    per-text cotangents ``ddot``, ``dn2`` ([BT] each)."""
    H, K, d = shape
    BT, BK, BD, BG = tiles
    HK: tl.constexpr = H * K
    q_ptr, k_ptr, u_ptr, v_ptr = pairs
    o_r = tl.arange(0, BT)
    # the softmax backward needs sum_k a * da over all K first (one extra pass over K tiles when K > BK)
    r = tl.zeros([BT], dtype=tl.float32)
    if K > BK:
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            b_a = tl.load(sa + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_p = tl.load(sp + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_c = pair_dot(
                txt_ptr=u_ptr, img_ptr=v_ptr, i=i, h=h, t0=t0, k0=k0, Bt=Bt, shape=shape, tiles=tiles, PREC=PREC
            )
            r += tl.sum(b_a * (ddot[:, None] * b_c + 2.0 * dn2[:, None] * b_p), 1)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(sa + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)  # [BT, BK]
        b_p = tl.load(sp + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)  # (G a)
        b_c = pair_dot(txt_ptr=u_ptr, img_ptr=v_ptr, i=i, h=h, t0=t0, k0=k0, Bt=Bt, shape=shape, tiles=tiles, PREC=PREC)
        b_da = ddot[:, None] * b_c + 2.0 * dn2[:, None] * b_p  # [BT, BK]
        if K <= BK:
            r = tl.sum(b_a * b_da, 1)
        b_ds = b_a * (b_da - r[:, None]) * inv_tau
        b_w = b_a * ddot[:, None]
        _token_grads(
            pairs=pairs,
            grads=grads,
            b_ds=b_ds,
            b_w=b_w,
            i=i,
            h=h,
            t0=t0,
            k0=k0,
            Bt=Bt,
            shape=shape,
            tiles=tiles,
            PREC=PREC,
            PASS=PASS,
        )
        if PASS != "atomic":
            tl.debug_barrier()  # read-modify-write of the same rows by the next K tile / head


@triton.jit
def _gram_grad(dgram_ptr, sa, dn2, i, HK: tl.constexpr, tiles: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr):
    """``dG_i += A^T diag(dn2) A`` over this text block, fp32 operands (TF32 products for low-precision inputs:
    ``dn2 * a`` spans a wide range that bf16/fp16 would flush or overflow)."""
    BT, BK, BD, BG = tiles
    o_r = tl.arange(0, BT)
    dg_base = dgram_ptr + i.to(tl.int64) * HK * HK
    for r0 in range(0, HK, BG):
        o_j = r0 + tl.arange(0, BG)
        m_j = o_j < HK
        b_ar = tl.load(sa + o_r[:, None] * HK + o_j[None, :], mask=m_j[None, :], other=0.0) * dn2[:, None]
        for c0 in range(0, HK, BG):
            o_c = c0 + tl.arange(0, BG)
            m_c = o_c < HK
            b_ac = tl.load(sa + o_r[:, None] * HK + o_c[None, :], mask=m_c[None, :], other=0.0)  # [BT, BG]
            b_dg = tl.dot(tl.trans(b_ar), b_ac, input_precision=PREC)  # [BG, BG]
            p_dg = dg_base + o_j[:, None] * HK + o_c[None, :]
            _accumulate(ptr=p_dg, val=b_dg, mask=m_j[:, None] & m_c[None, :], ATOMIC=ATOMIC)


@triton.jit
def _pair_grad_coefs(
    dot, n2, i, o_t, m_t, Bt, t_mul, b_add, gout_ptr, g_scale, lse_row_ptr, lse_col_ptr, OP: tl.constexpr
):
    """(g, cos, ddot, dn2) per text of the tile, g = dLoss/dlogit (0 for texts past Bt). ``g_scale``: the losses'
    0-dim cotangent (``OP_LOGITS`` reads a [Bi, Bt] one from ``gout_ptr`` instead)."""
    n = tl.sqrt(tl.maximum(n2, EPS2))
    cos = dot / n
    x = t_mul * cos + b_add
    if OP == OP_LOGITS:
        g = tl.load(gout_ptr + i.to(tl.int64) * Bt + o_t, mask=m_t, other=0.0)
    elif OP == OP_SIGMOID_LOSS:
        g = g_scale * tl.sigmoid(x)
    else:
        lse_col = tl.load(lse_col_ptr + o_t, mask=m_t, other=0.0)
        g = g_scale * (tl.exp(x - tl.load(lse_row_ptr + i)) + tl.exp(x - lse_col))
    g = tl.where(m_t, g, 0.0)
    dcos = g * t_mul
    ddot = dcos / n
    dn2 = tl.where(n2 > EPS2, -dcos * dot / (2.0 * n * n * n), 0.0)
    return g, cos, ddot, dn2


@triton.jit(do_not_specialize=["Bi", "Bt", "n_split"])
def backward_kernel(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    gram_ptr,
    t_ptr,
    b_ptr,
    gout_ptr,
    lse_row_ptr,
    lse_col_ptr,
    dk_ptr,
    dv_ptr,
    dq_ptr,
    du_ptr,
    dgram_ptr,
    dtb_ptr,
    scratch_ptr,
    Bi,
    Bt,
    scale2,
    inv_tau,
    n_split,
    OP: tl.constexpr,
    PASS: tl.constexpr,
    H: tl.constexpr,
    K: tl.constexpr,
    d: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    GRAM_PREC: tl.constexpr,
    DGRAM_PREC: tl.constexpr,
):
    """Persistent backward (see the module docstring for ``PASS``). ``gout``: the upstream ``[Bi, Bt]`` gradient
    (``OP_LOGITS``) or the loss's scaled 0-dim cotangent; ``lse_row [Bi]``, ``lse_col [Bt]``: the softmax loss's
    log-sum-exps (None otherwise). Gradients are float64 buffers (see :func:`_accumulate`). Image-stationary passes
    also write the float64 partial sums of dt, db per work item -> ``dtb[w, 0:2]``. Pointers a pass does not write
    are None (``"image"``: dq, du; ``"text"``: dk, dv, dgram, dtb).
    """
    TEXT_STATIONARY: tl.constexpr = PASS == "text"
    shape: tl.constexpr = (H, K, d)
    tiles: tl.constexpr = (BT, BK, BD, BG)
    precision: tl.constexpr = (DOT_PREC, GRAM_PREC)
    pid = tl.program_id(0)
    sa = scratch_ptr + pid.to(tl.int64) * 2 * BT * H * K  # softmax weights a, [BT, HK]
    sp = sa + BT * H * K  # P = G a, [BT, HK]
    t_mul = tl.load(t_ptr)
    b_add = tl.load(b_ptr)
    g_scale = 0.0 if OP == OP_LOGITS else tl.load(gout_ptr)  # the losses' cotangent
    pairs = (q_ptr, k_ptr, u_ptr, v_ptr)
    grads = (dq_ptr, dk_ptr, du_ptr, dv_ptr)
    n_text_blocks = tl.cdiv(Bt, BT)
    n_outer = n_text_blocks if TEXT_STATIONARY else Bi
    n_inner = Bi if TEXT_STATIONARY else n_text_blocks
    for w in range(pid, n_outer * n_split, tl.num_programs(0)):
        outer = w // n_split + 0 * pid  # a tensor under the interpreter too (its loop counters are Python ints)
        # dt, db: each tile's float32 sum (a tree) joins a float64 total; a [1] tensor, as [BT] float64 lanes cost
        # registers that the atomic pass spills without
        dt_acc = tl.zeros([1], dtype=tl.float64)
        db_acc = tl.zeros([1], dtype=tl.float64)
        for inner in range(w % n_split, n_inner, n_split):
            i, t0 = tile_coordinates(outer=outer, inner=inner, pid=pid, TEXT_STATIONARY=TEXT_STATIONARY, BT=BT)
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < Bt
            dot, n2 = tile_forward(
                pairs=pairs,
                gram_ptr=gram_ptr,
                sa=sa,
                sp=sp,
                i=i,
                t0=t0,
                Bt=Bt,
                scale2=scale2,
                shape=shape,
                tiles=tiles,
                precision=precision,
            )
            g, cos, ddot, dn2 = _pair_grad_coefs(
                dot=dot,
                n2=n2,
                i=i,
                o_t=o_t,
                m_t=m_t,
                Bt=Bt,
                t_mul=t_mul,
                b_add=b_add,
                gout_ptr=gout_ptr,
                g_scale=g_scale,
                lse_row_ptr=lse_row_ptr,
                lse_col_ptr=lse_col_ptr,
                OP=OP,
            )
            dt_acc += tl.sum(g * cos, 0).to(tl.float64)
            db_acc += tl.sum(g, 0).to(tl.float64)
            tl.debug_barrier()  # P = G a is in sp
            for h in range(H):
                _head_grads(
                    pairs=pairs,
                    grads=grads,
                    sa=sa,
                    sp=sp,
                    ddot=ddot,
                    dn2=dn2,
                    i=i,
                    h=h,
                    t0=t0,
                    Bt=Bt,
                    inv_tau=inv_tau,
                    shape=shape,
                    tiles=tiles,
                    PREC=DOT_PREC,
                    PASS=PASS,
                )
            if not TEXT_STATIONARY:
                _gram_grad(
                    dgram_ptr=dgram_ptr,
                    sa=sa,
                    dn2=dn2,
                    i=i,
                    HK=H * K,
                    tiles=tiles,
                    ATOMIC=PASS == "atomic",
                    PREC=DGRAM_PREC,
                )
        if not TEXT_STATIONARY:
            tl.store(dtb_ptr + 2 * w + tl.arange(0, 1), dt_acc)
            tl.store(dtb_ptr + 2 * w + 1 + tl.arange(0, 1), db_acc)
