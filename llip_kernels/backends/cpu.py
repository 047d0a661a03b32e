"""Backend ``"cpu"``: fused C++ kernels (``csrc/cpu/``) for the Llip logits and losses, forward and backward.

Algebra: form 3 of docs/design.md section 4. Per pair the kernel evaluates ``cos = (sum_hk a c) / sqrt(a^T G_i a)``
with ``U_j = W_out @ y_hat_j`` (per text) and the per-image Gram matrix ``G_i = V'_i V'_i^T`` (per image), at
``4KD + 2(HK)^2`` FLOPs per pair. For every paper config but B/32 that is the cheapest form (B/16: 0.20 vs
0.29 MFLOP for form 2 and 0.59 for form 1); for B/32 form 2 would be 10% cheaper, which we leave on the table to
keep one kernel. The ``2(HK)^2`` term grows fast with K (ablations reach K = 512), so calls with
``H*K > MAX_HK`` are refused with a reason and the ``torch`` backend takes them. The kernel forms each image's
Gram matrix from ``M = W_out W_out^T`` as it goes (per block of images, recomputed in the backward pass), so no
``Bi * (HK)^2`` tensor is kept.

Layers: the C++ extension (built lazily, see :mod:`llip_kernels._build`) exposes plain functions; this module
registers them as ``torch.library`` custom ops ``torch.ops.llip_kernels.cpu_*`` with fake implementations and
autograd (the backward passes are custom ops too; :mod:`llip_kernels._custom_ops`), so
``torch.compile(fullgraph=True)`` traces the public functions and ``torch.library.opcheck`` passes. Upcasting
bf16 / fp16 inputs to float32, ``U`` and ``M = W_out W_out^T`` are plain torch ops, so autograd carries their
gradients back to ``y`` and ``w_out``.

Importing this module builds nothing; the first call (or :func:`not_supported_reasons`) builds, and a failed
build (no compiler, no ninja) turns into a reason so dispatch falls back to the next backend.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .. import _build, settings
from .._custom_ops import define, differentiate_with
from .._validate import LlipProblem
from ..algebra import (
    PAIR_OPS,
    Op,
    gram_factor,
    gram_factor_flops,
    image_flops,
    pair_flops,
    pair_grad_flops,
    text_flops,
    text_projection,
)

EXT_NAME = "llip_cpu_ext"
MAX_HK = 1024  # beyond this the 2(HK)^2 per-pair term of form 3 dominates: forms 1/2 win
TILE_TEXTS = 256  # texts per tile: long, contiguous rows for the vectorised loops
TILE_FLOATS = 1 << 19  # floats per scratch buffer (4 of them): 2 MiB each, near L2 size
# With bf16 products, a quarter of that: their GEMMs run twice as fast, so cache misses weigh twice as much, and
# besides the float32 tiles each tile has bf16 copies of a, dS, ddot a, dn2 a in two layouts. Measured at the
# B/16 head (Bi = Bt = 1024, fwd + bwd, 2 threads, interleaved in one process): 2 x 256 tiles 2.0-2.1 s,
# 8 x 256 2.3-2.5 s (float32 products: no gain from smaller tiles, 4.6-4.8 s either way).
TILE_FLOATS_BF16 = 1 << 17
# Texts per backward pass (rounded down to whole tiles): each thread keeps partial sums of dQ and dU for one pass,
# 2 * TEXTS_PER_PASS * D doubles (64 MiB at D = 512), instead of for all Bt texts; each extra pass recomputes the
# per-image Gram matrices, about 1.5% of a pass's pair work at B/16.
TEXTS_PER_PASS = 8192
FUSED_TRAINING_OPS = (Op.SIGMOID_LOSS,)  # under autograd, one sweep computes the loss and its gradients
FLOP_FORM = "cpu: form 3, 4KD + 2(HK)^2 per pair fwd, 8KD + 2(HK)^2 bwd, + Gram matrices from M = W W^T"


# ----------------------------------------------------------------------------------------------------------------
# Building


def _sources() -> list[Path]:
    root = _build.source_dir("cpu")
    return [root / "llip_cpu.cpp", root / "bf16_products.cpp"] if root is not None else []


@functools.cache
def _cpu_flags() -> tuple[str, ...]:
    """-O3, vectorisation of our ``omp simd`` loops, and AVX2/FMA and AVX-512 (F, BW, VL, DQ) only when this CPU
    has them (checked at run time, and part of the build hash, so a cache shared with an older CPU never hands it
    a binary it cannot run). AVX-512 made the B/16 calls about 5% faster in both dtypes (alternating builds)."""
    # -fopenmp, not just -fopenmp-simd: at::parallel_for is a header template whose `omp parallel` pragma is
    # compiled into this extension; without the flag it silently runs every image block on one thread
    # (tests/kernels/test_cpu.py::test_kernel_really_runs_on_several_threads).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    words = set(cpuinfo.split())
    if {"avx2", "fma"} <= words:
        flags += ["-mavx2", "-mfma"]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= words:
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return tuple(flags)


def kernel_threads() -> int:
    """Threads the kernel runs on: ``$LLIP_CPU_THREADS``, else torch's current setting.

    Image blocks are spread over the threads in one parallel region (the GEMMs inside it run single-threaded), so
    the kernel scales with cores: B/16, Bi = Bt = 512, sigmoid loss forward+backward on 2 idle cores took 0.81 s
    on 2 threads and 1.47 s on 1. On a machine shared with other busy jobs, fewer threads than cores can be
    faster (a fork-join waits for its slowest thread): set the variable then.
    """
    return settings.cpu_threads()


@contextlib.contextmanager
def _kernel_threads():
    """Run the kernel on :func:`kernel_threads` intra-op threads, restoring torch's setting after."""
    want = kernel_threads()
    have = torch.get_num_threads()
    if want == have:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(have)


