"""Choosing a backend: the ``backend=`` argument, else ``$LLIP_KERNELS_BACKEND``, else automatic.

Backends (``llip_kernels/backends/``, and ``reference``) implement :class:`llip_kernels.backends.Backend`. Their
modules are imported with this one, and importing them is cheap and safe (nothing is built; Triton, a GPU or a
compiler are only needed on first use), so ``import llip_kernels`` works anywhere and ``torch.compile`` never has
to trace an import; a backend whose module cannot be imported reports why as its reason. An explicit request that
a backend cannot serve raises with every reason it gave; the automatic choice takes the first backend, in the order
for the inputs' device, that gives none, unless a measured speed rule (:data:`YIELDS`) passes it over. See
docs/design.md section 8.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from . import settings
from ._validate import LlipProblem

# name -> module implementing it. Every backend is listed here from the start so that errors can name it.
BACKEND_MODULES: dict[str, str] = {
    "triton": "llip_kernels.backends.triton",
    "cuda": "llip_kernels.backends.cuda",
    "cpu": "llip_kernels.backends.cpu",
    "torch": "llip_kernels.backends.torch",
    "reference": "llip_kernels.reference",
}

# Automatic order per device type; the reference comes last because it materialises Bi * Bt * (H*K + D).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch", "reference"),
    "cpu": ("cpu", "torch", "reference"),
}
DEFAULT_ORDER = ("torch", "reference")

# Measured speed rules of the automatic choice: backend -> (the backend it steps aside for, FLOP ratio). It steps
# aside when the other runs another algebraic form for the call and its own FLOPs (forward, plus backward when
# gradients are wanted) reach that multiple of the other's. An explicit request still runs it.
#
# cpu -> torch: form 3's per-image Gram matrices (2KD^2 + 2(HK)^2 d per image) only pay off when each image meets
# many texts, and its 2(HK)^2 per pair exceeds form 2's pair work at K = 64, d = 64 (B/32); so at K = 64 and small
# batches forms 1 / 2 are cheaper, and the torch backend picks the cheapest form per shape. Measured on 2 idle
# cores (bench/results/dispatch_cpu_paper.json: 5 paper configs x Bi = Bt in {128, 256} x {forward,
# forward+backward}): where the forms differ, the time ratio cpu / torch is about
# 0.85x the FLOP ratio (the fused kernel runs its FLOPs faster), and 1.05 picks the faster backend in 18 of the 20
# cases, losing 2% and 6% in the other two. Where both use form 3 the fused kernel wins whatever the FLOPs say (the
# llip-tiny head, K 8 H 4 D 128: 4.7-8.5x; B/16 at Bi = Bt = 1024: 2.6x), so no FLOP rule applies there.
# bf16 inputs with the kernel's bf16 products (the torch backend computes form 3 in float32 for them): re-measured
# the same way (bench/results/dispatch_cpu_paper_bf16.json, 2-core AMD EPYC), the time ratio is 0.6-1.3x the
# FLOP ratio; 1.15 picks the faster backend in 19 of the 20 cases, losing 14% in the other (B/32, 256,
# fwd+bwd), where 1.05 would lose 34% and 23% on two forward calls of G/14 and H/14.
# backend -> (the backend it steps aside for, FLOP ratio, FLOP ratio when it runs bf16 products)
YIELDS: dict[str, tuple[str, float, float]] = {"cpu": ("torch", 1.05, 1.15)}

ENV_BACKEND = settings.BACKEND
ENV_DETERMINISTIC = settings.DETERMINISTIC

_loaded: dict[str, ModuleType | str] = {}


def load_backend(name: str) -> ModuleType | str:
    """The backend's module, or a string saying why it cannot be imported."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKEND_MODULES)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKEND_MODULES[name])
        except ModuleNotFoundError as e:
            if e.name == BACKEND_MODULES[name]:
                _loaded[name] = "not implemented in this version"
            else:
                _loaded[name] = f"cannot import {BACKEND_MODULES[name]}: {e}"
        except Exception as e:  # a broken optional dependency must not break the package
            _loaded[name] = f"cannot import {BACKEND_MODULES[name]}: {type(e).__name__}: {e}"
    return _loaded[name]


