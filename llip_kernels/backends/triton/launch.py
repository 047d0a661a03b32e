"""Host side: precomputations, launch configuration, the autograd Function and the three ops.

Imported lazily by :mod:`llip_kernels.backends.triton` (it imports Triton).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import settings
from ..._custom_ops import define, differentiate_with
from ...algebra import Op, gram_matrices, mix_aligned, positives, text_projection
from .interpreter import patch_interpreter_bf16_dot

patch_interpreter_bf16_dot()  # before any kernel runs; a no-op on GPUs

from .kernels import forward_kernel  # noqa: E402
from .kernels_backward import backward_kernel  # noqa: E402

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
    """Compile-time sizes of one launch (see :mod:`.kernels`)."""

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
    text_pass: bool = False,
) -> TileConfig:
    """Tiles for one problem. BD is the largest power of two <= MAX_BLOCK_D dividing d (d = 96, 160 waste
    nothing); d not a multiple of 16 uses 16 with masking (tl.dot needs inner dims >= 16). The backward keeps
    more blocks alive, so it takes 32 tokens and 16 head dims per product; before Hopper (no wgmma, and ptxas
    then caps 8-warp programs at 128 registers) and for fp32 operands (IEEE products on FMA units hold larger
    fragments) it also takes 32 texts, Gram tiles of 16 and 4 warps, and fp32 16 tokens. The fp32 4-warp
    programs get a cap of 255 registers: left alone, ptxas aims at several resident blocks per SM (it settles
    for 128 or 168 registers and spills up to ~300 bytes), but the persistent grid keeps one block per SM, so
    the extra registers cost no occupancy. bf16 4-warp programs get it in the deterministic text pass only
    (``text_pass``; without it ptxas settles for 168 registers and spills 16 bytes at H/14 on sm_80), not in
    the image passes, where one spills 4 bytes with it at B/16 on sm_80: ptxas's choices are not monotonic, so
    the table decides. Before Hopper the forward takes 16 head
    dims per product (32 spills at d = 128 in bf16). bench/triton_compile_table.py checks every configuration of
    every paper head: all are spill-free but one, the bf16 atomic pass of the sigmoid loss at B/16 on sm_80, which
    spills 4 bytes since the gradients accumulate in float64 (8 with the register cap; smaller tiles cost more)."""
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
        return TileConfig(BT, BK, BD, BG, 4, NUM_STAGES, maxnreg=MAX_REGISTERS if text_pass or not lowp else None)
    return TileConfig(BT, BK, BD, BG, NUM_WARPS, NUM_STAGES)


@dataclass(frozen=True)
class Precision:
    """Product precisions, passed to the kernels as constexprs: ``"lowp"`` (tensor-core products on the 16-bit
    inputs, fp32 accumulation), ``"ieee"`` or ``"tf32"`` (fp32 operands)."""

    DOT_PREC: str  # scores <q, k> and value dots <u, v>, and the token gradients
    GRAM_PREC: str  # the quadratic form a G a^T
    DGRAM_PREC: str  # dG = A^T diag(dn2) A (fp32 operands always: dn2 * a spans a wide range)
    gram_dtype: torch.dtype  # the Gram matrices' storage

    @property
    def lowp(self) -> bool:
        return self.DOT_PREC == "lowp"

    def constexprs(self, backward: bool) -> dict:
        out = dict(DOT_PREC=self.DOT_PREC, GRAM_PREC=self.GRAM_PREC)
        if backward:
            out["DGRAM_PREC"] = self.DGRAM_PREC
        return out


def precision_for(dtype: torch.dtype) -> Precision:
    """fp32: IEEE products (TF32 only with $LLIP_KERNELS_ALLOW_TF32=1). bf16: G kept in bf16 (same range as
    fp32). fp16: G in fp32 with TF32 products, because ||z||^2-sized entries can overflow fp16."""
    prec = "tf32" if settings.allow_tf32() else "ieee"
    if dtype == torch.float32:
        return Precision(prec, prec, prec, torch.float32)
    if dtype == torch.bfloat16:
        return Precision("lowp", "lowp", "tf32", torch.bfloat16)
    return Precision("lowp", "tf32", "tf32", torch.float32)


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
    ``G_i = V'_i V'_i^T`` -> ``[Bi, HK, HK]`` in ``gram_dtype`` (:mod:`llip_kernels.algebra`). Plain differentiable
    torch in fp32: autograd carries dU back to y, w_out and dG back to v, w_out."""
    Bi, H, K, d = v.shape
    wf = w_out.float()
    u = text_projection(y.float(), wf)  # [Bt, D]
    return u.view(-1, H, d).to(v.dtype), gram_matrices(v.float(), wf).to(gram_dtype)


