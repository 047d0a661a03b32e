"""Reusable pieces for testing and benchmarking Llip ops: input factories, the tolerance rule of docs/design.md
section 6, a driver that checks an op and all its gradients against the fp64 reference, and an allocation recorder.

The rule (FlashAttention's): for each output and gradient, ``max|ours - ref64| <= 2 * max|torch_same_dtype -
ref64| + floor``, where ``ref64`` is the reference backend run in float64 and ``torch_same_dtype`` the reference
backend run in the inputs' dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import functional

INPUT_NAMES = ("k", "v", "q", "y", "w_out", "t", "b")

# Input families. "gaussian" alone has hidden wrong backward passes in other projects, so tests use them all.
KINDS = ("gaussian", "peaked", "near_ties", "duplicate_rows", "non_unit", "large_scale")


@dataclass
class LlipInputs:
    """One call's inputs. ``t`` is the multiplier exp(logit_scale); ``b`` the bias (0-dim float32)."""

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    y: torch.Tensor
    w_out: torch.Tensor
    t: torch.Tensor
    b: torch.Tensor
    tau: float

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in INPUT_NAMES}

    def to(self, dtype: torch.dtype | None = None, device=None, requires_grad: bool = True) -> LlipInputs:
        """A detached copy; ``dtype`` applies to k, v, q, y, w_out (t and b stay float32 unless float64)."""
        out = {}
        for name, x in self.tensors().items():
            x = x.detach()
            if name in ("t", "b"):
                x = x.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            else:
                x = x.to(device=device, dtype=dtype)
            out[name] = x.clone().requires_grad_(requires_grad)
        return LlipInputs(**out, tau=self.tau)


