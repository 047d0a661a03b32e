"""Backward kernels: recompute each (image, text block) tile, then apply SPEC section 7's form-3 gradients.

Per pair, with ``g = dLoss/dlogit``, ``n = sqrt(max(n2, eps^2))``:

    dt += g*cos;  db += g;  ddot = g*t/n;  dn2 = -g*t*dot / (2 n^3)   (0 where the norm is clamped)
    da[h,k]  = ddot * c[h,k] + 2 * dn2 * (G_i a)[h,k]
    ds[h,k]  = a[h,k] * (da[h,k] - sum_k' a[h,k'] da[h,k'])            # softmax backward, per head
    dK_i[h] += ds^T Q[h] / tau     dV_i[h] += (ddot a)^T U[h]        dG_i += A^T diag(dn2) A   (image side)
    dQ[h]   += ds K_i[h] / tau     dU[h]   += (ddot a) V_i[h]                                  (text side)

``g`` per MODE: 0 logits (read from the upstream [Bi, Bt] gradient), 1 the all-negative SigLIP sum
(``sigmoid(x) * gout``), 2 the softmax loss's log-sum-exp part (``gout/2B * (softmax_row + softmax_col)``).

Image-side sums run over texts, text-side sums over images. Default (one pass): the image-stationary kernel
adds everything with fp32 atomics (``IMG_ATOMIC``, ``DO_TXT``; an image may be split over several programs).
Deterministic mode: one program per image updates dK, dV, dG by ordered read-modify-write, then the
text-stationary kernel, which owns a text block and walks the images in order, computes dQ, dU (a second
full recomputation of every tile, about 1.6x the backward's FLOPs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kernels import EPS2, _dot, _pair_dot, _tile_forward


@triton.jit
def _accumulate(ptr, val, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask)
    else:
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def _token_grads(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    dk_ptr,
    dv_ptr,
    dq_ptr,
    du_ptr,
    b_ds,
    b_w,
    i,
    h,
    t0,
    k0,
    Bt,
    H: tl.constexpr,
    K: tl.constexpr,
    d: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    LOWP: tl.constexpr,
    PREC: tl.constexpr,
    DO_IMG: tl.constexpr,
    DO_TXT: tl.constexpr,
    IMG_ATOMIC: tl.constexpr,
    TXT_ATOMIC: tl.constexpr,
):
    """Scatter one [BT, BK] block of ``ds`` (already / tau) and ``w = ddot * a`` into dK, dV (image i) and
    dQ, dU (texts t0..), looping over d in chunks of BD."""
    o_t = t0 + tl.arange(0, BT)
    o_k = k0 + tl.arange(0, BK)
    m_t = o_t < Bt
    m_k = o_k < K
    img_off = (i.to(tl.int64) * H + h) * K * d
    if LOWP:
        b_ds = b_ds.to(q_ptr.dtype.element_ty)
        b_w = b_w.to(q_ptr.dtype.element_ty)
    for c0 in range(0, d, BD):
        o_c = c0 + tl.arange(0, BD)
        m_c = o_c < d
        m_tc = m_t[:, None] & m_c[None, :]
        m_kc = m_k[:, None] & m_c[None, :]
        o_tc = (o_t[:, None] * H + h) * d + o_c[None, :]  # [BT, BD]
        o_kc = img_off + o_k[:, None] * d + o_c[None, :]  # [BK, BD]
        if DO_IMG:
            b_q = tl.load(q_ptr + o_tc, mask=m_tc, other=0.0)  # [BT, BD]
            b_u = tl.load(u_ptr + o_tc, mask=m_tc, other=0.0)
            _accumulate(dk_ptr + o_kc, _dot(tl.trans(b_ds), b_q, LOWP, PREC), m_kc, IMG_ATOMIC)  # [BK, BD]
            _accumulate(dv_ptr + o_kc, _dot(tl.trans(b_w), b_u, LOWP, PREC), m_kc, IMG_ATOMIC)
        if DO_TXT:
            b_k = tl.load(k_ptr + o_kc, mask=m_kc, other=0.0)  # [BK, BD]
            b_v = tl.load(v_ptr + o_kc, mask=m_kc, other=0.0)
            _accumulate(dq_ptr + o_tc, _dot(b_ds, b_k, LOWP, PREC), m_tc, TXT_ATOMIC)  # [BT, BD]
            _accumulate(du_ptr + o_tc, _dot(b_w, b_v, LOWP, PREC), m_tc, TXT_ATOMIC)


@triton.jit
def _head_grads(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    dk_ptr,
    dv_ptr,
    dq_ptr,
    du_ptr,
    sa,
    sp,
    ddot,
    dn2,
    i,
    h,
    t0,
    Bt,
    inv_tau,
    H: tl.constexpr,
    K: tl.constexpr,
    d: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    LOWP: tl.constexpr,
    PREC: tl.constexpr,
    DO_IMG: tl.constexpr,
    DO_TXT: tl.constexpr,
    IMG_ATOMIC: tl.constexpr,
    TXT_ATOMIC: tl.constexpr,
):
    HK: tl.constexpr = H * K
    o_r = tl.arange(0, BT)
    # the softmax backward needs sum_k a * da over all K first (one extra pass over K tiles when K > BK)
    r = tl.zeros([BT], dtype=tl.float32)
    if K > BK:
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            b_a = tl.load(sa + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_p = tl.load(sp + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_c = _pair_dot(u_ptr, v_ptr, i, h, t0, k0, Bt, H, K, d, BT, BK, BD, LOWP, PREC)
            r += tl.sum(b_a * (ddot[:, None] * b_c + 2.0 * dn2[:, None] * b_p), 1)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(sa + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)  # [BT, BK]
        b_p = tl.load(sp + o_r[:, None] * HK + h * K + o_k[None, :], mask=m_k[None, :], other=0.0)  # (G a)
        b_c = _pair_dot(u_ptr, v_ptr, i, h, t0, k0, Bt, H, K, d, BT, BK, BD, LOWP, PREC)
        b_da = ddot[:, None] * b_c + 2.0 * dn2[:, None] * b_p  # [BT, BK]
        if K <= BK:
            r = tl.sum(b_a * b_da, 1)
        b_ds = b_a * (b_da - r[:, None]) * inv_tau
        b_w = b_a * ddot[:, None]
        _token_grads(
            q_ptr,
            k_ptr,
            u_ptr,
            v_ptr,
            dk_ptr,
            dv_ptr,
            dq_ptr,
            du_ptr,
            b_ds,
            b_w,
            i,
            h,
            t0,
            k0,
            Bt,
            H,
            K,
            d,
            BT,
            BK,
            BD,
            LOWP,
            PREC,
            DO_IMG,
            DO_TXT,
            IMG_ATOMIC,
            TXT_ATOMIC,
        )
        if not IMG_ATOMIC or not TXT_ATOMIC:
            tl.debug_barrier()  # read-modify-write of the same rows by the next K tile / head


@triton.jit
def _gram_grad(
    dg_ptr,
    sa,
    dn2,
    i,
    HK: tl.constexpr,
    BT: tl.constexpr,
    BG: tl.constexpr,
    ATOMIC: tl.constexpr,
    DG_PREC: tl.constexpr,
):
    """``dG_i += A^T diag(dn2) A`` over this text block, fp32 operands (TF32 products for low-precision inputs:
    ``dn2 * a`` spans a wide range that bf16/fp16 would flush or overflow)."""
    o_r = tl.arange(0, BT)
    dg_base = dg_ptr + i.to(tl.int64) * HK * HK
    for r0 in range(0, HK, BG):
        o_j = r0 + tl.arange(0, BG)
        m_j = o_j < HK
        b_ar = tl.load(sa + o_r[:, None] * HK + o_j[None, :], mask=m_j[None, :], other=0.0) * dn2[:, None]
        for c0 in range(0, HK, BG):
            o_c = c0 + tl.arange(0, BG)
            m_c = o_c < HK
            b_ac = tl.load(sa + o_r[:, None] * HK + o_c[None, :], mask=m_c[None, :], other=0.0)  # [BT, BG]
            b_dg = tl.dot(tl.trans(b_ar), b_ac, input_precision=DG_PREC)  # [BG, BG]
            _accumulate(dg_base + o_j[:, None] * HK + o_c[None, :], b_dg, m_j[:, None] & m_c[None, :], ATOMIC)


@triton.jit
def _pair_grad_coefs(
    dot, n2, i, o_t, m_t, Bt, t_mul, b_add, gout_ptr, gsc, lse_row_ptr, lse_col_ptr, MODE: tl.constexpr
):
    """(g, cos, ddot, dn2) per text of the tile, g = dLoss/dlogit (0 for texts past Bt)."""
    n = tl.sqrt(tl.maximum(n2, EPS2))
    cos = dot / n
    x = t_mul * cos + b_add
    if MODE == 0:
        g = tl.load(gout_ptr + i.to(tl.int64) * Bt + o_t, mask=m_t, other=0.0)
    elif MODE == 1:
        g = gsc / (1.0 + tl.exp(-x))
    else:
        g = gsc * (tl.exp(x - tl.load(lse_row_ptr + i)) + tl.exp(x - tl.load(lse_col_ptr + o_t, mask=m_t, other=0.0)))
    g = tl.where(m_t, g, 0.0)
    dcos = g * t_mul
    ddot = dcos / n
    dn2 = tl.where(n2 > EPS2, -dcos * dot / (2.0 * n * n * n), 0.0)
    return g, cos, ddot, dn2


@triton.jit(do_not_specialize=["Bi", "Bt", "n_split"])
def _bwd_image_kernel(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    g_ptr,
    t_ptr,
    b_ptr,
    gout_ptr,
    gsc_ptr,
    lse_row_ptr,
    lse_col_ptr,
    dk_ptr,
    dv_ptr,
    dq_ptr,
    du_ptr,
    dg_ptr,
    dtb_ptr,
    scratch_ptr,
    Bi,
    Bt,
    scale2,
    inv_tau,
    n_split,
    MODE: tl.constexpr,
    H: tl.constexpr,
    K: tl.constexpr,
    d: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    LOWP: tl.constexpr,
    PREC: tl.constexpr,
    G_LOWP: tl.constexpr,
    G_PREC: tl.constexpr,
    DG_PREC: tl.constexpr,
    DO_TXT: tl.constexpr,
    IMG_ATOMIC: tl.constexpr,
):
    """Persistent: work item w = (i, s) owns image i for text blocks s, s + n_split, ...: dK, dV, dG (+ dQ, dU
    by atomics when DO_TXT) and partial sums of dt, db -> dtb[w, 0:2]. With n_split == 1 (not IMG_ATOMIC)
    exactly one program touches each image's rows, in text order."""
    pid = tl.program_id(0)
    sa = scratch_ptr + pid.to(tl.int64) * 2 * BT * H * K
    sp = sa + BT * H * K
    t_mul = tl.load(t_ptr)
    b_add = tl.load(b_ptr)
    gsc = tl.load(gsc_ptr)
    for w in range(pid, Bi * n_split, tl.num_programs(0)):
        i = w // n_split + 0 * pid  # a tensor under the interpreter too (its loop counters are Python ints)
        s = w % n_split
        dt_acc = tl.zeros([BT], dtype=tl.float32)
        db_acc = tl.zeros([BT], dtype=tl.float32)
        for tb in range(s, tl.cdiv(Bt, BT), n_split):
            t0 = tb * BT
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < Bt
            dot, n2 = _tile_forward(
                q_ptr,
                k_ptr,
                u_ptr,
                v_ptr,
                g_ptr,
                sa,
                sp,
                i,
                t0,
                Bt,
                scale2,
                True,
                H,
                K,
                d,
                BT,
                BK,
                BD,
                BG,
                LOWP,
                PREC,
                G_LOWP,
                G_PREC,
            )
            g, cos, ddot, dn2 = _pair_grad_coefs(
                dot, n2, i, o_t, m_t, Bt, t_mul, b_add, gout_ptr, gsc, lse_row_ptr, lse_col_ptr, MODE
            )
            dt_acc += g * cos
            db_acc += g
            tl.debug_barrier()  # P = G a is in sp
            for h in range(H):
                _head_grads(
                    q_ptr,
                    k_ptr,
                    u_ptr,
                    v_ptr,
                    dk_ptr,
                    dv_ptr,
                    dq_ptr,
                    du_ptr,
                    sa,
                    sp,
                    ddot,
                    dn2,
                    i,
                    h,
                    t0,
                    Bt,
                    inv_tau,
                    H,
                    K,
                    d,
                    BT,
                    BK,
                    BD,
                    LOWP,
                    PREC,
                    True,
                    DO_TXT,
                    IMG_ATOMIC,
                    True,
                )
            _gram_grad(dg_ptr, sa, dn2, i, H * K, BT, BG, IMG_ATOMIC, DG_PREC)
        tl.store(dtb_ptr + 2 * w, tl.sum(dt_acc, 0))
        tl.store(dtb_ptr + 2 * w + 1, tl.sum(db_acc, 0))


