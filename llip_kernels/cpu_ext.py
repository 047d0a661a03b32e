"""Backend ``"cpu"``: fused C++ kernels (``csrc/cpu/``) for the Llip logits and losses, forward and backward.

Algebra: SPEC section 4, form 3. Per pair the kernel evaluates ``cos = (sum_hk a c) / sqrt(a^T G_i a)`` with
``U_j = W_out @ y_hat_j`` (per text) and the per-image Gram matrix ``G_i = V'_i V'_i^T`` (per image), at
``4KD + 2(HK)^2`` FLOPs per pair. For every paper config but B/32 that is the cheapest form (B/16: 0.20 vs
0.29 MFLOP for form 2 and 0.59 for form 1); for B/32 form 2 would be 10% cheaper, which we leave on the table to
keep one kernel. The ``2(HK)^2`` term grows fast with K (ablations reach K = 512), so calls with
``H*K > MAX_HK`` are refused with a reason and the ``torch`` backend takes them. The kernel forms each image's
Gram matrix from ``M = W_out W_out^T`` as it goes (per block of images, recomputed in the backward pass), so no
``Bi * (HK)^2`` tensor is kept.

Layers: the C++ extension (built lazily, see :mod:`llip_kernels._build`) exposes plain functions; this module
wraps them as ``torch.library`` custom ops ``torch.ops.llip_kernels.cpu_*`` with fake implementations and
registered autograd (the backward passes are custom ops too), so ``torch.compile(fullgraph=True)`` traces the
public functions and ``torch.library.opcheck`` passes. Upcasting bf16 / fp16 inputs to float32, ``U`` and
``M = W_out W_out^T`` are plain torch ops, so autograd carries their gradients back to ``y`` and ``w_out``.

Importing this module builds nothing; the first call (or :func:`not_supported_reasons`) builds, and a failed
build (no compiler, no ninja) turns into a reason so dispatch falls back to the next backend.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _build
from ._validate import LlipProblem
from .testing import form_flops

EXT_NAME = "llip_cpu_ext"
MAX_HK = 1024  # beyond this the 2(HK)^2 per-pair term of form 3 dominates: forms 1/2 win
TILE_TEXTS = 256  # texts per tile: long, contiguous rows for the vectorised loops
TILE_FLOATS = 1 << 19  # floats per scratch buffer (4 of them): 2 MiB each, near L2 size
# Texts per backward pass (rounded down to whole tiles): each thread keeps partial sums of dQ and dU for one pass,
# 2 * TEXTS_PER_PASS * D floats (32 MiB at D = 512), instead of for all Bt texts; each extra pass recomputes the
# per-image Gram matrices, about 1.5% of a pass's pair work at B/16.
TEXTS_PER_PASS = 8192

ENV_THREADS = "LLIP_CPU_THREADS"  # threads of the kernel (default: torch's; see _kernel_threads)

_MODE_COS, _MODE_SIGMOID, _MODE_SOFTMAX = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# Building


def _sources() -> list[Path]:
    root = _build.source_dir("cpu")
    return [root / "llip_cpu.cpp"] if root is not None else []


@functools.cache
def _cpu_flags() -> tuple[str, ...]:
    """-O3, vectorisation of our ``omp simd`` loops, and AVX2/FMA only when this CPU has them (checked at run
    time, and part of the build hash, so a cache shared with an older CPU never hands it an AVX2 binary)."""
    # -fopenmp, not just -fopenmp-simd: at::parallel_for is a header template whose `omp parallel` pragma is
    # compiled into this extension; without the flag it silently runs every image block on one thread
    # (tests/test_cpu_ops.py::test_kernel_really_runs_on_several_threads).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    words = set(cpuinfo.split())
    if {"avx2", "fma"} <= words:
        flags += ["-mavx2", "-mfma"]
    return tuple(flags)


def kernel_threads() -> int:
    """Threads the kernel runs on: ``$LLIP_CPU_THREADS``, else torch's current setting.

    Image blocks are spread over the threads in one parallel region (the GEMMs inside it run single-threaded), so
    the kernel scales with cores: B/16, Bi = Bt = 512, sigmoid loss forward+backward on 2 idle cores took 0.81 s
    on 2 threads and 1.47 s on 1. On a machine shared with other busy jobs, fewer threads than cores can be
    faster (a fork-join waits for its slowest thread): set the variable then.
    """
    try:
        return max(1, int(os.environ.get(ENV_THREADS) or torch.get_num_threads()))
    except ValueError as e:
        raise ValueError(f"${ENV_THREADS} must be a positive integer, got {os.environ[ENV_THREADS]!r}") from e


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


def _pair_forward(*args):
    with _kernel_threads():
        return extension().pair_forward(*args)


def _pair_backward(*args):
    with _kernel_threads():
        return extension().pair_backward(*args, TEXTS_PER_PASS)


def extension():
    """The compiled module (built on first use); raises :class:`llip_kernels._build.ExtensionBuildError`."""
    sources = _sources()
    if not sources:
        raise _build.ExtensionBuildError("cannot build the cpu backend: csrc/cpu/ not found next to llip_kernels")
    # No -fopenmp when linking: the OpenMP calls then resolve to the runtime torch itself loaded (some torch
    # wheels ship libgomp under a hashed name), never to a second copy with its own thread pool.
    return _build.load_extension(EXT_NAME, sources, extra_cflags=list(_cpu_flags()))


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


def not_supported_reasons(op: str, problem: LlipProblem) -> list[str]:
    reasons = []
    if problem.device.type != "cpu":
        reasons.append(f"runs on CPU tensors only, got {problem.device.type}")
    if op not in ("logits", "sigmoid_loss", "softmax_loss"):
        reasons.append(f"does not implement {op}")
    if problem.H * problem.K > MAX_HK:
        reasons.append(
            f"H*K = {problem.H * problem.K} > {MAX_HK}: form 3 would spend 2*(H*K)^2 = "
            f"{2 * (problem.H * problem.K) ** 2:.3g} FLOPs per pair on the norm alone (use backend 'torch')"
        )
    if reasons:
        return reasons
    failure = _build_failure()
    return [failure] if failure else []


# Automatic dispatch passes this backend over for the ``torch`` backend when the latter picks another algebraic
# form (1 or 2) for the shape and this backend's FLOPs (form 3, with its per-image Gram matrices) reach this
# multiple of the torch backend's. Measured on 2 idle cores (bench/results/dispatch_cpu_paper.json: 5 paper
# configs x Bi = Bt in {128, 256} x {forward, forward+backward}): where the forms differ, the time ratio
# cpu / torch is about 0.85x the FLOP ratio (the fused kernel runs its FLOPs faster), and 1.05 picks the faster
# backend in 18 of the 20 cases, losing 2% and 6% in the other two. Where both use form 3 the fused kernel wins
# whatever the FLOPs say (the llip-tiny head, K 8 H 4 D 128: 4.7-8.5x; B/16 at Bi = Bt = 1024: 2.6x), so no
# FLOP rule applies there.
AUTO_MAX_FLOP_RATIO = 1.05


def auto_skip_reasons(op: str, problem: LlipProblem) -> list[str]:
    """Why automatic dispatch should prefer the ``torch`` backend for this call (empty: run here).

    Form 3's per-image Gram matrices (``2HKdD + 2(HK)^2 d`` per image) only pay off when each image meets many
    texts, and its ``2(HK)^2`` per pair loses to forms 1 / 2 at K = 64 with D <= 768; the torch backend picks the
    cheapest form per shape."""
    from . import torch_chunked

    dims = (problem.Bi, problem.Bt, problem.H, problem.K, problem.d)
    form = torch_chunked.choose_form(op, problem.H, problem.K, problem.d, problem.Bi, problem.Bt)
    if form == 3:
        return []
    training = problem.requires_grad and torch.is_grad_enabled()

    def call_flops(model) -> float:  # the forward, plus the backward when gradients are wanted
        return model(op, *dims) + (model(op, *dims, True) if training else 0.0)

    ours, theirs = call_flops(flops), call_flops(torch_chunked.flops)
    if theirs <= 0 or ours < AUTO_MAX_FLOP_RATIO * theirs:
        return []
    return [
        f"the torch backend is predicted faster here: {ours:.3g} FLOPs in form 3 vs {theirs:.3g} in its form {form} "
        f"(automatic choice keeps cpu below {AUTO_MAX_FLOP_RATIO:.2f}x; backend='cpu' still runs it)"
    ]


def tile_sizes(Bi: int, Bt: int, H: int, K: int) -> tuple[int, int]:
    """Images and texts per tile: scratch is 4 buffers of H*K*Ti*Tj floats, never Bi*Bt*K for large batches."""
    tj = max(1, min(Bt, TILE_TEXTS))
    ti = max(1, min(Bi, TILE_FLOATS // (H * K * tj)))
    return ti, tj


def workspace_floats(Bi: int, Bt: int, H: int, K: int) -> int:
    """Float32 scratch the kernel allocates per call besides inputs and gradients (tiles + per-pair rows)."""
    ti, tj = tile_sizes(Bi, Bt, H, K)
    return 4 * H * K * ti * tj + 4 * ti * tj


FUSED_TRAINING_OPS = ("sigmoid_loss",)  # under autograd, one sweep computes the loss and its gradients


def flops(op: str, Bi: int, Bt: int, H: int, K: int, d: int, backward: bool = False) -> float:
    """FLOPs this backend performs for ``op`` (matmul-like work of form 3): the forward pass, or the backward
    work alone when ``backward`` (a training step costs the sum).

    Pair work, forward: ``Bi*Bt*(4KD + 2(HK)^2)``. Backward: dK, dQ, dV, dU (8KD) and dG (2(HK)^2) per pair,
    plus the forward recomputed, except for the ops in ``FUSED_TRAINING_OPS``, whose gradients come out of the
    forward sweep itself (that work then runs inside the forward call). Per-image Gram matrices
    (``2HKdD + 2(HK)^2 d``), per-text ``U_j`` (``2D^2``) and ``M = W W^T`` (``2D^3``): their backward costs
    twice their forward (plus the recomputation of the Gram matrices where the pair work is recomputed).
    """
    if op not in ("logits", "sigmoid_loss", "softmax_loss"):
        raise ValueError(f"unknown op {op!r}")
    D, HK = H * d, H * K
    pairs = float(Bi) * Bt
    side = Bi * (2 * HK * d * D + 2 * HK**2 * d) + Bt * 2 * D * D + 2 * D**3
    fwd = pairs * form_flops(3, K, H, D) + side
    if not backward:
        return fwd
    bwd = pairs * (8 * K * D + 2 * HK**2) + 2 * side
    return bwd if op in FUSED_TRAINING_OPS else bwd + fwd


# ----------------------------------------------------------------------------------------------------------------
# Custom ops. Every tensor argument is float32; tau, tile sizes and pos_offset are plain values.

_ns = "llip_kernels::"
Tensor = torch.Tensor
Grads5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # dk, dv, dq, du, dm
Grads6 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # ... + dt
Grads7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # ... + dt, db


@torch.library.custom_op(_ns + "cpu_cos", mutates_args=())
def cpu_cos(
    k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, u: torch.Tensor, m: torch.Tensor, tau: float, ti: int, tj: int
) -> torch.Tensor:
    """``cos(z_ij, y_j)`` for every pair -> ``[Bi, Bt]`` float32."""
    zero = k.new_zeros(())
    return _pair_forward(_MODE_COS, k, v, q, u, m, zero, zero, tau, False, 0, ti, tj)[0]


@cpu_cos.register_fake
def _(k, v, q, u, m, tau, ti, tj):
    return k.new_empty(k.shape[0], q.shape[0])


@torch.library.custom_op(_ns + "cpu_cos_backward", mutates_args=())
def cpu_cos_backward(
    dcos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor,
    tau: float,
    ti: int,
    tj: int,
) -> Grads5:
    zero = k.new_zeros(())
    out = _pair_backward(_MODE_COS, dcos, k, v, q, u, m, zero, zero, zero, zero, tau, False, 0, ti, tj, False)
    return tuple(out[:5])


@cpu_cos_backward.register_fake
def _(dcos, k, v, q, u, m, tau, ti, tj):
    return tuple(torch.empty_like(x) for x in (k, v, q, u, m))


def _cos_setup(ctx, inputs, output):
    k, v, q, u, m, tau, ti, tj = inputs
    ctx.save_for_backward(k, v, q, u, m)
    ctx.args = (tau, ti, tj)


def _cos_bwd(ctx, dcos):
    return (*cpu_cos_backward(dcos, *ctx.saved_tensors, *ctx.args), None, None, None)


cpu_cos.register_autograd(_cos_bwd, setup_context=_cos_setup)


@torch.library.custom_op(_ns + "cpu_sigmoid_loss", mutates_args=())
def cpu_sigmoid_loss(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    tau: float,
    pos_offset: int | None,
    ti: int,
    tj: int,
) -> torch.Tensor:
    """SigLIP loss ``-(1/Bi) sum_ij log sigmoid(l_ij (t cos_ij + b))`` -> ``[]`` float32."""
    off = 0 if pos_offset is None else pos_offset
    return _pair_forward(_MODE_SIGMOID, k, v, q, u, m, t, b, tau, pos_offset is not None, off, ti, tj)[0]


@cpu_sigmoid_loss.register_fake
def _(k, v, q, u, m, t, b, tau, pos_offset, ti, tj):
    return k.new_empty(())


def _sigmoid_sweep(grad, k, v, q, u, m, t, b, tau, pos_offset, ti, tj, *, with_loss):
    """The kernel's backward sweep for the sigmoid loss -> ``[dk, dv, dq, du, dm, dt, db, loss]`` (``loss`` is
    summed only ``with_loss``, else 0)."""
    zero = k.new_zeros(())
    off = 0 if pos_offset is None else pos_offset
    return _pair_backward(
        _MODE_SIGMOID, grad, k, v, q, u, m, t, b, zero, zero, tau, pos_offset is not None, off, ti, tj, with_loss
    )


@torch.library.custom_op(_ns + "cpu_sigmoid_loss_backward", mutates_args=())
def cpu_sigmoid_loss_backward(
    grad: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    tau: float,
    pos_offset: int | None,
    ti: int,
    tj: int,
) -> Grads7:
    return tuple(_sigmoid_sweep(grad, k, v, q, u, m, t, b, tau, pos_offset, ti, tj, with_loss=False)[:7])


@cpu_sigmoid_loss_backward.register_fake
def _(grad, k, v, q, u, m, t, b, tau, pos_offset, ti, tj):
    return (*(torch.empty_like(x) for x in (k, v, q, u, m)), t.new_empty(()), b.new_empty(()))


def _sig_setup(ctx, inputs, output):
    k, v, q, u, m, t, b, tau, pos_offset, ti, tj = inputs
    ctx.save_for_backward(k, v, q, u, m, t, b)
    ctx.args = (tau, pos_offset, ti, tj)


def _sig_bwd(ctx, grad):
    return (*cpu_sigmoid_loss_backward(grad, *ctx.saved_tensors, *ctx.args), None, None, None, None)


cpu_sigmoid_loss.register_autograd(_sig_bwd, setup_context=_sig_setup)


@torch.library.custom_op(_ns + "cpu_sigmoid_loss_fused", mutates_args=())
def cpu_sigmoid_loss_fused(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    tau: float,
    pos_offset: int | None,
    ti: int,
    tj: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sigmoid loss and its gradients for a cotangent of 1 in one sweep -> ``(loss, dk, dv, dq, du, dm, dt,
    db)``. Training path: each pair's dLoss/dlogit depends on its own logit only, so the backward pass needs no
    recomputation of the forward tiles (the forward's FLOPs are paid once instead of twice). The gradients are
    O(Bi + Bt) tensors, the size of the inputs; autograd scales them by the real cotangent."""
    out = _sigmoid_sweep(k.new_ones(()), k, v, q, u, m, t, b, tau, pos_offset, ti, tj, with_loss=True)
    return (out[7], *out[:7])


