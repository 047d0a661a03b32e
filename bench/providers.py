"""What the benchmarks run: one ``Case`` (op, mode, provider, shape, dtype, device) -> timed callables.

Providers of the Llip ops (``logits``, ``sigmoid_loss``, ``softmax_loss``):

- ``reference``, ``torch``, ``cpu``, ``triton``, ``cuda``: llip_kernels backends, called only through the public
  API (``llip_kernels.llip_*(..., backend=name)``); availability from ``llip_kernels.backend_reasons(...)``.
- ``reference_compile``: the same public call to the reference backend wrapped in ``torch.compile``.
- ``sdpa``: what one would write with an attention library. Each image is a batch entry whose K mixture tokens
  are the keys/values and whose queries are the Bt texts: ``F.scaled_dot_product_attention(q [c, H, Bt, d],
  k [c, H, K, d], v, scale=1/tau)`` for a chunk of c images, then a torch epilogue (``@ w_out``, normalise,
  cosine with y, loss). Chunked over images and checkpointed per chunk (as the Llip reference code does), so
  memory stays at one chunk's ``[c, Bt, D]`` instead of ``[Bi, Bt, D]``.
- ``xformers``: the same with ``xformers.ops.memory_efficient_attention`` (GPU only; imported lazily).

Pooled baselines (ops ``pooled_sigmoid_loss``, ``pooled_softmax_loss``; provider ``pooled``): SigLIP / CLIP
losses of ``llip_kernels`` on one pooled image vector, i.e. what the mixer replaces.

Modes: ``fwd`` (inference: no autograd graph), ``bwd`` (backward only; the forward runs untimed in setup),
``fwd+bwd``.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import llip_kernels
from llip_kernels import dispatch, settings
from llip_kernels._validate import check_llip_inputs
from llip_kernels.algebra import pair_flops, sigmoid_loss_from_logits, softmax_loss_from_logits

from .common import CONFIGS, DTYPES, Config

LLIP_OPS = ("logits", "sigmoid_loss", "softmax_loss")
POOLED_OPS = ("pooled_sigmoid_loss", "pooled_softmax_loss")
OPS = LLIP_OPS + POOLED_OPS
MODES = ("fwd", "bwd", "fwd+bwd")
BACKEND_PROVIDERS = ("reference", "torch", "cpu", "triton", "cuda")
LLIP_PROVIDERS = ("reference", "reference_compile", "torch", "cpu", "triton", "cuda", "sdpa", "xformers")
PROVIDERS = LLIP_PROVIDERS + ("pooled",)

# Elements of one [c, Bt, D + H*K] chunk of the attention-library baselines (about 256 MB in float32).
SDPA_CHUNK_ELEMS = 1 << 26


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    provider: str
    config: str
    Bi: int
    Bt: int
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def cfg(self) -> Config:
        return CONFIGS[self.config]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key(self) -> tuple:
        """What identifies a row across runs (the regression guard matches on it)."""
        c = self.cfg
        return (
            self.op,
            self.mode,
            self.provider,
            self.config,
            self.Bi,
            self.Bt,
            c.H,
            c.K,
            c.d,
            self.dtype,
            self.device,
        )


def applicable(op: str, provider: str) -> bool:
    """Pooled ops have exactly one provider; the Llip ops every other one."""
    return (provider == "pooled") == (op in POOLED_OPS)


@dataclass
class Built:
    """A case ready to time: ``setup()`` untimed, then ``fn()`` timed."""

    fn: Callable[[], object]
    setup: Callable[[], object] | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Unavailable(Exception):
    """The provider cannot run this case here; ``reasons`` says why."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def make_tensors(case: Case) -> dict[str, torch.Tensor]:
    """Seeded gaussian inputs (the ``gaussian`` kind of ``llip_kernels.testing.make_llip_inputs``: unit-variance
    k, v, q, y, ``w_out`` scaled by D**-0.5, SigLIP init t = 10, b = -10) in the case's dtype, drawn directly on
    the case's device in float32 (benchmark shapes are too large to draw in float64 on the host)."""
    c = case.cfg
    grad = case.mode != "fwd"
    dev, dt = torch.device(case.device), case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale
        return x.to(dt).requires_grad_(grad)

    def scalar(value):
        return torch.tensor(value, device=dev, dtype=torch.float32).requires_grad_(grad)

    if case.op in POOLED_OPS:  # one pooled vector per image / text: the SigLIP / CLIP setting
        return {"img": randn(case.Bi, c.D), "txt": randn(case.Bt, c.D), "t": scalar(10.0), "b": scalar(-10.0)}
    return {
        "k": randn(case.Bi, c.H, c.K, c.d),
        "v": randn(case.Bi, c.H, c.K, c.d),
        "q": randn(case.Bt, c.H, c.d),
        "y": randn(case.Bt, c.D),
        "w_out": randn(c.D, c.D, scale=c.D**-0.5),
        "t": scalar(10.0),
        "b": scalar(-10.0),
    }