@triton.jit(do_not_specialize=["Bi", "Bt"])
def _bwd_text_kernel(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    g_ptr,
    t_ptr,
    b_ptr,
    gout_ptr,
    gsc_ptr,
    lse_row_ptr,
    lse_col_ptr,
    dq_ptr,
    du_ptr,
    scratch_ptr,
    Bi,
    Bt,
    scale2,
    inv_tau,
    MODE: tl.constexpr,
    H: tl.constexpr,
    K: tl.constexpr,
    d: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    LOWP: tl.constexpr,
    PREC: tl.constexpr,
    G_LOWP: tl.constexpr,
    G_PREC: tl.constexpr,
):
    """Deterministic text side, persistent: the program holding text block tb walks every image in order and
    is the only one writing dQ, dU of those texts."""
    pid = tl.program_id(0)
    sa = scratch_ptr + pid.to(tl.int64) * 2 * BT * H * K
    sp = sa + BT * H * K
    t_mul = tl.load(t_ptr)
    b_add = tl.load(b_ptr)
    gsc = tl.load(gsc_ptr)
    for tb in range(pid, tl.cdiv(Bt, BT), tl.num_programs(0)):
        t0 = tb * BT
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < Bt
        for ii in range(0, Bi):
            i = ii + 0 * pid  # a tensor under the interpreter too (its loop counters are Python ints)
            dot, n2 = _tile_forward(
                q_ptr,
                k_ptr,
                u_ptr,
                v_ptr,
                g_ptr,
                sa,
                sp,
                i,
                t0,
                Bt,
                scale2,
                True,
                H,
                K,
                d,
                BT,
                BK,
                BD,
                BG,
                LOWP,
                PREC,
                G_LOWP,
                G_PREC,
            )
            g, cos, ddot, dn2 = _pair_grad_coefs(
                dot, n2, i, o_t, m_t, Bt, t_mul, b_add, gout_ptr, gsc, lse_row_ptr, lse_col_ptr, MODE
            )
            tl.debug_barrier()
            for h in range(H):
                _head_grads(
                    q_ptr,
                    k_ptr,
                    u_ptr,
                    v_ptr,
                    q_ptr,
                    q_ptr,
                    dq_ptr,
                    du_ptr,
                    sa,
                    sp,
                    ddot,
                    dn2,
                    i,
                    h,
                    t0,
                    Bt,
                    inv_tau,
                    H,
                    K,
                    d,
                    BT,
                    BK,
                    BD,
                    LOWP,
                    PREC,
                    False,
                    True,
                    True,
                    False,
                )