# The backward pass launches the kernel in one of three passes (kernels_backward.py); default: one "atomic" pass,
# deterministic mode: an "image" pass then a "text" pass.
ATOMIC_PASSES = ("atomic",)
DETERMINISTIC_PASSES = ("image", "text")


def float64_pointers(kernel: str, op: Op) -> tuple[str, ...]:
    """The pointer arguments of float64 buffers (the long sums: gradients, the losses' statistics); the others are
    float32 or the inputs' dtype. The ahead-of-time compile table (:mod:`.aot`) types the signature from this."""
    if kernel == "forward":
        return () if op == Op.LOGITS else ("out_ptr",)
    return ("dk_ptr", "dv_ptr", "dq_ptr", "du_ptr", "dgram_ptr", "dtb_ptr")


def unused_pointers(kernel: str, op: Op, pass_: str | None = None) -> tuple[str, ...]:
    """The pointer arguments a launch passes as None, so the compiled variant has no pointer it never uses. The
    launcher and the ahead-of-time compile table (:mod:`.aot`) both take them from here."""
    unused = []
    if kernel == "backward":
        if op != Op.SOFTMAX_LOSS:
            unused += ["lse_row_ptr", "lse_col_ptr"]
        if pass_ == "image":
            unused += ["dq_ptr", "du_ptr"]
        if pass_ == "text":
            unused += ["dk_ptr", "dv_ptr", "dgram_ptr", "dtb_ptr"]
    return tuple(unused)


def launch_constexprs(H: int, K: int, d: int, cfg: TileConfig, prec: Precision, backward: bool) -> dict:
    """Shape, tile and precision constexprs shared by the kernels of one launch."""
    return dict(H=H, K=K, d=d, BT=cfg.BT, BK=cfg.BK, BD=cfg.BD, BG=cfg.BG, **prec.constexprs(backward))


class _ForwardLaunch:
    """Launches of :func:`.kernels.forward_kernel` over one call's operands (image- or text-stationary)."""

    def __init__(self, k, v, q, u, gram, t, b, tau: float, op: Op):
        Bi, H, K, d = k.shape
        prec = precision_for(k.dtype)
        self.cfg = tile_config(H, K, d, q.shape[0], capability=_capability(k.device), lowp=prec.lowp)
        self.operands = dict(q_ptr=q, k_ptr=k, u_ptr=u, v_ptr=v, gram_ptr=gram, t_ptr=t, b_ptr=b)
        self.sizes = dict(Bi=Bi, Bt=q.shape[0], scale2=_LOG2E / tau, OP=op.code)
        self.constexprs = launch_constexprs(H, K, d, self.cfg, prec, backward=False)
        self.scratch_per_program = self.cfg.BT * H * K  # floats: one [BT, HK] block of softmax weights
        self.device = k.device

    def __call__(self, out: torch.Tensor, *, n_outer: int, n_split: int, text_stationary: bool) -> None:
        grid = _grid(n_outer * n_split, self.device)
        scratch = torch.empty(grid * self.scratch_per_program, dtype=torch.float32, device=self.device)
        forward_kernel[(grid,)](
            **self.operands,
            out_ptr=out,
            scratch_ptr=scratch,
            n_split=n_split,
            TEXT_STATIONARY=text_stationary,
            **self.sizes,
            **self.constexprs,
            **self.cfg.launch_options(),
        )


# The pair work as torch.library custom ops (llip_kernels._custom_ops): opaque to torch.compile, with shape-only fake
# twins and a backward that is a custom op too.
Tensor = torch.Tensor


