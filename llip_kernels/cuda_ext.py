"""Backend ``"cuda"``: hand-written CUDA kernels (``csrc/cuda/``) for ``llip_logits`` (forward) and
``llip_sigmoid_loss`` (forward and backward), on bfloat16 / float16 inputs, with tensor cores (wmma m16n16k16,
float32 accumulation).

Algebra: SPEC section 4, form 3 (see the header of ``csrc/cuda/llip_kernels.cu`` for why). Per pair the kernels
evaluate ``cos = (sum_hk a c) / sqrt(a^T G_i a)`` from ``U_j = W_out @ normalize(y_j)`` (per text) and the per-image
Gram matrix ``G_i = V'_i V'_i^T`` (per image, zero-padded per head to ``Kp = ceil16(K)`` tokens). ``U`` and ``G``
are plain torch ops in float32 here, so autograd carries the kernel's ``dU`` / ``dG`` back to ``y``, ``w_out`` and
``v``; the kernels never build a tensor of ``Bi*Bt*K`` or ``Bi*Bt*D`` elements, and the loss never builds ``Bi*Bt``.

Layers: the extension (``llip_binding.cpp`` + ``llip_kernels.cu``, built lazily by :mod:`llip_kernels._build`)
exposes plain functions; this module wraps them as ``torch.library`` custom ops ``torch.ops.llip_kernels.cuda_*``
with fake implementations (so ``torch.compile`` traces them, and they run on meta tensors without the extension)
and registered autograd (the loss backward is a custom op too).

Determinism: the loss backward adds ``dq``/``du`` with float atomics across image blocks (not bitwise repeatable).
In deterministic mode (:func:`llip_kernels.dispatch.deterministic_requested`) a second launch with one block per
text tile writes them instead, in a fixed order, recomputing the pair work (about twice the backward time).

Not covered, reported as reasons so dispatch moves on: float32 inputs (tensor-core kernels; use ``triton`` or
``torch``), the softmax loss, the backward of ``llip_logits``, and ``H*K`` / ``d`` too large for shared memory.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _build, dispatch
from ._validate import LlipProblem
from .testing import form_flops

EXT_NAME = "llip_cuda_ext"
FLOP_FORM = "form 3: fwd 4KD + 2(HK)^2 per pair; bwd 12KD + 6(HK)^2 per pair (recomputes the forward)"
LOSS_GRID_X = 16  # text-tile groups per image in the loss forward: partial sums are [Bi, 16] floats
SMEM_LIMIT = 227 * 1024  # H100/H200 opt-in shared memory per block; the extension re-checks the real device limit
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
_ns = "llip_kernels::"


# ----------------------------------------------------------------------------------------------------------------
# Shared-memory plan (mirror of make_layout in llip_kernels.cu; tests/test_cuda_compile.py checks they agree)

WARPS = 8


def _round16(x: int) -> int:
    return (x + 15) // 16 * 16


def _align128(x: int) -> int:
    return (x + 127) // 128 * 128


def smem_bytes(H: int, K: int, d: int, BT: int, backward: bool) -> int:
    """Dynamic shared memory (bytes) of one block of the forward (or loss-backward) kernel."""
    Kp, dp = _round16(K), _round16(d)
    HKp = H * Kp
    ld_d, ld_t, ld_f = dp + 8, BT + 8, BT + 4
    img16, txt16, tile_f = Kp * ld_d * 2, BT * ld_d * 2, Kp * ld_f * 4
    mix16, kt16 = HKp * ld_t * 2, Kp * ld_t * 2
    parts = [img16, img16, txt16, txt16, tile_f, tile_f, mix16]
    if backward:
        parts += [tile_f, mix16, kt16, kt16]
    parts += [WARPS * 256 * 4, (7 + WARPS) * BT * 4]
    return sum(_align128(p) for p in parts)


def pick_bt(H: int, K: int, d: int, backward: bool, limit: int = SMEM_LIMIT) -> int:
    """Texts per tile the kernels will use (64, 32 or 16), or 0 when even 16 does not fit ``limit`` bytes."""
    for bt in (64, 32, 16):
        if smem_bytes(H, K, d, bt, backward) <= limit - 1024:
            return bt
    return 0


def flops(op: str, Bi: int, Bt: int, H: int, K: int, d: int, backward: bool = False) -> float:
    """FLOPs of the form the kernels use (form 3). The backward recomputes the forward (4KD + 2(HK)^2), then
    ``G a`` per head again (2(HK)^2), dK, dV, dQ, dU (8KD) and dG (2(HK)^2) per pair."""
    D = H * d
    pairs = Bi * Bt
    if not backward:
        return form_flops(3, K, H, D) * pairs
    return (12 * K * D + 6 * (H * K) ** 2) * pairs


# ----------------------------------------------------------------------------------------------------------------
# Toolkit and build


def cuda_home() -> str | None:
    """The CUDA toolkit folder (with ``bin/nvcc`` and ``include/cuda_runtime.h``): ``$CUDA_HOME`` / ``$CUDA_PATH``,
    else where the ``nvcc`` on PATH really lives (it may be a shell wrapper that ``exec``s the real one, as on
    these machines, where torch's own guess would wrongly say ``/usr/local``), else ``/usr/local/cuda``."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        real = os.path.realpath(nvcc)
        try:
            head = Path(real).read_bytes()[:4096]
        except OSError:
            head = b""
        if head.startswith(b"#!"):  # a wrapper script: follow the path it execs
            m = re.search(rb"exec\s+\"?([^\s\"]+/bin/nvcc)", head)
            if m:
                real = os.path.realpath(m.group(1).decode())
        candidates.append(str(Path(real).parent.parent))
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def _sources() -> list[Path]:
    root = _build.source_dir("cuda")
    return [root / "llip_binding.cpp", root / "llip_kernels.cu"] if root is not None else []


def extension():
    """Build (once) and import the extension; raises ``_build.ExtensionBuildError`` with a readable message."""
    home = cuda_home()
    if home is None:
        raise _build.ExtensionBuildError(
            "cannot build the llip CUDA extension: nvcc not found (set CUDA_HOME to the CUDA toolkit folder)"
        )
    os.environ.setdefault("CUDA_HOME", home)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # torch guessed it at import from `which nvcc`
    return _build.load_extension(
        EXT_NAME, _sources(), extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++17"], with_cuda=True
    )


def environment_reasons() -> list[str]:
    """What this machine lacks for the cuda backend (empty when it could build and run it)."""
    reasons = []
    if torch.version.cuda is None:
        reasons.append("this torch is a CPU-only build (torch.version.cuda is None); install a CUDA build of torch")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device is visible (torch.cuda.is_available() is False)")
    if cuda_home() is None:
        reasons.append("nvcc not found: set CUDA_HOME to the CUDA toolkit folder (the one with bin/nvcc)")
    if not _sources():
        reasons.append("the CUDA sources (csrc/cuda/) are not shipped with this installation")
    failure = _build.cached_failure(EXT_NAME)
    if failure:
        reasons.append(failure)
    return reasons


def not_supported_reasons(op: str, problem: LlipProblem) -> list[str]:
    reasons = []
    if op not in ("logits", "sigmoid_loss"):
        reasons.append(f"the cuda backend implements llip_logits and llip_sigmoid_loss only, not {op}")
    if problem.device.type != "cuda":
        reasons.append(f"inputs are on {problem.device.type}; the cuda backend needs CUDA tensors")
    if problem.dtype not in _SUPPORTED_DTYPES:
        reasons.append(
            f"the tensor-core kernels take bfloat16 or float16 inputs, got {problem.dtype} "
            "(cast them, or use the triton or torch backend)"
        )
    if op == "logits" and problem.requires_grad:
        reasons.append("cuda llip_logits has no backward pass (inputs require grad); the loss op does")
    backward = op == "sigmoid_loss" and problem.requires_grad
    if problem.Bi > 65535:
        reasons.append(f"at most 65535 images per call (grid limit), got Bi={problem.Bi}")
    if pick_bt(problem.H, problem.K, problem.d, backward) == 0:
        reasons.append(
            f"H*K = {problem.H * problem.K} or d = {problem.d} too large for shared memory "
            f"({smem_bytes(problem.H, problem.K, problem.d, 16, backward)} bytes at 16 texts per tile)"
        )
    if reasons:
        return reasons
    env = environment_reasons()
    if env:
        return env
    major, minor = torch.cuda.get_device_capability(problem.device)
    if major < 8:
        return [f"needs compute capability >= 8.0 (bf16 tensor cores), device has {major}.{minor}"]
    try:
        extension()
    except _build.ExtensionBuildError as e:
        return [str(e)]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Custom ops. Real implementations call the extension; fake ones only give shapes (meta tensors, torch.compile).


def _kernel_operands(k: torch.Tensor, u: torch.Tensor, g: torch.Tensor):
    """``u [Bt, D]`` and ``g [Bi, HKp, HKp]`` (float32) in the form the kernels read: u as ``[Bt, H, d]`` in k's dtype,
    g divided by its per-image max |g| (``gscale``, so float16 cannot overflow) in k's dtype."""
    Bt, (H, d) = u.shape[0], (k.shape[1], k.shape[3])
    gscale = g.detach().abs().amax(dim=(1, 2)).float().clamp_min(1e-30).contiguous()
    gs = (g.detach() / gscale[:, None, None]).to(k.dtype).contiguous()
    ut = u.detach().reshape(Bt, H, d).to(k.dtype).contiguous()
    return ut, gs, gscale


def _scalar(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(()).float().contiguous()


@torch.library.custom_op(_ns + "cuda_cosine", mutates_args=())
def cuda_cosine(
    k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, u: torch.Tensor, g: torch.Tensor, tau: float
) -> torch.Tensor:
    """``cos(z[i, j], y_j)`` -> ``[Bi, Bt]`` float32; ``u = normalize(y) @ w_out.T`` ``[Bt, D]`` and ``g`` the
    per-head-padded Gram matrices ``[Bi, HKp, HKp]``, both float32 (see :func:`text_and_gram`)."""
    ut, gs, gscale = _kernel_operands(k, u, g)
    return extension().cosine(k.contiguous(), v.contiguous(), q.contiguous(), ut, gs, gscale, tau)


@cuda_cosine.register_fake
def _(k, v, q, u, g, tau):
    return k.new_empty((k.shape[0], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op(_ns + "cuda_sigmoid_loss", mutates_args=())
def cuda_sigmoid_loss(
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    g: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    tau: float,
    pos_offset: int,
    has_pos: bool,
    deterministic: bool,
) -> torch.Tensor:
    """SigLIP loss ``-(1/Bi) sum_ij log sigmoid(l_ij (t cos_ij + b))`` -> ``[]`` float32 (operands as
    :func:`cuda_cosine`; ``l_ij = +1`` iff ``has_pos`` and ``j == i + pos_offset``). ``deterministic`` only
    changes the backward (no atomics)."""
    ut, gs, gscale = _kernel_operands(k, u, g)
    part = extension().sigmoid_fwd(
        k.contiguous(),
        v.contiguous(),
        q.contiguous(),
        ut,
        gs,
        gscale,
        _scalar(t),
        _scalar(b),
        tau,
        pos_offset,
        has_pos,
        LOSS_GRID_X,
    )  # [Bi, LOSS_GRID_X]
    return part.sum() / k.shape[0]


@cuda_sigmoid_loss.register_fake
def _(k, v, q, u, g, t, b, tau, pos_offset, has_pos, deterministic):
    return k.new_empty((), dtype=torch.float32)


@torch.library.custom_op(_ns + "cuda_sigmoid_loss_backward", mutates_args=())
def cuda_sigmoid_loss_backward(
    grad: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    g: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    tau: float,
    pos_offset: int,
    has_pos: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`cuda_sigmoid_loss` w.r.t. (k, v, q, u, g, t, b); k, v, q in their dtype, the rest
    float32. ``dg`` is w.r.t. the unscaled Gram matrix ``g`` (the kernel undoes ``gscale``)."""
    Bi, Bt = k.shape[0], q.shape[0]
    ut, gs, gscale = _kernel_operands(k, u, g)
    gout = (grad.detach().float() / Bi).reshape(()).contiguous()
    dk, dv, dq, du, dg, dt_part, db_part = extension().sigmoid_bwd(
        gout,
        k.contiguous(),
        v.contiguous(),
        q.contiguous(),
        ut,
        gs,
        gscale,
        _scalar(t),
        _scalar(b),
        tau,
        pos_offset,
        has_pos,
        deterministic,
    )
    return (
        dk.to(k.dtype),
        dv.to(v.dtype),
        dq.to(q.dtype),
        du.reshape(Bt, -1),
        dg,
        dt_part.sum().reshape(t.shape),
        db_part.sum().reshape(b.shape),
    )


@cuda_sigmoid_loss_backward.register_fake
def _(grad, k, v, q, u, g, t, b, tau, pos_offset, has_pos, deterministic):
    f32 = torch.float32
    return (
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(q),
        torch.empty_like(u, dtype=f32),
        torch.empty_like(g, dtype=f32),
        torch.empty_like(t, dtype=f32),
        torch.empty_like(b, dtype=f32),
    )


def _sigmoid_setup(ctx, inputs, output):
    k, v, q, u, g, t, b, tau, pos_offset, has_pos, deterministic = inputs
    ctx.save_for_backward(k, v, q, u, g, t, b)
    ctx.args = (tau, pos_offset, has_pos, deterministic)


def _sigmoid_backward(ctx, grad):
    grads = torch.ops.llip_kernels.cuda_sigmoid_loss_backward(grad, *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None, None)


cuda_sigmoid_loss.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup)


# ----------------------------------------------------------------------------------------------------------------
# Backend entry points (contract: llip_kernels/dispatch.py)


def text_and_gram(v: torch.Tensor, y: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-text ``u = W_out @ normalize(y_j)`` -> ``[Bt, D]`` and per-image ``G_i = V'_i V'_i^T`` ->
    ``[Bi, H*Kp, H*Kp]`` (``V'_i[h, k] = V_i[h, k] @ W_out[h*d:(h+1)*d]``, K zero-padded per head to a multiple of 16),
    float32, differentiable torch ops (O(Bt) and O(Bi) work)."""
    Bi, H, K, d = v.shape
    D, Kp = H * d, _round16(K)
    w = w_out.float()
    u = F.normalize(y.float(), dim=-1) @ w.t()  # [Bt, D]
    vp = torch.einsum("ihkc,hce->ihke", v.float(), w.view(H, d, D))  # [Bi, H, K, D]
    if Kp != K:
        vp = F.pad(vp, (0, 0, 0, Kp - K))
    vp = vp.reshape(Bi, H * Kp, D)
    return u, vp @ vp.transpose(1, 2)


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> torch.Tensor:
    u, g = text_and_gram(v, y, w_out)
    return t * torch.ops.llip_kernels.cuda_cosine(k, v, q, u, g, tau) + b


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> torch.Tensor:
    u, g = text_and_gram(v, y, w_out)
    Bi, Bt = k.shape[0], q.shape[0]
    has_pos = pos_offset is not None and -Bi < pos_offset < Bt  # else no image has its positive in this block
    offset = int(pos_offset) if has_pos else 0
    deterministic = dispatch.deterministic_requested()
    return torch.ops.llip_kernels.cuda_sigmoid_loss(k, v, q, u, g, t, b, tau, offset, has_pos, deterministic)


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> torch.Tensor:
    raise NotImplementedError("the cuda backend does not implement llip_softmax_loss (see not_supported_reasons)")
