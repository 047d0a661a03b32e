"""Backend ``"cuda"``: hand-written CUDA kernels (``csrc/cuda/``) for ``llip_logits`` (forward) and
``llip_sigmoid_loss`` (forward and backward), on bfloat16 / float16 inputs, with tensor cores (wmma m16n16k16,
float32 accumulation).

Algebra: form 3 of docs/design.md section 4 (the header of ``csrc/cuda/llip_kernels.cu`` says why). Per pair the
kernels evaluate ``cos = (sum_hk a c) / sqrt(a^T G_i a)`` from ``U_j = W_out @ normalize(y_j)`` (per text) and the
per-image Gram matrix ``G_i = V'_i V'_i^T`` (per image, zero-padded per head to ``Kp = ceil16(K)`` tokens). ``U`` and
``G`` are plain torch ops in float32 here, so autograd carries the kernel's ``dU`` / ``dG`` back to ``y``, ``w_out`` and
``v``; the kernels never build a tensor of ``Bi*Bt*K`` or ``Bi*Bt*D`` elements, and the loss never builds ``Bi*Bt``.

Layers: the extension (``llip_binding.cpp`` + ``llip_kernels.cu``, built lazily by :mod:`llip_kernels._build`)
exposes plain functions; this module registers them as ``torch.library`` custom ops
``torch.ops.llip_kernels.cuda_*`` (:mod:`llip_kernels._custom_ops`) with fake implementations (so ``torch.compile``
traces them, and they run on meta tensors without the extension) and autograd (the loss backward is a custom op
too).

Determinism: the loss backward adds ``dq``/``du`` with float atomics across image blocks (not bitwise repeatable).
In deterministic mode (:func:`llip_kernels.settings.deterministic_requested`) a second launch with one block per
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

from .. import _build, settings
from .._custom_ops import define, differentiate_with
from .._validate import LlipProblem
from ..algebra import (
    Op,
    gram_matrices,
    image_flops,
    pair_flops,
    pair_grad_flops,
    positives,
    text_flops,
    text_projection,
)

EXT_NAME = "llip_cuda_ext"
FLOP_FORM = "form 3: fwd 4KD + 2(HK)^2 per pair; bwd 12KD + 6(HK)^2 per pair (recomputes the forward)"
LOSS_GRID_X = 16  # text-tile groups per image in the loss forward: partial sums are [Bi, 16] floats
SMEM_LIMIT = 227 * 1024  # H100/H200 opt-in shared memory per block; the extension re-checks the real device limit
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Shared-memory plan (mirror of make_layout in llip_kernels.cu; tests/kernels/test_cuda_compile.py checks they agree)

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
    """FLOPs of form 3, the form the kernels use: pairs plus the precomputations (``U`` per text, ``V'`` and ``G``
    per image, in torch). The backward recomputes the forward (4KD + 2(HK)^2), then ``G a`` per head again
    (2(HK)^2), dK, dV, dQ, dU (8KD) and dG (2(HK)^2) per pair; the precomputations' backward is twice their
    forward."""
    pairs = float(Bi) * Bt
    side = Bi * image_flops(3, H, K, d) + Bt * text_flops(3, H, d)
    fwd = pair_flops(3, H, K, d)
    if not backward:
        return pairs * fwd + side
    return pairs * (fwd + 2 * (H * K) ** 2 + pair_grad_flops(H, K, d)) + 2 * side


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


def not_supported_reasons(problem: LlipProblem) -> list[str]:
    op = problem.op
    reasons = []
    if op not in (Op.LOGITS, Op.SIGMOID_LOSS):
        reasons.append(f"the cuda backend implements llip_logits and llip_sigmoid_loss only, not {op}")
    if problem.device.type != "cuda":
        reasons.append(f"inputs are on {problem.device.type}; the cuda backend needs CUDA tensors")
    if problem.dtype not in _SUPPORTED_DTYPES:
        reasons.append(
            f"the tensor-core kernels take bfloat16 or float16 inputs, got {problem.dtype} "
            "(cast them, or use the triton or torch backend)"
        )
    if op == Op.LOGITS and problem.requires_grad:
        reasons.append("cuda llip_logits has no backward pass (inputs require grad); the loss op does")
    backward = op == Op.SIGMOID_LOSS and problem.requires_grad
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


def algebraic_form(problem: LlipProblem) -> int:
    return 3


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (llip_kernels._custom_ops). Real implementations call the extension; fake ones only give shapes (meta
# tensors, torch.compile). ``u [Bt, D]`` and ``g [Bi, HKp, HKp]`` are float32 (see :func:`text_and_gram`).

Tensor = torch.Tensor


def _kernel_operands(k: Tensor, u: Tensor, g: Tensor):
    """``u [Bt, D]`` and ``g [Bi, HKp, HKp]`` (float32) in the form the kernels read: u as ``[Bt, H, d]`` in k's dtype,
    g divided by its per-image max |g| (``gscale``, so float16 cannot overflow) in k's dtype."""
    Bt, (H, d) = u.shape[0], (k.shape[1], k.shape[3])
    gscale = g.detach().abs().amax(dim=(1, 2)).float().clamp_min(1e-30).contiguous()
    gs = (g.detach() / gscale[:, None, None]).to(k.dtype).contiguous()
    ut = u.detach().reshape(Bt, H, d).to(k.dtype).contiguous()
    return ut, gs, gscale