def unavailable_reasons(case: Case, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Why ``case`` cannot run here (empty: it can)."""
    if not applicable(case.op, case.provider):
        return [f"provider {case.provider} does not implement {case.op}"]
    if case.op in ("softmax_loss", "pooled_softmax_loss") and case.Bi != case.Bt:
        return ["softmax loss needs Bi == Bt"]
    if case.provider == "pooled":
        return []
    x = tensors
    if case.provider == "triton" and settings.triton_interpreting():
        return ["TRITON_INTERPRET is set: interpreted Triton is a correctness tool, not benchmarked"]
    if case.mode == "bwd" and case.op in _fused_training_ops(case.provider):
        return [f"{case.provider} computes {case.op}'s gradients inside the forward sweep; see its fwd+bwd row"]
    if case.provider in BACKEND_PROVIDERS or case.provider == "reference_compile":
        name = "reference" if case.provider == "reference_compile" else case.provider
        reasons = _backend_reasons(name, case, x)
        if case.provider == "reference_compile" and case.device == "cpu" and not shutil.which("g++"):
            reasons.append("torch.compile on CPU needs a C++ compiler (g++ not found)")
        return reasons
    if case.provider == "sdpa":
        return []
    if case.provider == "xformers":
        if case.device != "cuda":
            return ["xformers memory-efficient attention has no CPU kernels (GPU only)"]
        try:
            importlib.import_module("xformers.ops")
        except Exception as e:  # ImportError, or a compiled part that does not load
            return [f"cannot import xformers.ops: {type(e).__name__}: {e}"]
        return []
    return [f"unknown provider {case.provider!r}"]


def _fused_training_ops(provider: str) -> tuple[str, ...]:
    """Ops whose backward work the provider does inside the forward call when gradients are wanted: their
    "bwd" row would time a rescaling, not a backward pass."""
    if provider not in BACKEND_PROVIDERS:
        return ()
    mod = dispatch.load_backend(provider)
    return () if isinstance(mod, str) else tuple(getattr(mod, "FUSED_TRAINING_OPS", ()))


def _backend_reasons(name: str, case: Case, x: dict[str, torch.Tensor]) -> list[str]:
    args = (x["k"], x["v"], x["q"], x["y"], x["w_out"])
    try:
        reasons = llip_kernels.backend_reasons(*args, tau=case.cfg.tau, op=case.op)
        return list(reasons.get(name, [f"unknown backend {name}"]))
    except (TypeError, ValueError) as e:
        return [f"invalid call: {e}"]
    except Exception:
        # Another backend's half-written module can break the all-backends query: ask about this one alone.
        try:
            problem = check_llip_inputs(case.op, *args, tau=case.cfg.tau)
            return list(dispatch.reasons_for(name, problem))
        except Exception as e:
            return [f"backend {name} cannot say whether it runs: {type(e).__name__}: {e}"]


# ---- forward functions: (tensors) -> output ------------------------------------------------------------------


def _public_forward(op: str, backend: str, tau: float) -> Callable[[dict], torch.Tensor]:
    def forward(x: dict) -> torch.Tensor:
        if op == "logits":
            return llip_kernels.llip_logits(
                x["k"],
                x["v"],
                x["q"],
                x["y"],
                x["w_out"],
                tau=tau,
                logit_scale=x["t"],
                logit_bias=x["b"],
                backend=backend,
            )
        if op == "sigmoid_loss":
            return llip_kernels.llip_sigmoid_loss(
                x["k"], x["v"], x["q"], x["y"], x["w_out"], x["t"], x["b"], tau=tau, backend=backend
            )
        return llip_kernels.llip_softmax_loss(
            x["k"], x["v"], x["q"], x["y"], x["w_out"], x["t"], tau=tau, backend=backend
        )

    return forward


_compiled: dict[tuple, Callable] = {}


def _compiled_forward(op: str, tau: float) -> Callable[[dict], torch.Tensor]:
    key = (op, tau)
    if key not in _compiled:
        inner = _public_forward(op, "reference", tau)
        _compiled[key] = torch.compile(
            lambda k, v, q, y, w_out, t, b: inner(dict(k=k, v=v, q=q, y=y, w_out=w_out, t=t, b=b))
        )
    fn = _compiled[key]
    return lambda x: fn(x["k"], x["v"], x["q"], x["y"], x["w_out"], x["t"], x["b"])


def _attn_sdpa(qh: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tau: float) -> torch.Tensor:
    """``qh: [H, Bt, d]``, ``kc, vc: [c, H, K, d]`` -> mixed ``[c, Bt, H*d]``."""
    c, H, _, d = kc.shape
    m = F.scaled_dot_product_attention(qh.expand(c, -1, -1, -1), kc, vc, scale=1.0 / tau)  # [c, H, Bt, d]
    return m.permute(0, 2, 1, 3).reshape(c, qh.shape[1], H * d)


def _attn_xformers(qh: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tau: float) -> torch.Tensor:
    import xformers.ops as xops  # lazy: GPU only, and its import is slow

    c, H, _, d = kc.shape
    q4 = qh.permute(1, 0, 2).unsqueeze(0).expand(c, -1, -1, -1)  # [c, Bt, H, d]
    m = xops.memory_efficient_attention(q4, kc.transpose(1, 2), vc.transpose(1, 2), scale=1.0 / tau)  # [c, Bt, H, d]
    return m.reshape(c, qh.shape[1], H * d)


def _attention_forward(op: str, attn: Callable, tau: float) -> Callable[[dict], torch.Tensor]:
    """The mixer through an attention kernel + torch epilogue, chunked (and checkpointed) over images."""

    def block(kc, vc, qh, y_hat, w_out):
        z = attn(qh, kc, vc, tau) @ w_out  # [c, Bt, D]
        return (F.normalize(z, dim=-1) * y_hat).sum(-1).float()  # cos: [c, Bt]

    def forward(x: dict) -> torch.Tensor:
        k, v, q, y, w_out = x["k"], x["v"], x["q"], x["y"], x["w_out"]
        Bi, H, K, d = k.shape
        Bt = q.shape[0]
        chunk = max(1, SDPA_CHUNK_ELEMS // max(1, Bt * (H * d + H * K)))
        qh = q.permute(1, 0, 2)  # [H, Bt, d]
        y_hat = F.normalize(y, dim=-1)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, q, y, w_out))
        rows = []
        for s in range(0, Bi, chunk):
            args = (k[s : s + chunk], v[s : s + chunk], qh, y_hat, w_out)
            rows.append(checkpoint(block, *args, use_reentrant=False) if grad else block(*args))
        lg = x["t"] * torch.cat(rows) + (0.0 if op == "softmax_loss" else x["b"])
        if op == "logits":
            return lg
        return sigmoid_loss_from_logits(lg, 0) if op == "sigmoid_loss" else softmax_loss_from_logits(lg)

    return forward


def _pooled_forward(op: str) -> Callable[[dict], torch.Tensor]:
    if op == "pooled_sigmoid_loss":
        return lambda x: llip_kernels.sigmoid_loss(x["img"], x["txt"], x["t"], x["b"])
    return lambda x: llip_kernels.softmax_loss(x["img"], x["txt"], x["t"])


def forward_for(case: Case) -> Callable[[dict], torch.Tensor]:
    tau = case.cfg.tau
    if case.provider == "pooled":
        return _pooled_forward(case.op)
    if case.provider in BACKEND_PROVIDERS:
        return _public_forward(case.op, case.provider, tau)
    if case.provider == "reference_compile":
        return _compiled_forward(case.op, tau)
    if case.provider == "sdpa":
        return _attention_forward(case.op, _attn_sdpa, tau)
    if case.provider == "xformers":
        return _attention_forward(case.op, _attn_xformers, tau)
    raise ValueError(f"unknown provider {case.provider!r}")


def build(case: Case) -> Built:
    """Inputs + timed callables for ``case``; raises :class:`Unavailable` when the provider cannot run it."""
    if case.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {case.mode!r}")
    tensors = make_tensors(case)
    reasons = unavailable_reasons(case, tensors)
    if reasons:
        raise Unavailable(reasons)
    forward = forward_for(case)
    leaves = [t for t in tensors.values() if t.requires_grad]

    def clear_grads():
        for t in leaves:
            t.grad = None

    if case.mode == "fwd":

        def fwd():
            with torch.no_grad():
                return forward(tensors)

        return Built(fwd, None, tensors)

    def backward(out: torch.Tensor):
        # Logits need a cotangent; ones keep it deterministic and cheap.
        out.backward(torch.ones_like(out) if out.dim() else None)

    if case.mode == "fwd+bwd":

        def setup():
            clear_grads()

        return Built(lambda: backward(forward(tensors)), setup, tensors)

    held: dict[str, torch.Tensor] = {}

    def setup_bwd():
        clear_grads()
        held["out"] = forward(tensors)

    def bwd():
        backward(held.pop("out"))

    return Built(bwd, setup_bwd, tensors)


# ---- FLOP model --------------------------------------------------------------------------------------------


def flop_model(case: Case) -> dict:
    """FLOPs of the algebraic form the provider uses (docs/design.md section 4) and form-1 "effective" FLOPs,
    for the case's mode.

    Backends count their own FLOPs (``flops(op, Bi, Bt, H, K, d, backward)``: the forward pass, or the backward
    pass alone, pair work plus precomputations, from :mod:`llip_kernels.algebra`'s model); the other providers
    (the reference's compiled twin, the attention baselines) are taken to compute form 1, the as-written
    formula, pairs only, with the usual backward = 2 x forward. Pooled losses: ``2 D`` per pair (the cosine
    matrix).
    """
    c = case.cfg
    pairs = case.Bi * case.Bt
    f1 = pair_flops(1, c.H, c.K, c.d) * pairs
    form = "form 1 (4KD + 2D^2 per pair; bwd = 2 x fwd)"
    fwd, bwd = f1, 2 * f1
    if case.op in POOLED_OPS:
        form = "pooled cosine (2D per pair; bwd = 2 x fwd)"
        fwd = 2 * c.D * pairs
        bwd = 2 * fwd
        f1_fwd, f1_bwd = fwd, bwd
    else:
        f1_fwd, f1_bwd = f1, 2 * f1
        if case.provider in BACKEND_PROVIDERS:
            mod = dispatch.load_backend(case.provider)
            if not isinstance(mod, str) and hasattr(mod, "flops"):
                op = case.op
                fwd = float(mod.flops(op, case.Bi, case.Bt, c.H, c.K, c.d, False))
                bwd = float(mod.flops(op, case.Bi, case.Bt, c.H, c.K, c.d, True))
                form = getattr(mod, "FLOP_FORM", f"{case.provider}.flops()")
    per_mode = {"fwd": (fwd, f1_fwd), "bwd": (bwd, f1_bwd), "fwd+bwd": (fwd + bwd, f1_fwd + f1_bwd)}
    used, effective = per_mode[case.mode]
    return {"form": form, "flops": used, "flops_form1": effective}