def extension():
    """The compiled module (built on first use); raises :class:`llip_kernels._build.ExtensionBuildError`."""
    sources = _sources()
    if not sources:
        raise _build.ExtensionBuildError("cannot build the cpu backend: csrc/cpu/ not found next to llip_kernels")
    # No -fopenmp when linking: the OpenMP calls then resolve to the runtime torch itself loaded (some torch
    # wheels ship libgomp under a hashed name), never to a second copy with its own thread pool.
    return _build.load_extension(EXT_NAME, sources, extra_cflags=list(_cpu_flags()))


def _pair_forward(op: Op, k, v, q, u, m, *, t=None, b=None, tau: float, pos_offset=None, tiles, bf16: bool):
    """One forward sweep of the kernel (see ``pair_forward`` in ``csrc/cpu/llip_cpu.cpp``); ``bf16``: every
    product takes bf16 operands (see :func:`bf16_products`)."""
    images_per_tile, texts_per_tile = tiles
    with _kernel_threads():
        return extension().pair_forward(
            op=op.code,
            k=k,
            v=v,
            q=q,
            u=u,
            m=m,
            t=t,
            b=b,
            tau=tau,
            pos_offset=pos_offset,
            images_per_tile=images_per_tile,
            texts_per_tile=texts_per_tile,
            bf16_products=bf16,
        )


def _pair_backward(
    op: Op,
    grad,
    k,
    v,
    q,
    u,
    m,
    *,
    t=None,
    b=None,
    lse=(None, None),
    tau,
    pos_offset=None,
    tiles,
    bf16: bool,
    with_loss=False,
):
    """One backward sweep -> ``[dk, dv, dq, du, dm, dt, db, loss]`` (``loss`` only ``with_loss``, else 0)."""
    images_per_tile, texts_per_tile = tiles
    with _kernel_threads():
        return extension().pair_backward(
            op=op.code,
            grad=grad,
            k=k,
            v=v,
            q=q,
            u=u,
            m=m,
            t=t,
            b=b,
            lse_row=lse[0],
            lse_col=lse[1],
            tau=tau,
            pos_offset=pos_offset,
            images_per_tile=images_per_tile,
            texts_per_tile=texts_per_tile,
            with_loss=with_loss,
            texts_per_pass=TEXTS_PER_PASS,
            bf16_products=bf16,
        )