def _scalar(x: Tensor) -> Tensor:
    return x.detach().reshape(()).float().contiguous()


def _cosine(k: Tensor, v: Tensor, q: Tensor, u: Tensor, g: Tensor, tau: float) -> Tensor:
    """``cos(z[i, j], y_j)`` -> ``[Bi, Bt]`` float32."""
    ut, gs, gscale = _kernel_operands(k, u, g)
    return extension().cosine(k=k.contiguous(), v=v.contiguous(), q=q.contiguous(), u=ut, g=gs, gscale=gscale, tau=tau)


def _sigmoid_loss(
    k: Tensor,
    v: Tensor,
    q: Tensor,
    u: Tensor,
    g: Tensor,
    t: Tensor,
    b: Tensor,
    tau: float,
    pos_offset: int,
    has_pos: bool,
    deterministic: bool,
) -> Tensor:
    """SigLIP loss ``-(1/Bi) sum_ij log sigmoid(l_ij (t cos_ij + b))`` -> ``[]`` float32 (``l_ij = +1`` iff
    ``has_pos`` and ``j == i + pos_offset``). ``deterministic`` only changes the backward (no atomics)."""
    ut, gs, gscale = _kernel_operands(k, u, g)
    part = extension().sigmoid_fwd(
        k=k.contiguous(),
        v=v.contiguous(),
        q=q.contiguous(),
        u=ut,
        g=gs,
        gscale=gscale,
        t=_scalar(t),
        b=_scalar(b),
        tau=tau,
        pos_offset=pos_offset,
        has_pos=has_pos,
        grid_x=LOSS_GRID_X,
    )  # [Bi, LOSS_GRID_X]
    return part.sum() / k.shape[0]


def _sigmoid_loss_backward(
    grad: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    u: Tensor,
    g: Tensor,
    t: Tensor,
    b: Tensor,
    tau: float,
    pos_offset: int,
    has_pos: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_sigmoid_loss` w.r.t. (k, v, q, u, g, t, b); k, v, q in their dtype, the rest
    float32. ``dg`` is w.r.t. the unscaled Gram matrix ``g`` (the kernel undoes ``gscale``)."""
    Bi, Bt = k.shape[0], q.shape[0]
    ut, gs, gscale = _kernel_operands(k, u, g)
    dk, dv, dq, du, dg, dt_part, db_part = extension().sigmoid_bwd(
        gout=(grad.detach().float() / Bi).reshape(()).contiguous(),
        k=k.contiguous(),
        v=v.contiguous(),
        q=q.contiguous(),
        u=ut,
        g=gs,
        gscale=gscale,
        t=_scalar(t),
        b=_scalar(b),
        tau=tau,
        pos_offset=pos_offset,
        has_pos=has_pos,
        deterministic=deterministic,
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


def _sigmoid_loss_backward_fake(grad, k, v, q, u, g, t, b, *_):
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


cuda_cosine = define(
    "cuda_cosine", _cosine, fake=lambda k, v, q, u, g, tau: k.new_empty((k.shape[0], q.shape[0]), dtype=torch.float32)
)
cuda_sigmoid_loss = define("cuda_sigmoid_loss", _sigmoid_loss, fake=lambda k, *_: k.new_empty((), dtype=torch.float32))
cuda_sigmoid_loss_backward = define(
    "cuda_sigmoid_loss_backward", _sigmoid_loss_backward, fake=_sigmoid_loss_backward_fake
)
differentiate_with(cuda_sigmoid_loss, cuda_sigmoid_loss_backward, tensor_inputs=7)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def text_and_gram(v: Tensor, y: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
    """Per-text ``u = W_out @ normalize(y_j)`` -> ``[Bt, D]`` and per-image ``G_i = V'_i V'_i^T`` ->
    ``[Bi, H*Kp, H*Kp]`` (K zero-padded per head to a multiple of 16, the tensor-core tile), float32,
    differentiable torch ops (O(Bt) and O(Bi) work)."""
    w = w_out.float()
    return text_projection(y.float(), w), gram_matrices(v.float(), w, pad_tokens_to=16)


def logits(k, v, q, y, w_out, t, b, *, tau: float) -> Tensor:
    u, g = text_and_gram(v, y, w_out)
    return t * cuda_cosine(k, v, q, u, g, tau) + b


def sigmoid_loss(k, v, q, y, w_out, t, b, *, tau: float, pos_offset: int | None) -> Tensor:
    u, g = text_and_gram(v, y, w_out)
    has_pos = len(positives(k.shape[0], q.shape[0], pos_offset)) > 0  # else no image has its positive here
    offset = int(pos_offset) if has_pos else 0
    deterministic = settings.deterministic_requested()
    return cuda_sigmoid_loss(k, v, q, u, g, t, b, tau, offset, has_pos, deterministic)


def softmax_loss(k, v, q, y, w_out, t, *, tau: float) -> Tensor:
    raise NotImplementedError("the cuda backend does not implement llip_softmax_loss (see not_supported_reasons)")
