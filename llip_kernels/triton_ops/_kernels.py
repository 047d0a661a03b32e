"""Triton kernels of the fused Llip score, form 3 of SPEC section 4 (see the package docstring for why).

One *tile* is one image ``i`` against a block of ``BT`` texts ``t0 .. t0+BT``. For every head ``h`` and every
block of ``BK`` mixture tokens it computes, with fp32 accumulation,

    s[t, k] = <Q_t[h], K_i[h, k]>                       # [BT, BK]   tl.dot over d in chunks of BD
    a[t, k] = exp2((s - max_k s) * log2(e)/tau) / sum  # softmax over K (online over K tiles when K > BK)
    c[t, k] = <U_t[h], V_i[h, k]>                       # [BT, BK]   U_t = W_out @ y_hat_t (per text, torch)
    dot[t] += sum_k a * c                              # = <z[i, t], y_hat_t>

and writes ``a`` (all heads, flattened to ``HK = H*K`` columns) into a per-program scratch row block, because
``||z||^2 = a G_i a^T`` couples the heads: ``n2[t] = sum_c (a @ G_i)[t, c] * a[t, c]``, tiled ``[BT, BG] @
[BG, BG]`` over the per-image Gram matrix ``G_i = V'_i V'_i^T`` (``[HK, HK]``, torch). The scratch holds
``grid * BT * HK`` floats, never ``Bi * Bt * ...``: programs loop over their share of the other side.

Scratch written by one thread is read by others, so every store -> load hand-over inside a program is
separated by ``tl.debug_barrier()`` (a CTA barrier, which also orders global memory within the CTA).
Read-modify-write gradient updates rely on the same barrier; atomics are used instead when several
programs own the same rows (``*_ATOMIC`` flags).

Naming follows flash-linear-attention: ``o_`` offsets, ``m_`` masks, ``b_`` register blocks, shapes in comments.
"""

from __future__ import annotations

import triton
import triton.language as tl

EPS2 = tl.constexpr(1e-24)  # F.normalize clamps ||z|| at 1e-12


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
    """fp32-accumulated product. LOWP: operands are cast to the low-precision input dtype of ``b``'s kind
    (tensor cores); otherwise both are fp32 and ``PREC`` ("ieee" or "tf32") decides the product."""
    if LOWP:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _pair_dot(
    txt_ptr,
    img_ptr,
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
):
    """``<txt[t, h, :], img[i, h, k, :]>`` for texts t0.. and tokens k0.. -> [BT, BK] fp32 (0 outside)."""
    o_t = t0 + tl.arange(0, BT)
    o_k = k0 + tl.arange(0, BK)
    m_t = o_t < Bt
    m_k = o_k < K
    img_base = img_ptr + (i.to(tl.int64) * H + h) * K * d
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for c0 in range(0, d, BD):
        o_c = c0 + tl.arange(0, BD)
        m_c = o_c < d
        b_x = tl.load(
            txt_ptr + (o_t[:, None] * H + h) * d + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0
        )  # [BT, BD]
        b_y = tl.load(
            img_base + o_k[None, :] * d + o_c[:, None], mask=m_c[:, None] & m_k[None, :], other=0.0
        )  # [BD, BK]
        acc += _dot(b_x, b_y, LOWP, PREC)
    return acc