# ----------------------------------------------------------------------------------------------------------------
# Backend interface (llip_kernels.backends.Backend)


def environment_reasons() -> list[str]:
    """What stops this backend on this machine, without building: a remembered build failure, missing tools."""
    failed = _build.cached_failure(EXT_NAME)
    if failed:
        return [failed]
    if not _sources():
        return ["csrc/cpu/ not found next to llip_kernels (install from a source checkout)"]
    return _build.missing_tools()


@torch.compiler.assume_constant_result
def _build_failure() -> str:
    """Build now if needed; '' when the extension is usable, else the reason. A constant for torch.compile."""
    try:
        extension()
    except _build.ExtensionBuildError as e:
        return str(e)
    return ""


def not_supported_reasons(problem: LlipProblem) -> list[str]:
    reasons = []
    if problem.device.type != "cpu":
        reasons.append(f"runs on CPU tensors only, got {problem.device.type}")
    if problem.op not in PAIR_OPS:
        reasons.append(f"does not implement {problem.op}")
    if problem.dtype == torch.float64:
        reasons.append("computes in float32 (float64 inputs: backend 'torch' or 'reference' keep float64)")
    if problem.H * problem.K > MAX_HK:
        reasons.append(
            f"H*K = {problem.H * problem.K} > {MAX_HK}: form 3 would spend 2*(H*K)^2 = "
            f"{2 * (problem.H * problem.K) ** 2:.3g} FLOPs per pair on the norm alone (use backend 'torch')"
        )
    if reasons:
        return reasons
    failure = _build_failure()
    return [failure] if failure else []


def algebraic_form(problem: LlipProblem) -> int:
    return 3


