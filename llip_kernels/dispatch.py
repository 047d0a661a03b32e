"""Choosing a backend: the ``backend=`` argument, else ``$LLIP_KERNELS_BACKEND``, else automatic.

A backend is a module that exposes

    not_supported_reasons(op, problem) -> list[str]      # empty list: it can run this call
    logits(k, v, q, y, w_out, t, b, *, tau) -> Tensor[Bi, Bt] float32
    sigmoid_loss(k, v, q, y, w_out, t, b, *, tau, pos_offset) -> Tensor[] float32
    softmax_loss(k, v, q, y, w_out, t, *, tau) -> Tensor[] float32
    mix(k, v, q, w_out, *, tau, all_pairs) -> Tensor                   (optional)

with ``t``/``b`` 0-dim float32 tensors on the inputs' device and every input already validated
(see :class:`llip_kernels._validate.LlipProblem`). Backends are imported lazily, on first use, so
``import llip_kernels`` works without a GPU, Triton or a compiler; a backend whose module cannot be
imported reports why as its reason.

Automatic choice takes the first backend, in the order for the inputs' device, that gives no reason. A backend
may also expose ``auto_skip_reasons(op, problem) -> list[str]``: reasons to pass it over in the automatic choice
only (an explicit request still runs it), e.g. a shape where the next backend is predicted to be faster.
The CPU order (``cpu`` before ``torch``, and the cpu backend's skip rule) was decided by measurement: see
``llip_kernels.cpu_ext.auto_skip_reasons`` and ``bench/results/NOTES.md``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from ._validate import LlipProblem

# name -> module implementing it. Every backend is listed here from the start so that errors can name it.
BACKEND_MODULES: dict[str, str] = {
    "triton": "llip_kernels.triton_ops",
    "cuda": "llip_kernels.cuda_ext",
    "cpu": "llip_kernels.cpu_ext",
    "torch": "llip_kernels.torch_chunked",
    "reference": "llip_kernels.reference",
}

# Automatic order per device type; the reference comes last because it materialises Bi * Bt * (H*K + D).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch", "reference"),
    "cpu": ("cpu", "torch", "reference"),
}
DEFAULT_ORDER = ("torch", "reference")

ENV_BACKEND = "LLIP_KERNELS_BACKEND"
ENV_DETERMINISTIC = "LLIP_KERNELS_DETERMINISTIC"

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
    return list(mod.not_supported_reasons(problem.op, problem))


def deterministic_requested() -> bool:
    """True when bitwise-repeatable results are asked for: ``$LLIP_KERNELS_DETERMINISTIC=1`` or
    ``torch.use_deterministic_algorithms(True)``. Backends that use atomics switch to ordered reductions."""
    import torch

    env = os.environ.get(ENV_DETERMINISTIC, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    return torch.are_deterministic_algorithms_enabled()


def select_backend(problem: LlipProblem, backend: str | None) -> ModuleType:
    """Resolve ``backend`` (argument, then environment, then automatic) into a module that can run ``problem``."""
    requested = backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)
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
            skip = getattr(load_backend(name), "auto_skip_reasons", None)
            why = list(skip(problem.op, problem)) if skip is not None else []
        if not why:
            return load_backend(name)
        collected.append(f"{name}: " + "; ".join(why))
    raise RuntimeError(f"no backend can run llip {problem.op} here: " + " | ".join(collected))