@triton.jit
def _head_probs(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    sa,
    i,
    h,
    t0,
    Bt,
    scale2,
    H: tl.constexpr,
    K: tl.constexpr,
    d: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    LOWP: tl.constexpr,
    PREC: tl.constexpr,
):
    """Softmax weights of head h written to scratch columns h*K.., returns sum_k a*c -> [BT]."""
    HK: tl.constexpr = H * K
    o_r = tl.arange(0, BT)
    if K <= BK:  # the whole softmax in one tile: exact, no rescaling (every paper config: K <= 64)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        # raw scores, max subtracted BEFORE scaling: (s - max) is exact near the max, so the large
        # log2(e)/tau factor (tau down to 0.05) does not amplify the rounding of s into the weights
        b_s = _pair_dot(q_ptr, k_ptr, i, h, t0, 0, Bt, H, K, d, BT, BK, BD, LOWP, PREC)  # [BT, BK]
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_p = tl.exp2((b_s - tl.max(b_s, 1)[:, None]) * scale2)
        b_a = b_p / tl.sum(b_p, 1)[:, None]  # [BT, BK]
        tl.store(sa + o_r[:, None] * HK + h * K + o_k[None, :], b_a, mask=m_k[None, :])
        b_c = _pair_dot(u_ptr, v_ptr, i, h, t0, 0, Bt, H, K, d, BT, BK, BD, LOWP, PREC)  # [BT, BK]
        return tl.sum(b_a * b_c, 1)
    else:  # K > BK: pass 1 keeps a running max / sum and parks raw scores; pass 2 normalises them
        m_run = tl.full([BT], -1e30, dtype=tl.float32)
        l_run = tl.zeros([BT], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            b_s = _pair_dot(q_ptr, k_ptr, i, h, t0, k0, Bt, H, K, d, BT, BK, BD, LOWP, PREC)  # raw, [BT, BK]
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(b_s, 1))
            l_run = l_run * tl.exp2((m_run - m_new) * scale2) + tl.sum(tl.exp2((b_s - m_new[:, None]) * scale2), 1)
            m_run = m_new
            tl.store(sa + o_r[:, None] * HK + h * K + o_k[None, :], b_s, mask=m_k[None, :])
        tl.debug_barrier()
        acc = tl.zeros([BT], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            p_a = sa + o_r[:, None] * HK + h * K + o_k[None, :]
            b_s = tl.load(p_a, mask=m_k[None, :], other=float("-inf"))
            b_a = tl.exp2((b_s - m_run[:, None]) * scale2) / l_run[:, None]  # [BT, BK]
            tl.store(p_a, b_a, mask=m_k[None, :])
            b_c = _pair_dot(u_ptr, v_ptr, i, h, t0, k0, Bt, H, K, d, BT, BK, BD, LOWP, PREC)
            acc += tl.sum(b_a * b_c, 1)
        return acc


@triton.jit
def _quad_form(
    g_ptr,
    sa,
    sp,
    i,
    HK: tl.constexpr,
    BT: tl.constexpr,
    BG: tl.constexpr,
    STORE_P: tl.constexpr,
    G_LOWP: tl.constexpr,
    G_PREC: tl.constexpr,
):
    """``n2[t] = a_t G_i a_t^T`` from the scratch weights; with STORE_P also parks ``P = a G_i`` in ``sp``."""
    o_r = tl.arange(0, BT)
    g_base = g_ptr + i.to(tl.int64) * HK * HK
    n2 = tl.zeros([BT], dtype=tl.float32)
    for c0 in range(0, HK, BG):
        o_c = c0 + tl.arange(0, BG)
        m_c = o_c < HK
        acc = tl.zeros([BT, BG], dtype=tl.float32)
        for r0 in range(0, HK, BG):
            o_j = r0 + tl.arange(0, BG)
            m_j = o_j < HK
            b_a = tl.load(sa + o_r[:, None] * HK + o_j[None, :], mask=m_j[None, :], other=0.0)  # [BT, BG]
            b_g = tl.load(
                g_base + o_j[:, None] * HK + o_c[None, :], mask=m_j[:, None] & m_c[None, :], other=0.0
            )  # [BG, BG]
            if G_LOWP:
                b_a = b_a.to(b_g.dtype)
            acc += _dot(b_a, b_g, G_LOWP, G_PREC)
        b_ac = tl.load(sa + o_r[:, None] * HK + o_c[None, :], mask=m_c[None, :], other=0.0)  # [BT, BG]
        n2 += tl.sum(acc * b_ac, 1)
        if STORE_P:
            tl.store(sp + o_r[:, None] * HK + o_c[None, :], acc, mask=m_c[None, :])
    return n2


@triton.jit
def _tile_forward(
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
    STORE_P: tl.constexpr,
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
    """One (image, text block) tile: returns ``dot = <z, y_hat>`` and ``n2 = ||z||^2`` -> ([BT], [BT]);
    leaves the softmax weights in ``sa`` (and ``P = a G`` in ``sp`` when STORE_P)."""
    tl.debug_barrier()  # the previous tile's readers of sa / sp are done
    dot = tl.zeros([BT], dtype=tl.float32)
    for h in range(H):
        dot += _head_probs(q_ptr, k_ptr, u_ptr, v_ptr, sa, i, h, t0, Bt, scale2, H, K, d, BT, BK, BD, LOWP, PREC)
    tl.debug_barrier()
    n2 = _quad_form(g_ptr, sa, sp, i, H * K, BT, BG, STORE_P, G_LOWP, G_PREC)
    return dot, n2


@triton.jit
def _log1p_exp_neg_abs(x):
    """``log(1 + exp(-|x|))`` without losing the small values (no log1p in tl): the Goldberg trick."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    return tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))


@triton.jit(do_not_specialize=["Bi", "Bt", "n_split"])
def _fwd_image_kernel(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    g_ptr,
    t_ptr,
    b_ptr,
    out_ptr,
    stat_ptr,
    scratch_ptr,
    Bi,
    Bt,
    scale2,
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
):
    """Image-stationary forward, persistent: work item w = (i, s) = (w // n_split, w % n_split) takes text
    blocks s, s + n_split, ... of image i; programs stride over work items, so the scratch is grid * BT * HK.

    MODE 0: logits ``t*cos + b`` -> out[i, :] ([Bi, Bt] fp32).
    MODE 1: ``sum_t softplus(t*cos + b)`` -> stat[w] (the all-negative SigLIP sum, positives fixed in torch).
    MODE 2: row log-sum-exp of ``t*cos`` as (max, sum) -> stat[w, 0:2].
    """
    pid = tl.program_id(0)
    sa = scratch_ptr + pid.to(tl.int64) * BT * H * K
    t_mul = tl.load(t_ptr)
    b_add = tl.load(b_ptr)
    for w in range(pid, Bi * n_split, tl.num_programs(0)):
        i = w // n_split + 0 * pid  # a tensor under the interpreter too (its loop counters are Python ints)
        s = w % n_split
        loss = tl.zeros([BT], dtype=tl.float32)
        m_run = tl.full([BT], -1e30, dtype=tl.float32)
        l_run = tl.zeros([BT], dtype=tl.float32)
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
                sa,
                i,
                t0,
                Bt,
                scale2,
                False,
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
            cos = dot / tl.sqrt(tl.maximum(n2, EPS2))
            x = t_mul * cos + b_add
            if MODE == 0:
                tl.store(out_ptr + i.to(tl.int64) * Bt + o_t, x, mask=m_t)
            elif MODE == 1:
                loss += tl.where(m_t, tl.maximum(x, 0.0) + _log1p_exp_neg_abs(x), 0.0)
            else:
                x = tl.where(m_t, x, -1e30)
                m_new = tl.maximum(m_run, x)
                l_run = l_run * tl.exp(m_run - m_new) + tl.where(m_t, tl.exp(x - m_new), 0.0)
                m_run = m_new
        if MODE == 1:
            tl.store(stat_ptr + w, tl.sum(loss, 0))
        if MODE == 2:
            m_all = tl.max(m_run, 0)
            tl.store(stat_ptr + 2 * w, m_all)
            tl.store(stat_ptr + 2 * w + 1, tl.sum(l_run * tl.exp(m_run - m_all), 0))


@triton.jit(do_not_specialize=["Bi", "Bt", "n_split"])
def _fwd_text_kernel(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    g_ptr,
    t_ptr,
    stat_ptr,
    scratch_ptr,
    Bi,
    Bt,
    scale2,
    n_split,
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
    """Text-stationary forward for the column log-sum-exp of ``t*cos`` (softmax loss), persistent: work item
    w = (tb, s) takes images s, s + n_split, ... against text block tb -> stat[s, 0, t] = max, stat[s, 1, t] = sum."""
    pid = tl.program_id(0)
    sa = scratch_ptr + pid.to(tl.int64) * BT * H * K
    t_mul = tl.load(t_ptr)
    for w in range(pid, tl.cdiv(Bt, BT) * n_split, tl.num_programs(0)):
        tb = w // n_split
        s = w % n_split
        t0 = tb * BT
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < Bt
        m_run = tl.full([BT], -1e30, dtype=tl.float32)
        l_run = tl.zeros([BT], dtype=tl.float32)
        for ii in range(s, Bi, n_split):
            i = ii + 0 * pid  # a tensor under the interpreter too (its loop counters are Python ints)
            dot, n2 = _tile_forward(
                q_ptr,
                k_ptr,
                u_ptr,
                v_ptr,
                g_ptr,
                sa,
                sa,
                i,
                t0,
                Bt,
                scale2,
                False,
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
            x = t_mul * dot / tl.sqrt(tl.maximum(n2, EPS2))
            m_new = tl.maximum(m_run, x)
            l_run = l_run * tl.exp(m_run - m_new) + tl.exp(x - m_new)
            m_run = m_new
        tl.store(stat_ptr + s * 2 * Bt + o_t, m_run, mask=m_t)
        tl.store(stat_ptr + (s * 2 + 1) * Bt + o_t, l_run, mask=m_t)