def make_llip_inputs(
    Bi: int,
    Bt: int,
    H: int,
    K: int,
    d: int,
    *,
    kind: str = "gaussian",
    tau: float = 5.0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    requires_grad: bool = True,
) -> LlipInputs:
    """Deterministic inputs of one of :data:`KINDS`, generated in float64 then cast to ``dtype``.

    - ``gaussian``: unit-variance k, v, q, y; w_out with D**-0.5 scale; t = 10, b = -10 (SigLIP init).
    - ``peaked``: small tau (0.05) and large queries, so each softmax over K is nearly one-hot.
    - ``near_ties``: every key of an image equal up to 1e-3, so the softmax is nearly uniform and its
      gradient is a small difference of large terms.
    - ``duplicate_rows``: images 0 and 1 identical, texts 0 and 1 identical (ties across rows and columns).
    - ``non_unit``: norms spread over four orders of magnitude per row (normalisation matters).
    - ``large_scale``: t = 100 (the clamp), b = 5, so the logits saturate the sigmoid.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    D = H * d

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    k, v, q, y = randn(Bi, H, K, d), randn(Bi, H, K, d), randn(Bt, H, d), randn(Bt, D)
    w_out = randn(D, D) * D**-0.5
    t, b = 10.0, -10.0
    if kind == "peaked":
        tau = 0.05
        q = q * 3.0
    elif kind == "near_ties":
        k = k[:, :, :1, :] + 1e-3 * randn(Bi, H, K, d)
    elif kind == "duplicate_rows":
        if Bi >= 2:
            k[1], v[1] = k[0], v[0]
        if Bt >= 2:
            q[1], y[1] = q[0], y[0]
    elif kind == "non_unit":
        k = k * torch.logspace(-2, 2, Bi, dtype=torch.float64).view(Bi, 1, 1, 1)
        v = v * torch.logspace(2, -2, Bi, dtype=torch.float64).view(Bi, 1, 1, 1)
        y = y * torch.logspace(-2, 2, Bt, dtype=torch.float64).view(Bt, 1)
        q = q * torch.logspace(1, -1, Bt, dtype=torch.float64).view(Bt, 1, 1)
    elif kind == "large_scale":
        t, b = 100.0, 5.0
    inputs = LlipInputs(
        k, v, q, y, w_out, torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), tau
    )
    return inputs.to(dtype=dtype, device=device, requires_grad=requires_grad)


def tolerance_floor(dtype: torch.dtype, scale: float) -> float:
    """The additive floor of the rule, relative to the magnitude ``scale`` of the reference value."""
    rel = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return rel * max(scale, 1.0)


def check_rule(
    name: str,
    ours: torch.Tensor,
    ref64: torch.Tensor,
    same_dtype: torch.Tensor,
    dtype: torch.dtype,
    floor: float | None = None,
) -> None:
    """Raise AssertionError unless ``max|ours - ref64| <= 2 * max|same_dtype - ref64| + floor``."""
    if ours.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    if ours.numel() == 0:
        return
    ours, ref64, same_dtype = ours.double().cpu(), ref64.double().cpu(), same_dtype.double().cpu()
    if not torch.isfinite(ours).all():
        raise AssertionError(f"{name}: non-finite values in the result ({(~torch.isfinite(ours)).sum()} of them)")
    err = (ours - ref64).abs().max().item()
    base = (same_dtype - ref64).abs().nan_to_num(0.0).max().item()
    if floor is None:
        floor = tolerance_floor(dtype, ref64.abs().max().item())
    bound = 2 * base + floor
    if not err <= bound:
        where = (ours - ref64).abs().argmax().item()
        raise AssertionError(
            f"{name}: max|ours - ref64| = {err:.3e} > 2 * {base:.3e} (same-dtype torch error) + {floor:.3e}; "
            f"worst at flat index {where}: ours {ours.flatten()[where].item():.6e}, "
            f"ref {ref64.flatten()[where].item():.6e}"
        )


def check_same_result(
    name: str, ours: torch.Tensor, theirs: torch.Tensor, *, dtype: torch.dtype, terms: int, slack: float = 4.0
) -> None:
    """Two of our own computations of one quantity that differ only in the order of their sums (processes, thread
    counts, code paths, atomics): ``max|ours - theirs| <= slack * eps(dtype) * (terms + 4) * max(|ours|, |theirs|)``.

    That is the bound of a sum of ``terms`` rounded terms (plus a few roundings of the operations around it), relative
    to the magnitude of the result, in the precision ``dtype`` the sums run in (docs/design.md section 6). Use it
    where no float64 oracle is at hand; with one, :func:`check_rule` is sharper."""
    if ours.shape != theirs.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}")
    if ours.numel() == 0:
        return
    a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
    scale = max(a.abs().max().item(), b.abs().max().item())
    bound = slack * torch.finfo(dtype).eps * (terms + 4) * scale
    err = (a - b).abs().max().item()
    if not err <= bound:
        raise AssertionError(
            f"{name}: max difference {err:.3e} > {bound:.3e} ({slack} x eps({dtype}) x {terms + 4} terms x magnitude "
            f"{scale:.3e})"
        )


@dataclass
class OpResult:
    out: torch.Tensor
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def run_op(
    op: str, inputs: LlipInputs, backend: str, *, pos_offset: int | None = 0, grad_seed: int = 1, with_grad: bool = True
) -> OpResult:
    """Run ``op`` (``logits``, ``sigmoid_loss`` or ``softmax_loss``) and backpropagate a fixed random cotangent."""
    out = call_op(op, inputs, backend, pos_offset=pos_offset)
    if not with_grad:
        return OpResult(out.detach())
    return backpropagate(op, out, inputs, grad_seed=grad_seed)


def call_op(op: str, inputs: LlipInputs, backend: str, *, pos_offset: int | None = 0) -> torch.Tensor:
    """The forward pass of ``op`` through the public functional API (the output keeps its graph)."""
    x = inputs
    if op == "logits":
        return functional.llip_logits(
            x.k, x.v, x.q, x.y, x.w_out, tau=x.tau, logit_scale=x.t, logit_bias=x.b, backend=backend
        )
    if op == "sigmoid_loss":
        return functional.llip_sigmoid_loss(
            x.k, x.v, x.q, x.y, x.w_out, x.t, x.b, tau=x.tau, pos_offset=pos_offset, backend=backend
        )
    if op == "softmax_loss":
        return functional.llip_softmax_loss(x.k, x.v, x.q, x.y, x.w_out, x.t, tau=x.tau, backend=backend)
    raise ValueError(f"unknown op {op!r}")


def backpropagate(op: str, out: torch.Tensor, inputs: LlipInputs, *, grad_seed: int = 1) -> OpResult:
    """Backpropagate a fixed random cotangent (seeded by ``grad_seed``) from ``out`` to every input that wants it."""
    g = torch.Generator().manual_seed(grad_seed)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    wanted = {n: t for n, t in inputs.tensors().items() if t.requires_grad and not (op == "softmax_loss" and n == "b")}
    grads = torch.autograd.grad(out, list(wanted.values()), cot, allow_unused=True)
    result = OpResult(out.detach())
    for n, gr in zip(wanted, grads):
        result.grads[n] = torch.zeros_like(wanted[n]) if gr is None else gr.detach()
    return result


def check_op_against_reference(
    op: str,
    inputs: LlipInputs,
    backend: str,
    *,
    pos_offset: int | None = 0,
    with_grad: bool = True,
    floor_scale: float = 1.0,
) -> None:
    """Check ``backend``'s output and every input gradient against fp64 with the rule of docs/design.md section 6.

    ``inputs`` carry the dtype under test. Raises AssertionError naming the first quantity that fails.
    """
    dtype = inputs.k.dtype
    ours = run_op(op, inputs, backend, pos_offset=pos_offset, with_grad=with_grad)
    ref64 = run_op(op, inputs.to(torch.float64, device="cpu"), "reference", pos_offset=pos_offset, with_grad=with_grad)
    same = run_op(op, inputs.to(dtype), "reference", pos_offset=pos_offset, with_grad=with_grad)
    check_rule(f"{backend} {op} output", ours.out, ref64.out, same.out, dtype, _floor(dtype, ref64.out, floor_scale))
    for name in ref64.grads:
        check_rule(
            f"{backend} {op} d{name}",
            ours.grads[name],
            ref64.grads[name],
            same.grads[name],
            dtype,
            _floor(dtype, ref64.grads[name], floor_scale),
        )


def _floor(dtype, ref: torch.Tensor, scale: float) -> float:
    mag = ref.abs().max().item() if ref.numel() else 0.0
    return scale * tolerance_floor(dtype, mag)


@dataclass
class Allocation:
    op: str
    shape: tuple[int, ...]
    numel: int


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by a torch op while active (outputs of aten ops, including
    ``empty``/``zeros`` made by backends and the autograd engine's gradient buffers)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[Allocation] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _flatten_tensors(out):
            self.allocations.append(Allocation(str(func), tuple(t.shape), t.numel()))
        return out

    def largest(self) -> Allocation | None:
        return max(self.allocations, key=lambda a: a.numel, default=None)

    def at_least(self, numel: int) -> list[Allocation]:
        return [a for a in self.allocations if a.numel >= numel]


def _flatten_tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _flatten_tensors(o)


@contextlib.contextmanager
def record_allocations():
    """``with record_allocations() as rec: ...`` then inspect ``rec.allocations`` / ``rec.at_least(n)``."""
    rec = AllocationRecorder()
    with rec:
        yield rec