def reasons_for(name: str, problem: LlipProblem) -> list[str]:
    """Why backend ``name`` cannot run ``problem`` (empty when it can)."""
    mod = load_backend(name)
    if isinstance(mod, str):
        return [mod]
    if problem.op == "mix" and not hasattr(mod, "mix"):
        return ["does not implement llip_mix"]
    return list(mod.not_supported_reasons(problem))


def environment_reasons(name: str) -> list[str]:
    """What this environment lacks for backend ``name``, judged without inputs."""
    mod = load_backend(name)
    return [mod] if isinstance(mod, str) else list(mod.environment_reasons())


def deterministic_requested() -> bool:
    """See :func:`llip_kernels.settings.deterministic_requested`."""
    return settings.deterministic_requested()


def yield_reasons(name: str, problem: LlipProblem) -> list[str]:
    """Why automatic dispatch passes ``name`` over for a faster backend on this call (:data:`YIELDS`)."""
    if name not in YIELDS:
        return []
    other_name, max_ratio, bf16_ratio = YIELDS[name]
    ours, other = load_backend(name), load_backend(other_name)
    if getattr(ours, "bf16_products", lambda dtype: False)(problem.dtype):
        max_ratio = bf16_ratio
    if isinstance(other, str) or reasons_for(other_name, problem):
        return []
    form = other.algebraic_form(problem)
    if form == ours.algebraic_form(problem):
        return []
    import torch

    training = problem.requires_grad and torch.is_grad_enabled()
    dims = (problem.op, problem.Bi, problem.Bt, problem.H, problem.K, problem.d)

    def call_flops(backend) -> float:  # the forward, plus the backward when gradients are wanted
        return backend.flops(*dims) + (backend.flops(*dims, True) if training else 0.0)

    mine, theirs = call_flops(ours), call_flops(other)
    if theirs <= 0 or mine < max_ratio * theirs:
        return []
    return [
        f"the {other_name} backend is predicted faster here: {mine:.3g} FLOPs in form "
        f"{ours.algebraic_form(problem)} vs {theirs:.3g} in its form {form} (automatic choice keeps {name} below "
        f"{max_ratio:.2f}x; backend={name!r} still runs it)"
    ]


def select_backend(problem: LlipProblem, backend: str | None) -> ModuleType:
    """Resolve ``backend`` (argument, then environment, then automatic) into a module that can run ``problem``."""
    requested = backend if backend is not None else settings.requested_backend()
    if requested is not None and requested != "auto":
        if requested not in BACKEND_MODULES:
            source = "backend=" if backend is not None else f"${ENV_BACKEND}="
            raise ValueError(
                f"unknown backend {source}{requested!r}; choose one of {sorted(BACKEND_MODULES)} or 'auto'"
            )
        why = reasons_for(requested, problem)
        if why:
            raise RuntimeError(
                f"backend {requested!r} cannot run llip {problem.op} on {problem.dtype} {problem.device.type} inputs "
                f"(Bi={problem.Bi}, Bt={problem.Bt}, H={problem.H}, K={problem.K}, d={problem.d}): " + "; ".join(why)
            )
        return load_backend(requested)
    order = AUTO_ORDER.get(problem.device.type, DEFAULT_ORDER)
    collected = []
    for i, name in enumerate(order):
        why = reasons_for(name, problem)
        if not why and i + 1 < len(order):  # the last candidate is never skipped for speed
            why = yield_reasons(name, problem)
        if not why:
            return load_backend(name)
        collected.append(f"{name}: " + "; ".join(why))
    raise RuntimeError(f"no backend can run llip {problem.op} here: " + " | ".join(collected))


for _name in BACKEND_MODULES:  # at import: torch.compile traces the dispatch of a call, which must not import
    load_backend(_name)