def _pairs(
    k: Tensor, v: Tensor, q: Tensor, u: Tensor, gram: Tensor, t: Tensor, b: Tensor, op: str, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair work of the three ops over precomputed ``u`` and ``gram`` -> ``(result, lse_row, lse_col)``.

    ``Op.LOGITS`` -> ``[Bi, Bt]`` logits; ``Op.SIGMOID_LOSS`` -> ``sum_ij softplus(t*cos_ij + b)``;
    ``Op.SOFTMAX_LOSS`` -> ``(mean_i lse_row_i + mean_j lse_col_j) / 2`` of ``t*cos``, with the row and column
    log-sum-exps (``[Bi]``, ``[Bt]``; empty for the other ops) that the backward pass needs. Nothing else is kept:
    the backward recomputes every tile.
    """
    op = Op(op)
    k, v, q, u, gram = (x.contiguous() for x in (k, v, q, u, gram))
    Bi, Bt = k.shape[0], q.shape[0]
    f32 = dict(dtype=torch.float32, device=k.device)
    f64 = dict(dtype=torch.float64, device=k.device)  # the losses' statistics: long sums, kept in float64
    launch = _ForwardLaunch(k, v, q, u, gram, t, b, tau, op)
    n_text_blocks = triton_cdiv(Bt, launch.cfg.BT)
    n_split = _split(Bi, n_text_blocks, k.device)
    per_item = {Op.LOGITS: None, Op.SIGMOID_LOSS: 1, Op.SOFTMAX_LOSS: 2}[op]  # statistics per work item
    out = torch.empty(Bi, Bt, **f32) if per_item is None else torch.empty(Bi * n_split * per_item, **f64)
    launch(out, n_outer=Bi, n_split=n_split, text_stationary=False)
    lse_row, lse_col = (k.new_empty(0, dtype=torch.float32) for _ in range(2))  # the softmax loss's statistics
    if op == Op.SIGMOID_LOSS:
        out = out.sum().float()
    elif op == Op.SOFTMAX_LOSS:
        stat = out.view(Bi, n_split, 2)
        lse_row = _merge_lse(stat[..., 0], stat[..., 1])  # [Bi]
        n_split_t = _split(n_text_blocks, Bi, k.device)
        stat_t = torch.empty(n_split_t, 2, Bt, **f64)
        launch(stat_t, n_outer=n_text_blocks, n_split=n_split_t, text_stationary=True)
        lse_col = _merge_lse(stat_t[:, 0].t(), stat_t[:, 1].t())  # [Bt]
        out = (0.5 * (lse_row.mean() + lse_col.mean())).float()
        lse_row, lse_col = lse_row.float(), lse_col.float()
    return out, lse_row, lse_col


def _pairs_backward(
    gout: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    u: Tensor,
    gram: Tensor,
    t: Tensor,
    b: Tensor,
    lse_row: Tensor,
    lse_col: Tensor,
    op: str,
    tau: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_pairs`' result w.r.t. ``(k, v, q, u, gram, t, b)`` (``db`` is 0 for the softmax loss)."""
    op = Op(op)
    k, v, q, u, gram = (x.contiguous() for x in (k, v, q, u, gram))
    Bi, H, K, d = k.shape
    Bt = q.shape[0]
    dev = k.device
    prec = precision_for(k.dtype)
    f32 = dict(dtype=torch.float32, device=dev)
    f64 = dict(dtype=torch.float64, device=dev)  # every gradient is a long sum: float64 accumulators
    dk, dv = torch.zeros(k.shape, **f64), torch.zeros(v.shape, **f64)
    dq, du = torch.zeros(q.shape, **f64), torch.zeros(u.shape, **f64)
    dgram = torch.zeros(gram.shape, **f64)
    if op == Op.LOGITS:
        gout = gout.contiguous().float()  # [Bi, Bt]
    else:  # the loss's 0-dim cotangent; the softmax loss's lse part carries a 1/2 and a 1/B
        gout = (gout.float() * (0.5 / Bi if op == Op.SOFTMAX_LOSS else 1.0)).reshape(())
    deterministic = settings.deterministic_requested()
    dt = db = torch.zeros((), **f64)
    for pass_ in DETERMINISTIC_PASSES if deterministic else ATOMIC_PASSES:
        text_pass = pass_ == "text"
        cfg = tile_config(H, K, d, Bt, backward=True, capability=_capability(dev), lowp=prec.lowp, text_pass=text_pass)
        n_text_blocks = triton_cdiv(Bt, cfg.BT)
        n_split = 1 if pass_ != "atomic" else _split(Bi, n_text_blocks, dev)
        grid = _grid((n_text_blocks if text_pass else Bi) * n_split, dev)
        dtb = None if text_pass else torch.empty(Bi * n_split, 2, **f64)  # dt, db per work item
        pointers = dict(
            gout_ptr=gout,
            lse_row_ptr=lse_row,
            lse_col_ptr=lse_col,
            dk_ptr=dk,
            dv_ptr=dv,
            dq_ptr=dq,
            du_ptr=du,
            dgram_ptr=dgram,
            dtb_ptr=dtb,
        )
        for name in unused_pointers("backward", op, pass_):
            pointers[name] = None
        backward_kernel[(grid,)](
            q_ptr=q,
            k_ptr=k,
            u_ptr=u,
            v_ptr=v,
            gram_ptr=gram,
            t_ptr=t,
            b_ptr=b,
            **pointers,
            scratch_ptr=torch.empty(grid * 2 * cfg.BT * H * K, **f32),
            Bi=Bi,
            Bt=Bt,
            scale2=_LOG2E / tau,
            inv_tau=1.0 / tau,
            n_split=n_split,
            OP=op.code,
            PASS=pass_,
            **launch_constexprs(H, K, d, cfg, prec, backward=True),
            **cfg.launch_options(),
        )
        if not text_pass:
            dt, db = dtb.sum(0).unbind(0)
    return (
        dk.to(k.dtype),
        dv.to(v.dtype),
        dq.to(q.dtype),
        du.to(u.dtype),
        dgram.to(gram.dtype),
        dt.reshape(t.shape).to(t.dtype),  # dt and db: views of one float64 tensor, here separate float32 ones
        torch.zeros_like(b) if op == Op.SOFTMAX_LOSS else db.reshape(b.shape).to(b.dtype),
    )


def _pairs_fake(k, v, q, u, gram, t, b, op, tau):
    Bi, Bt = k.shape[0], q.shape[0]
    out = k.new_empty((Bi, Bt) if Op(op) == Op.LOGITS else (), dtype=torch.float32)
    if Op(op) == Op.SOFTMAX_LOSS:
        return out, k.new_empty(Bi, dtype=torch.float32), k.new_empty(Bt, dtype=torch.float32)
    return out, k.new_empty(0, dtype=torch.float32), k.new_empty(0, dtype=torch.float32)


def _pairs_backward_fake(gout, k, v, q, u, gram, t, b, lse_row, lse_col, op, tau):
    return tuple(torch.empty_like(x) for x in (k, v, q, u, gram, t, b))


triton_pairs = define("triton_pairs", _pairs, fake=_pairs_fake)
triton_pairs_backward = define("triton_pairs_backward", _pairs_backward, fake=_pairs_backward_fake)
differentiate_with(triton_pairs, triton_pairs_backward, tensor_inputs=7, saved_outputs=(1, 2))


_LOG2E = 1.4426950408889634  # exp(s / tau) = exp2(s * log2(e) / tau): the kernels use exp2


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Combine partial (max, sum of exp) pairs along the last dim -> log-sum-exp."""
    mx = m.max(dim=-1).values
    return mx + torch.log((s * torch.exp(m - mx.unsqueeze(-1))).sum(-1))


def _pairs(k, v, q, y, w_out, t, b, tau, op: Op):
    prec = precision_for(k.dtype)
    u, gram = precompute(v, y, w_out, prec.gram_dtype)
    return triton_pairs(k, v, q, u, gram, t, b, Op(op).value, tau)[0]


def _aligned_logits(k, v, q, y, w_out, t, b, tau, rows, cols):
    """Logits of the listed pairs only (O(len(rows)) memory), in fp32 with plain torch autograd."""
    z = mix_aligned(k[rows].float(), v[rows].float(), q[cols].float(), w_out.float(), tau)  # [P, D]
    cos = (F.normalize(z, dim=-1) * F.normalize(y[cols].float(), dim=-1)).sum(-1)
    return t * cos + b


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
    return _pairs(k, v, q, y, w_out, t, b, tau, Op.LOGITS)


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    """``(sum_ij softplus(x_ij) - sum_pos x_pos) / Bi``: -log sigmoid(x) = softplus(x) - x on positives, so the
    kernel treats every pair as a negative and the few positives are corrected here in O(Bi)."""
    Bi, Bt = k.shape[0], q.shape[0]
    total = _pairs(k, v, q, y, w_out, t, b, tau, Op.SIGMOID_LOSS)
    rows = positives(Bi, Bt, pos_offset)
    if len(rows):
        idx = torch.arange(rows.start, rows.stop, device=k.device)
        total = total - _aligned_logits(k, v, q, y, w_out, t, b, tau, idx, idx + pos_offset).sum()
    return total / Bi


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    """``(mean lse_row + mean lse_col) / 2 - mean_i x_ii`` of ``x = t * cos`` (the symmetric InfoNCE)."""
    B = k.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=k.device)
    lse_part = _pairs(k, v, q, y, w_out, t, zero, tau, Op.SOFTMAX_LOSS)
    rows = torch.arange(B, device=k.device)
    return lse_part - _aligned_logits(k, v, q, y, w_out, t, zero, tau, rows, rows).mean()
