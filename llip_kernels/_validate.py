"""Input checking shared by every backend.

Every public op calls :func:`check_llip_inputs` (or :func:`check_pooled_inputs`) before dispatch, so a bad
call fails with the same plain-English message whatever backend would have run it. Backends may assume the
invariants listed on :class:`LlipProblem`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch

from .algebra import Op

INT64 = (-(2**63), 2**63 - 1)  # what the compiled kernels take for an index or offset


@dataclass(frozen=True)
class LlipProblem:
    """Sizes of one Llip call, after validation.

    Invariants: ``k, v: [Bi, H, K, d]``; ``q: [Bt, H, d]``; ``y: [Bt, D]`` (absent for ``mix``);
    ``w_out: [D, D]`` with ``D = H * d``; all five share one floating dtype and one device; ``tau`` is a
    finite positive float.
    """

    op: Op
    Bi: int
    Bt: int
    H: int
    K: int
    d: int
    dtype: torch.dtype
    device: torch.device
    tau: float
    requires_grad: bool

    @property
    def D(self) -> int:
        return self.H * self.d


def _fmt_shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, x, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16 or float16), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {_fmt_shape(x)}")
    return x


def check_tau(tau) -> float:
    """``tau`` must be a finite positive real number (a Python number, or a 0-dim tensor holding one)."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise TypeError(f"tau must be a number, got a tensor of shape {_fmt_shape(tau)}")
        tau = tau.item()
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    tau = float(tau)
    if not (0 < tau < math.inf):  # comparisons, not math.isfinite: torch.compile traces them (NaN fails both)
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    return tau


def check_pos_offset(pos_offset) -> int | None:
    """``pos_offset`` is an int (image i's positive is text i + pos_offset) or None (no positives)."""
    if pos_offset is None:
        return None
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, numbers.Integral):
        raise TypeError(f"pos_offset must be an int or None, got {type(pos_offset).__name__}")
    if not INT64[0] <= pos_offset <= INT64[1]:
        raise ValueError(
            f"pos_offset must fit in int64 (an offset beyond the batch simply gives no positives), got {pos_offset}"
        )
    return int(pos_offset)


def check_op(op) -> Op:
    """``op`` as an :class:`~llip_kernels.algebra.Op` (its public name, e.g. ``"sigmoid_loss"``, or the member)."""
    try:
        return Op(op)
    except ValueError:
        names = ", ".join(o.value for o in Op)
        raise ValueError(f"op must be one of {names}; got {op!r}") from None


def check_llip_inputs(op, k, v, q, y, w_out, *, tau) -> LlipProblem:
    """Validate the tensors of one Llip op and return its sizes. ``y`` is None for ``op == "mix"``."""
    op = check_op(op)
    _check_tensor("k", k, 4, "[Bi, H, K, d]")
    _check_tensor("v", v, 4, "[Bi, H, K, d]")
    _check_tensor("q", q, 3, "[Bt, H, d]")
    if op != Op.MIX:
        _check_tensor("y", y, 2, "[Bt, D]")
    _check_tensor("w_out", w_out, 2, "[D, D]")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {_fmt_shape(k)} ([Bi, H, K, d]), got {_fmt_shape(v)}")
    Bi, H, K, d = k.shape
    if K < 1:
        raise ValueError(f"k must have at least one mixture token (K >= 1), got shape {_fmt_shape(k)}")
    if d < 1 or H < 1:
        raise ValueError(f"k must have H >= 1 heads and head dim d >= 1, got shape {_fmt_shape(k)}")
    Bt = q.shape[0]
    if tuple(q.shape[1:]) != (H, d):
        raise ValueError(f"q must have shape [Bt, H={H}, d={d}] to match k {_fmt_shape(k)}, got {_fmt_shape(q)}")
    D = H * d
    if tuple(w_out.shape) != (D, D):
        raise ValueError(f"w_out must have shape [D, D] = [{D}, {D}] (D = H * d = {H} * {d}), got {_fmt_shape(w_out)}")
    named = [("k", k), ("v", v), ("q", q), ("w_out", w_out)]
    if op != Op.MIX:
        if tuple(y.shape) != (Bt, D):
            raise ValueError(f"y must have shape [Bt, D] = [{Bt}, {D}] (Bt from q, D = H * d), got {_fmt_shape(y)}")
        named.insert(3, ("y", y))
    for name, t in named[1:]:
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}: move all inputs to one device")
    for name, t in named[1:]:
        if t.dtype != k.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but k has {k.dtype}: all of k, v, q, y, w_out must share one dtype "
                f"(cast them, e.g. w_out.to(k.dtype), before the call)"
            )
    tau = check_tau(tau)
    if op == Op.SOFTMAX_LOSS and Bi != Bt:
        raise ValueError(f"the softmax loss needs as many images as texts (diagonal positives), got Bi={Bi}, Bt={Bt}")
    requires_grad = any(t.requires_grad for _, t in named)
    return LlipProblem(op, Bi, Bt, H, K, d, k.dtype, k.device, tau, requires_grad)


def check_scalar(name: str, x, device: torch.device, default: float | None) -> torch.Tensor:
    """Turn ``logit_scale`` / ``logit_bias`` into a 0-dim float32 (float64 if given so) tensor on ``device``,
    keeping autograd."""
    if x is None:
        if default is None:
            raise TypeError(f"{name} is required (a number or a 0-dim tensor)")
        return torch.tensor(default, dtype=torch.float32, device=device)
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a 0-dim tensor (or hold one element), got shape {_fmt_shape(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but k is on {device}: move it to the inputs' device")
        # float64 stays float64 (gradcheck, fp64 oracles); everything else computes in float32
        return x.reshape(()).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number or a 0-dim tensor, got {type(x).__name__}")
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def check_pooled_inputs(img, txt, *, square: bool) -> tuple[int, int]:
    """Validate pooled embeddings ``img: [Bi, D]``, ``txt: [Bt, D]`` for the CLIP / SigLIP baselines."""
    _check_tensor("img", img, 2, "[Bi, D]")
    _check_tensor("txt", txt, 2, "[Bt, D]")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"img {_fmt_shape(img)} and txt {_fmt_shape(txt)} must share the embedding dim D")
    if txt.device != img.device:
        raise ValueError(f"txt is on {txt.device} but img is on {img.device}: move both to one device")
    if square and img.shape[0] != txt.shape[0]:
        raise ValueError(
            f"the softmax loss needs as many images as texts (diagonal positives), got Bi={img.shape[0]}, "
            f"Bt={txt.shape[0]}"
        )
    return img.shape[0], txt.shape[0]


def autocast_inputs(*tensors):
    """The precision policy under ``torch.autocast`` (docs/design.md section 3): the Llip ops are matmul-class ops,
    so inside an autocast region of the inputs' device their floating tensor inputs are cast to the autocast dtype
    (float64 excepted), as autocast casts a matmul's; None passes through. Outside autocast, nothing changes."""
    first = next(t for t in tensors if isinstance(t, torch.Tensor))
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return tuple(cast(t) for t in tensors)


def autocast_off(device: torch.device):
    """The ops run with autocast off inside: each backend follows its own precision policy for its products, and
    the float32 products of its input preparation must not be recast to bfloat16 by an enclosing region."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
