"""Triton kernels of the fused Llip score (form 3 of docs/design.md section 4): the tile helpers shared with the
backward pass, and the forward kernel.

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

Conventions. Helpers take keyword arguments and three compile-time tuples: ``shape = (H, K, d)``,
``tiles = (BT, BK, BD, BG)`` and the product precisions (``"lowp"``: tensor-core products on the 16-bit inputs;
``"ieee"`` / ``"tf32"``: float32 operands with that product precision). ``pairs = (q_ptr, k_ptr, u_ptr, v_ptr)``
are the four per-pair operands (texts ``[Bt, H, d]``: q, u; images ``[Bi, H, K, d]``: k, v). Names follow
flash-linear-attention: ``o_`` offsets, ``m_`` masks, ``b_`` register blocks, shapes in comments.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...algebra import Op

EPS2 = tl.constexpr(1e-24)  # F.normalize clamps ||z|| at 1e-12
# The op family, as the launcher passes it (OP=op.code).
OP_LOGITS = tl.constexpr(Op.LOGITS.code)
OP_SIGMOID_LOSS = tl.constexpr(Op.SIGMOID_LOSS.code)
OP_SOFTMAX_LOSS = tl.constexpr(Op.SOFTMAX_LOSS.code)


@triton.jit
def tile_dot(a, b, PREC: tl.constexpr):
    """fp32-accumulated product. ``"lowp"``: the operands are already in the 16-bit input dtype (tensor cores);
    ``"ieee"`` / ``"tf32"``: both are taken as fp32 and PREC decides the product."""
    if PREC == "lowp":
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def pair_dot(txt_ptr, img_ptr, i, h, t0, k0, Bt, shape: tl.constexpr, tiles: tl.constexpr, PREC: tl.constexpr):
    """``<txt[t, h, :], img[i, h, k, :]>`` for texts t0.. and tokens k0.. -> [BT, BK] fp32 (0 outside); ``txt``:
    ``[Bt, H, d]`` (q or u), ``img``: ``[Bi, H, K, d]`` (k or v)."""
    H, K, d = shape
    BT, BK, BD, BG = tiles
    o_t = t0 + tl.arange(0, BT)
    o_k = k0 + tl.arange(0, BK)
    m_t = o_t < Bt
    m_k = o_k < K
    img_base = img_ptr + (i.to(tl.int64) * H + h) * K * d
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for c0 in range(0, d, BD):
        o_c = c0 + tl.arange(0, BD)
        m_c = o_c < d
        p_x = txt_ptr + (o_t[:, None] * H + h) * d + o_c[None, :]
        b_x = tl.load(p_x, mask=m_t[:, None] & m_c[None, :], other=0.0)  # [BT, BD]
        p_y = img_base + o_k[None, :] * d + o_c[:, None]
        b_y = tl.load(p_y, mask=m_c[:, None] & m_k[None, :], other=0.0)  # [BD, BK]
        acc += tile_dot(a=b_x, b=b_y, PREC=PREC)
    return acc


@triton.jit
def _head_probs(pairs, sa, i, h, t0, Bt, scale2, shape: tl.constexpr, tiles: tl.constexpr, PREC: tl.constexpr):
    """Softmax weights of head h written to scratch columns h*K.., returns sum_k a*c -> [BT]."""
    H, K, d = shape
    BT, BK, BD, BG = tiles
    HK: tl.constexpr = H * K
    q_ptr, k_ptr, u_ptr, v_ptr = pairs
    o_r = tl.arange(0, BT)
    if K <= BK:  # the whole softmax in one tile: exact, no rescaling (every paper config: K <= 64)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        # raw scores, max subtracted BEFORE scaling: (s - max) is exact near the max, so the large
        # log2(e)/tau factor (tau down to 0.05) does not amplify the rounding of s into the weights
        b_s = pair_dot(txt_ptr=q_ptr, img_ptr=k_ptr, i=i, h=h, t0=t0, k0=0, Bt=Bt, shape=shape, tiles=tiles, PREC=PREC)
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))  # [BT, BK]
        b_p = tl.exp2((b_s - tl.max(b_s, 1)[:, None]) * scale2)
        b_a = b_p / tl.sum(b_p, 1)[:, None]  # [BT, BK]
        tl.store(sa + o_r[:, None] * HK + h * K + o_k[None, :], b_a, mask=m_k[None, :])
        b_c = pair_dot(txt_ptr=u_ptr, img_ptr=v_ptr, i=i, h=h, t0=t0, k0=0, Bt=Bt, shape=shape, tiles=tiles, PREC=PREC)
        return tl.sum(b_a * b_c, 1)
    else:  # K > BK: pass 1 keeps a running max / sum and parks raw scores; pass 2 normalises them
        m_run = tl.full([BT], -1e30, dtype=tl.float32)
        l_run = tl.zeros([BT], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            b_s = pair_dot(
                txt_ptr=q_ptr, img_ptr=k_ptr, i=i, h=h, t0=t0, k0=k0, Bt=Bt, shape=shape, tiles=tiles, PREC=PREC
            )
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))  # raw scores, [BT, BK]
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
            b_c = pair_dot(
                txt_ptr=u_ptr, img_ptr=v_ptr, i=i, h=h, t0=t0, k0=k0, Bt=Bt, shape=shape, tiles=tiles, PREC=PREC
            )
            acc += tl.sum(b_a * b_c, 1)
        return acc


@triton.jit
def _quad_form(gram_ptr, sa, sp, i, HK: tl.constexpr, tiles: tl.constexpr, GRAM_PREC: tl.constexpr):
    """``n2[t] = a_t G_i a_t^T`` from the scratch weights ``sa``; when ``sp`` is given (the backward pass) also
    parks ``P = a G_i`` there."""
    BT, BK, BD, BG = tiles
    o_r = tl.arange(0, BT)
    g_base = gram_ptr + i.to(tl.int64) * HK * HK
    n2 = tl.zeros([BT], dtype=tl.float32)
    for c0 in range(0, HK, BG):
        o_c = c0 + tl.arange(0, BG)
        m_c = o_c < HK
        acc = tl.zeros([BT, BG], dtype=tl.float32)
        for r0 in range(0, HK, BG):
            o_j = r0 + tl.arange(0, BG)
            m_j = o_j < HK
            b_a = tl.load(sa + o_r[:, None] * HK + o_j[None, :], mask=m_j[None, :], other=0.0)  # [BT, BG]
            b_g = tl.load(g_base + o_j[:, None] * HK + o_c[None, :], mask=m_j[:, None] & m_c[None, :], other=0.0)
            if GRAM_PREC == "lowp":
                b_a = b_a.to(b_g.dtype)
            acc += tile_dot(a=b_a, b=b_g, PREC=GRAM_PREC)  # [BT, BG]
        b_ac = tl.load(sa + o_r[:, None] * HK + o_c[None, :], mask=m_c[None, :], other=0.0)  # [BT, BG]
        n2 += tl.sum(acc * b_ac, 1)
        if sp is not None:
            tl.store(sp + o_r[:, None] * HK + o_c[None, :], acc, mask=m_c[None, :])
    return n2


@triton.jit
def tile_forward(
    pairs, gram_ptr, sa, sp, i, t0, Bt, scale2, shape: tl.constexpr, tiles: tl.constexpr, precision: tl.constexpr
):
    """One (image, text block) tile: returns ``dot = <z, y_hat>`` and ``n2 = ||z||^2`` -> ([BT], [BT]);
    leaves the softmax weights in ``sa`` (and ``P = a G`` in ``sp`` when given). ``precision = (DOT_PREC,
    GRAM_PREC)``: the products of the scores and values, and of the quadratic form."""
    H, K, d = shape
    DOT_PREC, GRAM_PREC = precision
    BT, BK, BD, BG = tiles
    tl.debug_barrier()  # the previous tile's readers of sa / sp are done
    dot = tl.zeros([BT], dtype=tl.float32)
    for h in range(H):
        dot += _head_probs(
            pairs=pairs, sa=sa, i=i, h=h, t0=t0, Bt=Bt, scale2=scale2, shape=shape, tiles=tiles, PREC=DOT_PREC
        )
    tl.debug_barrier()
    n2 = _quad_form(gram_ptr=gram_ptr, sa=sa, sp=sp, i=i, HK=H * K, tiles=tiles, GRAM_PREC=GRAM_PREC)
    return dot, n2


@triton.jit
def tile_coordinates(outer, inner, pid, TEXT_STATIONARY: tl.constexpr, BT: tl.constexpr):
    """The image ``i`` and first text ``t0`` of a persistent kernel's tile.

    Work item ``w = (outer, s)`` with ``outer = w // n_split``, ``s = w % n_split``, walks ``inner = s, s + n_split,
    ...``: image-stationary, ``outer`` is an image and ``inner`` a text block; text-stationary, the reverse.
    ``i`` is a tensor (``+ 0 * pid``) because the interpreter's loop counters are Python ints."""
    if TEXT_STATIONARY:
        return inner + 0 * pid, outer * BT
    else:
        return outer, inner * BT


