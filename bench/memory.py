"""Peak memory of one benchmark case.

GPU: the CUDA caching allocator's peak (``max_memory_allocated``) minus what was allocated before the op.

CPU: torch has no allocator statistics there, so we measure the process itself. Each measurement runs in a
fresh subprocess (``python -m bench.memory CASE_JSON``) so earlier cases cannot leave a high-water mark behind:
it builds the inputs, runs the op once to warm up (lazy initialisation, thread pools, compiled code), frees
the outputs and gradients and hands freed memory back to the kernel (glibc ``malloc_trim``; large blocks are
pinned to their own mmaps with ``mallopt``, so the measured call cannot reuse resident free memory), resets
the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, Linux >= 4.0), reads the peak RSS (``VmHWM``,
which then equals the current RSS) as the baseline, runs the op once more and reports the new peak minus the
baseline. Where the counter cannot be reset it skips the warm-up and uses ``resource.getrusage().ru_maxrss``
minus its pre-op value instead (a lower bound when the op's peak is below an earlier one). The ``method``
field of each row says which was used.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict

import torch

from .common import REPO
from .providers import Built, Case, build


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def vm_hwm_bytes() -> int | None:
    """The kernel's peak RSS of this address space (``VmHWM``), or None where /proc is unavailable.

    Unlike ``ru_maxrss`` it is not also raised by threads that have exited (torch and triton start and stop
    helper threads), so after a reset it covers exactly what ran since."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Make the C allocator give freed memory back to the kernel, so that RSS tracks live memory.

    glibc keeps freed blocks mapped (and, after a large block is freed, raises its mmap threshold so that later
    large blocks come from the heap): without this, the warm-up call leaves enough free-but-resident memory for
    the measured call to reuse, and its peak reads as zero. A no-op where glibc is not the C library."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve every block of ``nbytes`` or more with its own mmap (returned to the kernel on free), and stop
    glibc from raising that threshold dynamically (``mallopt(M_MMAP_THRESHOLD)``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def _run_once(built: Built) -> None:
    if built.setup is not None:
        built.setup()
    built.fn()


def _free(built: Built) -> None:
    for t in built.tensors.values():
        t.grad = None
    gc.collect()
    release_freed_memory()


def measure_in_process_cpu(built: Built) -> dict:
    """Peak RSS increase of one call of ``built`` in *this* process (use a fresh one: see module doc)."""
    can_reset = reset_peak_rss() and vm_hwm_bytes() is not None  # probe once, before the op allocates
    if can_reset:
        _run_once(built)
        _free(built)
        reset_peak_rss()
        read, method = vm_hwm_bytes, "peak RSS (VmHWM) after clear_refs reset, warm"
    else:
        read, method = ru_maxrss_bytes, "ru_maxrss minus pre-op peak, cold (lower bound)"
    base = read()
    _run_once(built)
    peak = read()
    return {"peak_bytes": max(0, peak - base), "baseline_bytes": base, "method": method}


def measure_cuda(built: Built) -> dict:
    _run_once(built)  # warm-up: lazy init and autotuning must not count
    _free(built)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run_once(built)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak - base, "baseline_bytes": base, "method": "torch.cuda.max_memory_allocated"}


def measure_subprocess(case: Case, timeout_s: float = 300.0, threads: int | None = None) -> dict:
    """Run :func:`measure_in_process_cpu` for ``case`` in a fresh interpreter; returns its dict, or
    ``{"error": ...}`` when the child fails (e.g. killed for memory, or over ``timeout_s``)."""
    cmd = [sys.executable, "-m", "bench.memory", json.dumps(asdict(case))]
    if threads is not None:
        cmd.append(str(threads))
    # Interpreted Triton is never benchmarked, and importing the backends under the interpreter costs seconds.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory measurement over {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": f"memory child failed (exit {proc.returncode}): {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    pin_mmap_threshold()
    case = Case(**json.loads(argv[0]))
    if len(argv) > 1:
        torch.set_num_threads(int(argv[1]))
    built = build(case)
    print(json.dumps(measure_in_process_cpu(built)))


if __name__ == "__main__":
    _child(sys.argv[1:])
