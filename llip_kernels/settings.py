"""Every environment variable ``llip_kernels`` reads, read here and nowhere else.

Each function reads the environment when called (not at import), so a variable set by a test, a launcher or a
notebook cell takes effect on the next op. A malformed value raises one ``ValueError`` naming the variable and
what it expects.

| variable | read by | meaning |
|---|---|---|
| ``LLIP_KERNELS_BACKEND`` | dispatch | backend of every op without ``backend=`` (``auto``: choose) |
| ``LLIP_KERNELS_DETERMINISTIC`` | triton, cuda | ``1``: bitwise-repeatable gradients (ordered reductions) |
| ``LLIP_KERNELS_ALLOW_TF32`` | triton | ``1``: TF32 products for float32 inputs (IEEE otherwise) |
| ``LLIP_KERNELS_CACHE`` | compiled backends | build folder of the C++/CUDA extensions (``~/.cache/llip_kernels``) |
| ``LLIP_CPU_THREADS`` | cpu | threads of the cpu kernel (default: torch's) |
| ``LLIP_TORCH_FORM`` | torch | force algebraic form 1, 2 or 3 |
| ``LLIP_TORCH_CHUNK`` | torch | force the chunk sizes, ``"bi,bt"`` (images, texts) |
| ``LLIP_TORCH_BUDGET_MB`` | torch | memory budget the chunk sizes are derived from (default 64) |
| ``TRITON_INTERPRET`` | triton | ``1``: run the Triton kernels on the CPU interpreter (tests) |
"""

from __future__ import annotations

import os
from pathlib import Path

BACKEND = "LLIP_KERNELS_BACKEND"
DETERMINISTIC = "LLIP_KERNELS_DETERMINISTIC"
ALLOW_TF32 = "LLIP_KERNELS_ALLOW_TF32"
CACHE = "LLIP_KERNELS_CACHE"
CPU_THREADS = "LLIP_CPU_THREADS"
TORCH_FORM = "LLIP_TORCH_FORM"
TORCH_CHUNK = "LLIP_TORCH_CHUNK"
TORCH_BUDGET_MB = "LLIP_TORCH_BUDGET_MB"
TRITON_INTERPRET = "TRITON_INTERPRET"

DEFAULT_TORCH_BUDGET_MB = 64.0
_TRUE = ("1", "true", "yes", "on")


def _get(name: str) -> str:
    return os.environ.get(name, "").strip()


def _flag(name: str) -> bool:
    return _get(name).lower() in _TRUE


def requested_backend() -> str | None:
    """``$LLIP_KERNELS_BACKEND``, or None when unset or empty (validated by the dispatcher, which knows the names)."""
    return _get(BACKEND) or None


def deterministic_requested() -> bool:
    """True when bitwise-repeatable results are asked for: ``$LLIP_KERNELS_DETERMINISTIC=1`` or
    ``torch.use_deterministic_algorithms(True)``. Backends that add with atomics switch to ordered reductions."""
    import torch

    return _flag(DETERMINISTIC) or torch.are_deterministic_algorithms_enabled()


def allow_tf32() -> bool:
    """``$LLIP_KERNELS_ALLOW_TF32=1``: float32 inputs may use TF32 tensor-core products (IEEE by default)."""
    return _flag(ALLOW_TF32)


def cache_dir() -> Path:
    """Where the compiled extensions are built: ``$LLIP_KERNELS_CACHE``, else ``~/.cache/llip_kernels``."""
    env = _get(CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llip_kernels"


def cpu_threads() -> int:
    """Threads of the cpu kernel: ``$LLIP_CPU_THREADS``, else torch's current intra-op setting."""
    raw = _get(CPU_THREADS)
    if not raw:
        import torch

        return max(1, torch.get_num_threads())
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${CPU_THREADS} must be a positive integer, got {raw!r}")
    return value


def torch_form() -> int | None:
    """``$LLIP_TORCH_FORM``: the algebraic form the torch backend must use (1, 2 or 3), or None to choose."""
    raw = _get(TORCH_FORM)
    if not raw:
        return None
    if raw not in ("1", "2", "3"):
        raise ValueError(f"${TORCH_FORM} must be 1, 2 or 3, got {raw!r}")
    return int(raw)


def torch_chunk() -> tuple[int, int] | None:
    """``$LLIP_TORCH_CHUNK = "bi,bt"``: the torch backend's chunk sizes (images, texts), or None to plan them."""
    raw = _get(TORCH_CHUNK)
    if not raw:
        return None
    try:
        images, texts = (int(s) for s in raw.split(","))
    except ValueError:
        images = texts = 0
    if images < 1 or texts < 1:
        raise ValueError(f"${TORCH_CHUNK} must be two positive ints 'bi,bt' (images, texts per chunk), got {raw!r}")
    return images, texts


def torch_budget_mb() -> float:
    """``$LLIP_TORCH_BUDGET_MB``: the torch backend's memory budget per chunk, in MiB (default 64)."""
    raw = _get(TORCH_BUDGET_MB)
    if not raw:
        return DEFAULT_TORCH_BUDGET_MB
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"${TORCH_BUDGET_MB} must be a positive number of megabytes, got {raw!r}")
    return value


def triton_interpreting() -> bool:
    """``$TRITON_INTERPRET`` is set (to anything but 0): Triton kernels run on the CPU interpreter."""
    return _get(TRITON_INTERPRET) not in ("", "0")
