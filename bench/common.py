"""Shared pieces of the benchmarks: paper shapes, run metadata, a timer and the matmul yardstick.

Timing model: every measurement is ``setup()`` (not timed: builds the autograd graph for a backward-only
measurement, clears gradients) followed by ``fn()`` (timed), synchronising the device around ``fn``.
Spread is reported as the interquartile range plus min/max; on 2 shared CPU cores only ratios measured
side by side in one run mean much.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Config:
    """Mixer sizes of one paper configuration (docs/design.md section 2); ``d = D // H``."""

    name: str
    K: int
    H: int
    D: int
    tau: float

    @property
    def d(self) -> int:
        return self.D // self.H


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("B/32", 64, 8, 512, 5.0),
        Config("B/16", 32, 8, 512, 5.0),
        Config("L/14", 64, 8, 768, 1.0),
        Config("H/14", 64, 8, 1024, 5.0),
        Config("G/14", 64, 8, 1280, 5.0),
        # Not a paper config: small enough for the interpreter-free unit tests of the harness itself.
        Config("tiny", 4, 2, 32, 5.0),
    )
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Milliseconds per call over ``n`` timed repetitions (``samples``: the raw times, not saved)."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int
    samples: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, ms: list[float]) -> Timing:
        ms = sorted(ms)
        q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        return cls(median=statistics.median(ms), p25=q[0], p75=q[2], min=ms[0], max=ms[-1], n=len(ms), samples=ms)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("median", "p25", "p75", "min", "max", "n")}


def measure(
    fn: Callable[[], object],
    setup: Callable[[], object] | None = None,
    *,
    device="cpu",
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    min_time_s: float = 0.5,
    max_time_s: float = 10.0,
) -> Timing:
    """Time ``fn`` after ``warmup`` untimed calls; repeat at least ``min_reps`` times and until ``min_time_s`` of
    timed work, stopping at ``max_reps`` or ``max_time_s`` (whichever first, once ``min_reps`` are done)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while True:
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        total = sum(times)
        wall = time.perf_counter() - started
        if len(times) >= max_reps or (len(times) >= min_reps and (total >= min_time_s or wall >= max_time_s)):
            break
    return Timing.from_samples([t * 1e3 for t in times])


def cuda_event_median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls timed with CUDA events, after one untimed call (which also
    compiles). The GPU check scripts' timer (``cuda_check.py``, ``triton_bench.py``)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cuda_event_matmul_tflops(reps: int, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """TFLOP/s of an ``n``-cubed ``torch.mm`` on the GPU, timed by :func:`cuda_event_median_ms`: the GPU check
    scripts' yardstick."""
    m = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / (cuda_event_median_ms(lambda: m @ m, reps) * 1e-3) / 1e12


def matmul_tflops(device: torch.device | str, dtype: torch.dtype, n: int | None = None) -> dict:
    """FLOP/s of one large square ``torch.mm`` in ``dtype`` on ``device``: the yardstick every row is divided
    by (the machine's practical peak, measured in the same run rather than hard-coded). The fastest repetition
    counts, since other processes can only slow a repetition down."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t = measure(lambda: torch.mm(a, b), device=device, warmup=2, min_reps=5, min_time_s=1.0)
    return {
        "n": n,
        "dtype": dtype_name(dtype),
        "median_ms": t.median,
        "min_ms": t.min,
        "tflops": 2 * n**3 / (t.min * 1e-3) / 1e12,
    }


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_metadata(device: torch.device | str, command: str | None = None) -> dict:
    """Machine, versions, git revision and UTC timestamp recorded at the top of every result file."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken: record it rather than fail the run
        triton_version = None
    meta = {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "command": command,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    return meta