@triton.jit
def _log1p_exp_neg_abs(x):
    """``log(1 + exp(-|x|))`` without losing the small values (no log1p in tl): the Goldberg trick."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    return tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))


@triton.jit(do_not_specialize=["Bi", "Bt", "n_split"])
def forward_kernel(
    q_ptr,
    k_ptr,
    u_ptr,
    v_ptr,
    gram_ptr,
    t_ptr,
    b_ptr,
    out_ptr,
    scratch_ptr,
    Bi,
    Bt,
    scale2,
    n_split,
    OP: tl.constexpr,
    TEXT_STATIONARY: tl.constexpr,
    H: tl.constexpr,
    K: tl.constexpr,
    d: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    DOT_PREC: tl.constexpr,
    GRAM_PREC: tl.constexpr,
):
    """Persistent forward: programs stride over work items (see :func:`tile_coordinates`), so the scratch is
    ``grid * BT * HK`` floats. ``x = t * cos + b`` per pair, and per op:

    - ``OP_LOGITS`` (image-stationary): ``x`` -> ``out[i, t]`` (``[Bi, Bt]``);
    - ``OP_SIGMOID_LOSS`` (image-stationary): ``sum_t softplus(x)`` -> ``out[w]`` (``[Bi * n_split]``): the
      all-negative SigLIP sum, positives corrected in torch;
    - ``OP_SOFTMAX_LOSS``: image-stationary, each row's log-sum-exp of ``x`` as (max, sum of exp) ->
      ``out[w, 0:2]`` (``[Bi * n_split, 2]``); text-stationary, each column's -> ``out[s, 0:2, t]``
      (``[n_split, 2, Bt]``). ``b`` is 0 for this loss.
    """
    tl.static_assert(not TEXT_STATIONARY or OP == OP_SOFTMAX_LOSS, "only the softmax loss needs column statistics")
    shape: tl.constexpr = (H, K, d)
    tiles: tl.constexpr = (BT, BK, BD, BG)
    precision: tl.constexpr = (DOT_PREC, GRAM_PREC)
    pid = tl.program_id(0)
    sa = scratch_ptr + pid.to(tl.int64) * BT * H * K  # this program's [BT, HK] softmax weights
    t_mul = tl.load(t_ptr)
    b_add = tl.load(b_ptr)
    n_text_blocks = tl.cdiv(Bt, BT)
    n_outer = n_text_blocks if TEXT_STATIONARY else Bi
    n_inner = Bi if TEXT_STATIONARY else n_text_blocks
    pairs = (q_ptr, k_ptr, u_ptr, v_ptr)
    for w in range(pid, n_outer * n_split, tl.num_programs(0)):
        outer = w // n_split + 0 * pid  # a tensor under the interpreter too (its loop counters are Python ints)
        s = w % n_split
        # Blocked sums: each of the BT lanes sums every BT-th text (or image), and the lanes meet in a tree
        # (tl.sum) at the end, so rounding grows with the lane's length, not the batch's. The loss lanes are
        # float64; the log-sum-exp's rescaled terms are at most 1 and stay float32, as in torch's own.
        loss = tl.zeros([BT], dtype=tl.float64)
        m_run = tl.full([BT], -1e30, dtype=tl.float32)  # online log-sum-exp per lane: running max and sum
        l_run = tl.zeros([BT], dtype=tl.float32)
        for inner in range(s, n_inner, n_split):
            i, t0 = tile_coordinates(outer=outer, inner=inner, pid=pid, TEXT_STATIONARY=TEXT_STATIONARY, BT=BT)
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < Bt
            dot, n2 = tile_forward(
                pairs=pairs,
                gram_ptr=gram_ptr,
                sa=sa,
                sp=None,
                i=i,
                t0=t0,
                Bt=Bt,
                scale2=scale2,
                shape=shape,
                tiles=tiles,
                precision=precision,
            )
            x = t_mul * (dot / tl.sqrt(tl.maximum(n2, EPS2))) + b_add
            if OP == OP_LOGITS:
                tl.store(out_ptr + i.to(tl.int64) * Bt + o_t, x, mask=m_t)
            elif OP == OP_SIGMOID_LOSS:
                loss += tl.where(m_t, tl.maximum(x, 0.0) + _log1p_exp_neg_abs(x=x), 0.0).to(tl.float64)
            elif TEXT_STATIONARY:
                m_new = tl.maximum(m_run, x)
                l_run = l_run * tl.exp(m_run - m_new) + tl.exp(x - m_new)
                m_run = m_new
            else:
                x = tl.where(m_t, x, -1e30)
                m_new = tl.maximum(m_run, x)
                l_run = l_run * tl.exp(m_run - m_new) + tl.where(m_t, tl.exp(x - m_new), 0.0)
                m_run = m_new
        if OP == OP_SIGMOID_LOSS:
            tl.store(out_ptr + w, tl.sum(loss, 0))
        elif OP == OP_SOFTMAX_LOSS:
            if TEXT_STATIONARY:
                o_t = (w // n_split) * BT + tl.arange(0, BT)
                tl.store(out_ptr + s * 2 * Bt + o_t, m_run, mask=o_t < Bt)
                tl.store(out_ptr + (s * 2 + 1) * Bt + o_t, l_run, mask=o_t < Bt)
            else:
                m_all = tl.max(m_run, 0)
                tl.store(out_ptr + 2 * w, m_all)
                tl.store(out_ptr + 2 * w + 1, tl.sum(l_run * tl.exp(m_run - m_all), 0))