def tile_sizes(Bi: int, Bt: int, H: int, K: int, bf16: bool = False) -> tuple[int, int]:
    """Images and texts per tile: scratch is 4 buffers of H*K*Ti*Tj floats, never Bi*Bt*K for large batches.
    ``bf16``: sized for the bf16 products."""
    tj = max(1, min(Bt, TILE_TEXTS))
    ti = max(1, min(Bi, (TILE_FLOATS_BF16 if bf16 else TILE_FLOATS) // (H * K * tj)))
    return ti, tj


def workspace_floats(Bi: int, Bt: int, H: int, K: int, bf16: bool = False) -> int:
    """Float32 scratch the kernel allocates per call besides inputs and gradients (tiles + per-pair rows)."""
    ti, tj = tile_sizes(Bi, Bt, H, K, bf16)
    return 4 * H * K * ti * tj + 4 * ti * tj


def flops(op: str, Bi: int, Bt: int, H: int, K: int, d: int, backward: bool = False) -> float:
    """FLOPs this backend performs for ``op`` (matmul-like work of form 3): the forward pass, or the backward
    work alone when ``backward`` (a training step costs the sum).

    Pair work, forward: ``Bi*Bt*(4KD + 2(HK)^2)``. Backward: dK, dQ, dV, dU (8KD) and dG (2(HK)^2) per pair,
    plus the forward recomputed, except for the ops in ``FUSED_TRAINING_OPS``, whose gradients come out of the
    forward sweep itself (that work then runs inside the forward call). Per-image Gram matrices from
    ``M = W W^T`` (``2KD^2 + 2(HK)^2 d``), per-text ``U_j`` (``2D^2``) and ``M`` (``2D^3``): their backward costs
    twice their forward (plus the recomputation of the Gram matrices where the pair work is recomputed).

    This is the form-3 FLOP model, which speeds are counted with. The kernel itself does a little less: dG is
    symmetric, so it computes dG's lower block triangle only (rows in blocks of 64, each up to its diagonal block:
    62.5% of ``2(HK)^2`` at HK = 256: 11% fewer pair FLOPs in a B/16 training sweep, 9% of the whole call at
    Bi = Bt = 1024).
    """
    if op not in PAIR_OPS:
        raise ValueError(f"unknown op {op!r}")
    pairs = float(Bi) * Bt
    side = Bi * image_flops(3, H, K, d, gram_from_m=True) + Bt * text_flops(3, H, d) + gram_factor_flops(H * d)
    fwd = pairs * pair_flops(3, H, K, d) + side
    if not backward:
        return fwd
    bwd = pairs * pair_grad_flops(H, K, d) + 2 * side
    return bwd if op in FUSED_TRAINING_OPS else bwd + fwd


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (llip_kernels._custom_ops). Tensor arguments are float32 (k, v, q may be bf16 with bf16 products); tau,
# pos_offset and the tile sizes are plain values. ``m`` is M = W_out W_out^T, from which the kernel forms the Gram
# matrices.

Tensor = torch.Tensor
Grads5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # dk, dv, dq, du, dm
Grads6 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # ... + dt
Grads7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # ... + dt, db


def _grads_like(*xs: Tensor) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(x) for x in xs)


def _cos(k: Tensor, v: Tensor, q: Tensor, u: Tensor, m: Tensor, tau: float, ti: int, tj: int, bf16: bool) -> Tensor:
    """``cos(z_ij, y_j)`` for every pair -> ``[Bi, Bt]`` float32."""
    return _pair_forward(Op.LOGITS, k, v, q, u, m, tau=tau, tiles=(ti, tj), bf16=bf16)[0]


def _cos_backward(
    dcos: Tensor, k: Tensor, v: Tensor, q: Tensor, u: Tensor, m: Tensor, tau: float, ti: int, tj: int, bf16: bool
) -> Grads5:
    return tuple(_pair_backward(Op.LOGITS, dcos, k, v, q, u, m, tau=tau, tiles=(ti, tj), bf16=bf16)[:5])


cpu_cos = define("cpu_cos", _cos, fake=lambda k, v, q, u, m, *_: u.new_empty(k.shape[0], q.shape[0]))
cpu_cos_backward = define(
    "cpu_cos_backward", _cos_backward, fake=lambda dcos, k, v, q, u, m, *_: _grads_like(k, v, q, u, m)
)
differentiate_with(cpu_cos, cpu_cos_backward, tensor_inputs=5)


def _sigmoid_loss(
    k: Tensor,
    v: Tensor,
    q: Tensor,
    u: Tensor,
    m: Tensor,
    t: Tensor,
    b: Tensor,
    tau: float,
    pos_offset: int | None,
    ti: int,
    tj: int,
    bf16: bool,
) -> Tensor:
    """SigLIP loss ``-(1/Bi) sum_ij log sigmoid(l_ij (t cos_ij + b))`` -> ``[]`` float32."""
    loss = _pair_forward(
        Op.SIGMOID_LOSS, k, v, q, u, m, t=t, b=b, tau=tau, pos_offset=pos_offset, tiles=(ti, tj), bf16=bf16
    )
    return loss[0]


def _sigmoid_sweep(grad, k, v, q, u, m, t, b, tau, pos_offset, ti, tj, bf16, *, with_loss):
    """The kernel's backward sweep for the sigmoid loss -> ``[dk, dv, dq, du, dm, dt, db, loss]``."""
    return _pair_backward(
        Op.SIGMOID_LOSS,
        grad,
        k,
        v,
        q,
        u,
        m,
        t=t,
        b=b,
        tau=tau,
        pos_offset=pos_offset,
        tiles=(ti, tj),
        bf16=bf16,
        with_loss=with_loss,
    )


def _sigmoid_loss_backward(
    grad: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    u: Tensor,
    m: Tensor,
    t: Tensor,
    b: Tensor,
    tau: float,
    pos_offset: int | None,
    ti: int,
    tj: int,
    bf16: bool,
) -> Grads7:
    return tuple(_sigmoid_sweep(grad, k, v, q, u, m, t, b, tau, pos_offset, ti, tj, bf16, with_loss=False)[:7])


cpu_sigmoid_loss = define("cpu_sigmoid_loss", _sigmoid_loss, fake=lambda k, v, q, u, *_: u.new_empty(()))
cpu_sigmoid_loss_backward = define(
    "cpu_sigmoid_loss_backward",
    _sigmoid_loss_backward,
    fake=lambda grad, k, v, q, u, m, t, b, *_: (*_grads_like(k, v, q, u, m), t.new_empty(()), b.new_empty(())),
)
differentiate_with(cpu_sigmoid_loss, cpu_sigmoid_loss_backward, tensor_inputs=7)


def _sigmoid_loss_fused(
    k: Tensor,
    v: Tensor,
    q: Tensor,
    u: Tensor,
    m: Tensor,
    t: Tensor,
    b: Tensor,
    tau: float,
    pos_offset: int | None,
    ti: int,
    tj: int,
    bf16: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sigmoid loss and its gradients for a cotangent of 1 in one sweep -> ``(loss, dk, dv, dq, du, dm, dt,
    db)``. Training path: each pair's dLoss/dlogit depends on its own logit only, so the backward pass needs no
    recomputation of the forward tiles (the forward's FLOPs are paid once instead of twice). The gradients are
    O(Bi + Bt) tensors, the size of the inputs; autograd scales them by the real cotangent."""
    out = _sigmoid_sweep(k.new_ones(()), k, v, q, u, m, t, b, tau, pos_offset, ti, tj, bf16, with_loss=True)
    return (out[7], *out[:7])


cpu_sigmoid_loss_fused = define(
    "cpu_sigmoid_loss_fused",
    _sigmoid_loss_fused,
    fake=lambda k, v, q, u, m, t, b, *_: (
        u.new_empty(()),
        *_grads_like(k, v, q, u, m),
        t.new_empty(()),
        b.new_empty(()),
    ),
)


def _fused_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _fused_backward(ctx, grad, *_grads_of_grads):
    # The gradients were computed in the forward sweep for a cotangent of 1: scale them, nothing to recompute.
    if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants, so refuse, not lie
        raise RuntimeError(
            "llip cpu backend: the fused sigmoid loss has no second derivative (backward(create_graph=True), "
            "gradient penalties); use backend='torch' or 'reference' for higher-order gradients"
        )
    return (*(g * grad for g in ctx.saved_tensors), None, None, None, None, None)  # tau, pos_offset, ti, tj, bf16


cpu_sigmoid_loss_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


def _softmax_loss(
    k: Tensor, v: Tensor, q: Tensor, u: Tensor, m: Tensor, t: Tensor, tau: float, ti: int, tj: int, bf16: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric InfoNCE -> ``(loss [], lse_row [B], lse_col [B])``; the log-sum-exps feed the backward pass."""
    loss, lse_row, lse_col = _pair_forward(Op.SOFTMAX_LOSS, k, v, q, u, m, t=t, tau=tau, tiles=(ti, tj), bf16=bf16)
    return loss, lse_row, lse_col


def _softmax_loss_backward(
    grad: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    u: Tensor,
    m: Tensor,
    t: Tensor,
    lse_row: Tensor,
    lse_col: Tensor,
    tau: float,
    ti: int,
    tj: int,
    bf16: bool,
) -> Grads6:
    lse = (lse_row, lse_col)
    out = _pair_backward(Op.SOFTMAX_LOSS, grad, k, v, q, u, m, t=t, lse=lse, tau=tau, tiles=(ti, tj), bf16=bf16)
    return tuple(out[:6])


cpu_softmax_loss = define(
    "cpu_softmax_loss",
    _softmax_loss,
    fake=lambda k, v, q, u, *_: (u.new_empty(()), u.new_empty(k.shape[0]), u.new_empty(q.shape[0])),
)
cpu_softmax_loss_backward = define(
    "cpu_softmax_loss_backward",
    _softmax_loss_backward,
    fake=lambda grad, k, v, q, u, m, t, *_: (*_grads_like(k, v, q, u, m), t.new_empty(())),
)
differentiate_with(cpu_softmax_loss, cpu_softmax_loss_backward, tensor_inputs=6, saved_outputs=(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def bf16_products(dtype: torch.dtype) -> bool:
    """Whether inputs of ``dtype`` take the kernel's bf16 products: bf16 operands into every pair product (scores,
    value scores, ``G_i a`` and the gradient products) with float32 accumulation, on oneDNN's bf16 GEMM
    micro-kernel. Only bfloat16 inputs do, and only where that micro-kernel runs (AVX512-BF16 or AMX CPUs); float16
    inputs are converted to float32 instead (exactly: bf16 operands would drop 3 of their mantissa bits, and the
    CPUs at hand have no fast fp16 products), as are bf16 inputs on other CPUs."""
    return dtype == torch.bfloat16 and _bf16_products_available()


@torch.compiler.assume_constant_result
def _bf16_products_available() -> bool:
    """The extension's one-time check of the bf16 micro-kernel (False when the extension does not build)."""
    try:
        return bool(extension().bf16_products_available())
    except _build.ExtensionBuildError:
        return False


def _prepare(k, v, q, y, w_out):
    """The kernel's inputs plus the per-text ``U = y_hat W_out^T: [Bt, H, d]`` and ``M = W_out W_out^T: [D, D]``
    (from which the kernel forms each image's Gram matrix as it goes), the tile sizes and whether the products take
    bf16 operands. Plain torch: autograd carries dU and dM back, and the gradients of float32 copies back to the
    inputs' dtype. ``k``, ``v``, ``q`` go to the kernel as float32 copies, except bf16 ones that take the bf16
    products: the kernel reads those as they are (converting each image block once as it makes it head-major) and
    returns their gradients in bf16, which saves two passes over the largest tensors."""
    Bi, H, K, d = k.shape
    bf16 = bf16_products(k.dtype)
    native = bf16 and v.dtype == torch.bfloat16
    kf, vf = (x.contiguous() if native else x.float().contiguous() for x in (k, v))
    qf = q.contiguous() if bf16 and q.dtype == torch.bfloat16 else q.float().contiguous()
    wf = w_out.float()
    u = text_projection(y.float(), wf).view(q.shape[0], H, d)
    ti, tj = tile_sizes(Bi, q.shape[0], H, K, bf16)
    return kf, vf, qf, u, gram_factor(wf), ti, tj, bf16


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
    """``t * cos(z_ij, y_j) + b`` -> ``[Bi, Bt]`` float32 (the only Bi*Bt tensor: it is the output)."""
    kf, vf, qf, u, m, ti, tj, bf16 = _prepare(k, v, q, y, w_out)
    return t * cpu_cos(kf, vf, qf, u, m, tau, ti, tj, bf16) + b


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    """Forward only when no gradient is wanted; otherwise the fused forward+backward sweep (see
    :func:`_sigmoid_loss_fused`): a loss computed under autograd but never backpropagated then costs one
    backward pass more than needed, the trade Liger-style fused losses make too."""
    kf, vf, qf, u, m, ti, tj, bf16 = _prepare(k, v, q, y, w_out)
    wants_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (kf, vf, qf, u, m, t, b))
    if wants_grad:
        return cpu_sigmoid_loss_fused(kf, vf, qf, u, m, t, b, tau, pos_offset, ti, tj, bf16)[0]
    return cpu_sigmoid_loss(kf, vf, qf, u, m, t, b, tau, pos_offset, ti, tj, bf16)


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    kf, vf, qf, u, m, ti, tj, bf16 = _prepare(k, v, q, y, w_out)
    return cpu_softmax_loss(kf, vf, qf, u, m, t, tau, ti, tj, bf16)[0]
