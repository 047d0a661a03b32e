"""Host side: precomputations, launch configuration, the autograd Function and the three ops.

Imported lazily by :mod:`llip_kernels.triton_ops` (it imports Triton).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dispatch, reference
from ._interp import patch_interpreter_bf16_dot

patch_interpreter_bf16_dot()  # before any kernel runs; a no-op on GPUs

from ._kernels import _fwd_image_kernel, _fwd_text_kernel  # noqa: E402
from ._kernels_bwd import _bwd_image_kernel, _bwd_text_kernel  # noqa: E402

ENV_ALLOW_TF32 = "LLIP_KERNELS_ALLOW_TF32"
MODES = {"logits": 0, "sigmoid": 1, "softmax": 2}

# Caps on tile sizes, chosen with bench/triton_compile_table.py so that no kernel spills registers on sm_90a
# or sm_80 at any paper config (8 warps, 1 stage): the backward keeps more [BT, BK] blocks alive (a, G a, c,
# da, ds, w), so it takes K in tiles of 32 (two online-softmax tiles at K = 64) and d in chunks of 16 where
# the forward takes 64 and 32.
# Tests lower the caps to exercise the multi-tile paths on small interpreted shapes.
MAX_BLOCK_T = 64
MAX_BLOCK_K = 64
MAX_BLOCK_K_BWD = 32
MAX_BLOCK_T_BWD = 64
MAX_BLOCK_D_BWD = 16
MAX_BLOCK_G = 32
MAX_BLOCK_D = 32  # forward; 64-wide chunks spill at d = 64, 128
NUM_WARPS = 8
NUM_STAGES = 1
MAX_REGISTERS = 255  # per-thread cap of the fp32 4-warp programs (one block per SM by design)
# Persistent grids. Work items: an image (or a text block) and its share of the other side; n_split shares
# per item are chosen to reach WORK_PER_SM items per SM (load balance, parallelism when Bi is small). Programs:
# GRID_PER_SM per SM (one 8-warp CTA using ~250 registers/thread is resident per SM); each strides over work
# items, so the scratch is GRID * BT * H*K floats whatever Bi and Bt. Under the interpreter programs run one
# after another: a couple suffice (2 so that the striding is exercised). Tests raise INTERPRET_WORK to force
# splits (the atomic paths).
WORK_PER_SM = 4
GRID_PER_SM = 1
INTERPRET_WORK = 1
INTERPRET_GRID = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class TileConfig:
    """Compile-time sizes of one launch (see :mod:`._kernels`)."""

    BT: int  # texts per tile
    BK: int  # mixture tokens per tile
    BD: int  # head-dim chunk of each tl.dot
    BG: int  # Gram-matrix tile
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # per-thread register cap handed to ptxas (None: ptxas picks its own)

    def launch_options(self) -> dict:
        """Launch keywords of the compiled kernel (the interpreter ignores them)."""
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


def tile_config(
    H: int,
    K: int,
    d: int,
    Bt: int,
    backward: bool = False,
    capability: int = 90,
    lowp: bool = True,
) -> TileConfig:
    """Tiles for one problem. BD is the largest power of two <= MAX_BLOCK_D dividing d (d = 96, 160 waste
    nothing); d not a multiple of 16 uses 16 with masking (tl.dot needs inner dims >= 16). The backward keeps
    more blocks alive, so it takes 32 tokens and 16 head dims per product; before Hopper (no wgmma, and ptxas
    then caps 8-warp programs at 128 registers) and for fp32 operands (IEEE products on FMA units hold larger
    fragments) it also takes 32 texts, Gram tiles of 16 and 4 warps, and fp32 16 tokens. The fp32 4-warp
    programs get a cap of 255 registers: left alone, ptxas aims at several resident blocks per SM (it settles
    for 128 or 168 registers and spills up to ~300 bytes), but the persistent grid keeps one block per SM, so
    the extra registers cost no occupancy. (bf16 4-warp programs fit without it, and with it one spills 4 bytes
    on sm_80: ptxas's choices are not monotonic, so the table decides.) Before Hopper the forward takes 16 head
    dims per product (32 spills at d = 128 in bf16). Every configuration of every paper head is checked
    spill-free by bench/triton_compile_table.py."""
    small = backward and (capability < 90 or not lowp)
    max_bt = min(MAX_BLOCK_T, MAX_BLOCK_T_BWD) if backward else MAX_BLOCK_T
    if small:
        max_bt = min(max_bt, 32)
    BT = min(max_bt, max(16, _next_pow2(Bt)))
    max_bk = min(MAX_BLOCK_K, MAX_BLOCK_K_BWD) if backward else MAX_BLOCK_K
    if small and not lowp:
        max_bk = min(max_bk, 16)
    BK = min(max_bk, max(16, _next_pow2(K)))
    BD = 16
    if d % 16 == 0:
        BD = min(MAX_BLOCK_D, MAX_BLOCK_D_BWD) if backward else MAX_BLOCK_D
        if capability < 90:
            BD = min(BD, 16)
        while d % BD:
            BD //= 2
    BG = min(min(MAX_BLOCK_G, 16) if small else MAX_BLOCK_G, max(16, _next_pow2(H * K)))
    if small:
        return TileConfig(BT, BK, BD, BG, 4, NUM_STAGES, maxnreg=None if lowp else MAX_REGISTERS)
    return TileConfig(BT, BK, BD, BG, NUM_WARPS, NUM_STAGES)


@dataclass(frozen=True)
class Precision:
    """Constexpr precision switches. LOWP: bf16/fp16 operands on tensor cores; PREC for fp32 operands."""

    LOWP: bool
    PREC: str
    G_LOWP: bool
    G_PREC: str
    DG_PREC: str
    gram_dtype: torch.dtype


def precision_for(dtype: torch.dtype) -> Precision:
    """fp32: IEEE products (TF32 only with $LLIP_KERNELS_ALLOW_TF32=1). bf16: G kept in bf16 (same range as
    fp32). fp16: G in fp32 with TF32 products, because ||z||^2-sized entries can overflow fp16."""
    tf32 = os.environ.get(ENV_ALLOW_TF32, "").strip().lower() in ("1", "true", "yes", "on")
    prec = "tf32" if tf32 else "ieee"
    if dtype == torch.float32:
        return Precision(False, prec, False, prec, prec, torch.float32)
    if dtype == torch.bfloat16:
        return Precision(True, "ieee", True, "ieee", "tf32", torch.bfloat16)
    return Precision(True, "ieee", False, "tf32", "tf32", torch.float32)


def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return 90  # the interpreter: any valid configuration
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _split(n_outer: int, n_inner: int, device: torch.device) -> int:
    """How many work items share one outer item (an image) so that there are enough work items."""
    if device.type == "cuda":
        target = WORK_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRET_WORK
    return max(1, min(n_inner, math.ceil(target / max(n_outer, 1))))


def _grid(n_work: int, device: torch.device) -> int:
    """Programs of a persistent launch over ``n_work`` items."""
    if device.type == "cuda":
        cap = GRID_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = INTERPRET_GRID
    return max(1, min(n_work, cap))


def precompute(v: torch.Tensor, y: torch.Tensor, w_out: torch.Tensor, gram_dtype: torch.dtype):
    """Per-text ``U = (y_hat @ W_out^T)`` -> ``[Bt, H, d]`` in v's dtype and per-image Gram matrices
    ``G_i = V'_i V'_i^T`` -> ``[Bi, HK, HK]`` in ``gram_dtype``, with ``V'_i[h,k] = V_i[h,k] @ W_out[h*d:(h+1)*d]``.
    Plain differentiable torch in fp32: autograd carries dU back to y, w_out and dG back to v, w_out."""
    Bi, H, K, d = v.shape
    D = H * d
    wf = w_out.float()
    vp = torch.einsum("ihkc,hce->ihke", v.float(), wf.view(H, d, D)).reshape(Bi, H * K, D)  # [Bi, HK, D]
    gram = torch.bmm(vp, vp.transpose(1, 2))  # [Bi, HK, HK]
    u = F.normalize(y.float(), dim=-1) @ wf.t()  # [Bt, D]
    return u.view(-1, H, d).to(v.dtype), gram.to(gram_dtype)


def _launch_args(k, tau):
    Bi, H, K, d = k.shape
    return dict(H=H, K=K, d=d), Bi, 1.4426950408889634 / tau


class _LlipPairs(torch.autograd.Function):
    """Pair work of the three ops over precomputed ``u`` and ``gram``.

    mode "logits" -> ``[Bi, Bt]`` logits; "sigmoid" -> ``sum_ij softplus(t*cos_ij + b)``;
    "softmax" -> ``(mean_i lse_row_i + mean_j lse_col_j) / 2`` of ``t*cos``. Saves only the inputs (and the
    row / column log-sum-exps for softmax): the backward recomputes every tile.
    """

    @staticmethod
    def forward(ctx, k, v, q, u, gram, t, b, tau, mode):
        k, v, q, u, gram = (x.contiguous() for x in (k, v, q, u, gram))
        shape, Bi, scale2 = _launch_args(k, tau)
        Bt = q.shape[0]
        H, K = shape["H"], shape["K"]
        prec = precision_for(k.dtype)
        cfg = tile_config(H, K, shape["d"], Bt, capability=_capability(k.device), lowp=prec.LOWP)
        n_tb = triton_cdiv(Bt, cfg.BT)
        dev = k.device
        kw = _kernel_kwargs(shape, cfg, prec)
        n_split = _split(Bi, n_tb, dev)
        grid = _grid(Bi * n_split, dev)
        scratch = torch.empty(grid * cfg.BT * H * K, dtype=torch.float32, device=dev)
        m = MODES[mode]
        lse_row = lse_col = None
        if m == 0:
            out = torch.empty(Bi, Bt, dtype=torch.float32, device=dev)
            stat = out
        else:
            out = None
            stat = torch.empty(Bi * n_split * (1 if m == 1 else 2), dtype=torch.float32, device=dev)
        _fwd_image_kernel[(grid,)](
            q, k, u, v, gram, t, b, out if m == 0 else stat, stat, scratch, Bi, Bt, scale2, n_split, MODE=m, **kw
        )
        if m == 1:
            out = stat.sum()
        elif m == 2:
            lse_row = _merge_lse(stat.view(Bi, n_split, 2)[..., 0], stat.view(Bi, n_split, 2)[..., 1])  # [Bi]
            n_split_t = _split(n_tb, Bi, dev)
            grid_t = _grid(n_tb * n_split_t, dev)
            scratch_t = torch.empty(grid_t * cfg.BT * H * K, dtype=torch.float32, device=dev)
            stat_t = torch.empty(n_split_t, 2, Bt, dtype=torch.float32, device=dev)
            _fwd_text_kernel[(grid_t,)](
                q,
                k,
                u,
                v,
                gram,
                t,
                stat_t,
                scratch_t,
                Bi,
                Bt,
                scale2,
                n_split_t,
                **{n: x for n, x in kw.items() if n != "MODE"},
            )
            lse_col = _merge_lse(stat_t[:, 0].t(), stat_t[:, 1].t())  # [Bt]
            out = 0.5 * (lse_row.mean() + lse_col.mean())
        ctx.save_for_backward(k, v, q, u, gram, t, b, lse_row, lse_col)
        ctx.tau, ctx.mode = tau, m
        return out

    @staticmethod
    def backward(ctx, gout):
        k, v, q, u, gram, t, b, lse_row, lse_col = ctx.saved_tensors
        m = ctx.mode
        shape, Bi, scale2 = _launch_args(k, ctx.tau)
        Bt = q.shape[0]
        H, K = shape["H"], shape["K"]
        prec = precision_for(k.dtype)
        cfg = tile_config(H, K, shape["d"], Bt, backward=True, capability=_capability(k.device), lowp=prec.LOWP)
        dev = k.device
        n_tb = triton_cdiv(Bt, cfg.BT)
        deterministic = dispatch.deterministic_requested()
        f32 = dict(dtype=torch.float32, device=dev)
        dk, dv = torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
        dq, du = torch.zeros(q.shape, **f32), torch.zeros(u.shape, **f32)
        dg = torch.zeros(gram.shape, **f32)
        if m == 0:
            gout_t, gsc = gout.contiguous().float(), torch.zeros((), **f32)
        else:
            gout_t = gsc = (gout.float() * (0.5 / Bi if m == 2 else 1.0)).reshape(())
        lse_r = lse_row if lse_row is not None else gsc
        lse_c = lse_col if lse_col is not None else gsc
        kw = _kernel_kwargs(shape, cfg, prec)
        n_split = 1 if deterministic else _split(Bi, n_tb, dev)
        grid = _grid(Bi * n_split, dev)
        scratch = torch.empty(grid * 2 * cfg.BT * H * K, **f32)
        dtb = torch.empty(Bi * n_split, 2, **f32)
        _bwd_image_kernel[(grid,)](
            q,
            k,
            u,
            v,
            gram,
            t,
            b,
            gout_t,
            gsc,
            lse_r,
            lse_c,
            dk,
            dv,
            dq,
            du,
            dg,
            dtb,
            scratch,
            Bi,
            Bt,
            scale2,
            1.0 / ctx.tau,
            n_split,
            MODE=m,
            DG_PREC=prec.DG_PREC,
            DO_TXT=not deterministic,
            IMG_ATOMIC=not deterministic,  # one compiled flavour per mode (even when n_split == 1)
            **kw,
        )
        if deterministic:
            cap, d = _capability(dev), shape["d"]
            cfg_t = tile_config(H, K, d, Bt, backward=True, capability=cap, lowp=prec.LOWP)
            grid_t = _grid(triton_cdiv(Bt, cfg_t.BT), dev)
            scratch_t = torch.empty(grid_t * 2 * cfg_t.BT * H * K, **f32)
            _bwd_text_kernel[(grid_t,)](
                q,
                k,
                u,
                v,
                gram,
                t,
                b,
                gout_t,
                gsc,
                lse_r,
                lse_c,
                dq,
                du,
                scratch_t,
                Bi,
                Bt,
                scale2,
                1.0 / ctx.tau,
                MODE=m,
                **_kernel_kwargs(shape, cfg_t, prec),
            )
        dt, db = dtb.sum(0).unbind(0)
        return (
            dk.to(k.dtype),
            dv.to(v.dtype),
            dq.to(q.dtype),
            du.to(u.dtype),
            dg.to(gram.dtype),
            dt.reshape(t.shape),
            (db.reshape(b.shape) if m != 2 else None),
            None,
            None,
        )


def _kernel_kwargs(shape: dict, cfg: TileConfig, prec: Precision) -> dict:
    """Constexprs and launch options shared by the kernels of one launch."""
    return dict(
        **shape,
        BT=cfg.BT,
        BK=cfg.BK,
        BD=cfg.BD,
        BG=cfg.BG,
        LOWP=prec.LOWP,
        PREC=prec.PREC,
        G_LOWP=prec.G_LOWP,
        G_PREC=prec.G_PREC,
        **cfg.launch_options(),
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Combine partial (max, sum of exp) pairs along the last dim -> log-sum-exp."""
    mx = m.max(dim=-1).values
    return mx + torch.log((s * torch.exp(m - mx.unsqueeze(-1))).sum(-1))


def _pairs(k, v, q, y, w_out, t, b, tau, mode):
    prec = precision_for(k.dtype)
    u, gram = precompute(v, y, w_out, prec.gram_dtype)
    return _LlipPairs.apply(k, v, q, u, gram, t, b, tau, mode)


def _aligned_logits(k, v, q, y, w_out, t, b, tau, rows, cols):
    """Logits of the listed pairs only (O(len(rows)) memory), in fp32 with plain torch autograd."""
    z = reference.mix_aligned(k[rows].float(), v[rows].float(), q[cols].float(), w_out.float(), tau)  # [P, D]
    cos = (F.normalize(z, dim=-1) * F.normalize(y[cols].float(), dim=-1)).sum(-1)
    return t * cos + b


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
    return _pairs(k, v, q, y, w_out, t, b, tau, "logits")


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    """``(sum_ij softplus(x_ij) - sum_pos x_pos) / Bi``: -log sigmoid(x) = softplus(x) - x on positives, so the
    kernel treats every pair as a negative and the few positives are corrected here in O(Bi)."""
    Bi, Bt = k.shape[0], q.shape[0]
    total = _pairs(k, v, q, y, w_out, t, b, tau, "sigmoid")
    if pos_offset is not None:
        lo, hi = max(0, -pos_offset), min(Bi, Bt - pos_offset)
        if hi > lo:
            rows = torch.arange(lo, hi, device=k.device)
            total = total - _aligned_logits(k, v, q, y, w_out, t, b, tau, rows, rows + pos_offset).sum()
    return total / Bi


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    """``(mean lse_row + mean lse_col) / 2 - mean_i x_ii`` of ``x = t * cos`` (the symmetric InfoNCE)."""
    B = k.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=k.device)
    lse_part = _pairs(k, v, q, y, w_out, t, zero, tau, "softmax")
    rows = torch.arange(B, device=k.device)
    return lse_part - _aligned_logits(k, v, q, y, w_out, t, zero, tau, rows, rows).mean()