@cpu_sigmoid_loss_fused.register_fake
def _(k, v, q, u, m, t, b, tau, pos_offset, ti, tj):
    return (k.new_empty(()), *(torch.empty_like(x) for x in (k, v, q, u, m)), t.new_empty(()), b.new_empty(()))


def _fused_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _fused_bwd(ctx, grad, *_grads_of_grads):
    if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants, so refuse, not lie
        raise RuntimeError(
            "llip cpu backend: the fused sigmoid loss has no second derivative (backward(create_graph=True), "
            "gradient penalties); use backend='torch' or 'reference' for higher-order gradients"
        )
    return (*(g * grad for g in ctx.saved_tensors), None, None, None, None)


cpu_sigmoid_loss_fused.register_autograd(_fused_bwd, setup_context=_fused_setup)


@torch.library.custom_op(_ns + "cpu_softmax_loss", mutates_args=())
def cpu_softmax_loss(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor,
    t: torch.Tensor,
    tau: float,
    ti: int,
    tj: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE -> ``(loss [], lse_row [B], lse_col [B])``; the log-sum-exps feed the backward pass."""
    zero = k.new_zeros(())
    loss, lse_row, lse_col = _pair_forward(_MODE_SOFTMAX, k, v, q, u, m, t, zero, tau, False, 0, ti, tj)
    return loss, lse_row, lse_col


@cpu_softmax_loss.register_fake
def _(k, v, q, u, m, t, tau, ti, tj):
    return k.new_empty(()), k.new_empty(k.shape[0]), k.new_empty(q.shape[0])


@torch.library.custom_op(_ns + "cpu_softmax_loss_backward", mutates_args=())
def cpu_softmax_loss_backward(
    grad: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor,
    t: torch.Tensor,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    tau: float,
    ti: int,
    tj: int,
) -> Grads6:
    zero = k.new_zeros(())
    out = _pair_backward(_MODE_SOFTMAX, grad, k, v, q, u, m, t, zero, lse_row, lse_col, tau, False, 0, ti, tj, False)
    return tuple(out[:6])


@cpu_softmax_loss_backward.register_fake
def _(grad, k, v, q, u, m, t, lse_row, lse_col, tau, ti, tj):
    return (*(torch.empty_like(x) for x in (k, v, q, u, m)), t.new_empty(()))


def _soft_setup(ctx, inputs, output):
    k, v, q, u, m, t, tau, ti, tj = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(k, v, q, u, m, t, lse_row, lse_col)
    ctx.args = (tau, ti, tj)


def _soft_bwd(ctx, grad, _grad_lse_row, _grad_lse_col):
    return (*cpu_softmax_loss_backward(grad, *ctx.saved_tensors, *ctx.args), None, None, None)


cpu_softmax_loss.register_autograd(_soft_bwd, setup_context=_soft_setup)


# ----------------------------------------------------------------------------------------------------------------
# Backend entry points (contract: llip_kernels/dispatch.py)


def _prepare(k, v, q, y, w_out):
    """Float32 inputs plus the per-text ``U = y_hat W_out^T: [Bt, H, d]`` and ``M = W_out W_out^T: [D, D]`` (from
    which the kernel forms each image's Gram matrix as it goes). Plain torch: autograd carries dU and dM back."""
    Bi, H, K, d = k.shape
    kf, vf, qf = k.float().contiguous(), v.float().contiguous(), q.float().contiguous()
    wf = w_out.float()
    u = (F.normalize(y.float(), dim=-1) @ wf.t()).view(q.shape[0], H, d)  # U_j = W_out @ y_hat_j
    ti, tj = tile_sizes(Bi, q.shape[0], H, K)
    return kf, vf, qf, u, wf @ wf.t(), ti, tj


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
    """``t * cos(z_ij, y_j) + b`` -> ``[Bi, Bt]`` float32 (the only Bi*Bt tensor: it is the output)."""
    kf, vf, qf, u, m, ti, tj = _prepare(k, v, q, y, w_out)
    return t * cpu_cos(kf, vf, qf, u, m, tau, ti, tj) + b


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    """Forward only when no gradient is wanted; otherwise the fused forward+backward sweep (see
    :func:`cpu_sigmoid_loss_fused`): a loss computed under autograd but never backpropagated then costs one
    backward pass more than needed, the trade Liger-style fused losses make too."""
    kf, vf, qf, u, m, ti, tj = _prepare(k, v, q, y, w_out)
    wants_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (kf, vf, qf, u, m, t, b))
    if wants_grad:
        return cpu_sigmoid_loss_fused(kf, vf, qf, u, m, t, b, tau, pos_offset, ti, tj)[0]
    return cpu_sigmoid_loss(kf, vf, qf, u, m, t, b, tau, pos_offset, ti, tj)


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    kf, vf, qf, u, m, ti, tj = _prepare(k, v, q, y, w_out)
    return cpu_softmax_loss(kf, vf, qf, u, m, t, tau, ti, tj)[0]
