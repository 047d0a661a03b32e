"""Compile every CUDA kernel file with nvcc for the GPUs we target (sm_90a: H100/H200, sm_80: A100), without a GPU,
and check what ptxas says: no register spills and no local-memory stack. The flags mimic a torch extension build
(torch defines away the implicit half/bfloat16 conversions).

Registers and shared memory per kernel are attached to the test report (``record_property``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from llip_kernels.backends import cuda as cuda_backend

CUDA_HOME = cuda_backend.cuda_home()
pytestmark = pytest.mark.skipif(CUDA_HOME is None, reason="nvcc not found (set CUDA_HOME to a CUDA toolkit)")

SRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
TORCH_LIKE_FLAGS = [
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _ptxas_table(log: str) -> dict[str, dict[str, int]]:
    """kernel name -> {registers, spill_stores, spill_loads, stack} from ``ptxas -v`` output."""
    table, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            table[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            table[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            table[current]["registers"] = int(m[1])
    return table


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Both cubins at once (2 cores): sm_90a (H100/H200) and sm_80 (A100)."""
    out = tmp_path_factory.mktemp("cuda")
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
    common = [nvcc, *TORCH_LIKE_FLAGS, "-Xptxas", "-v", "-cubin", "-I", str(SRC), str(SRC / "llip_kernels.cu")]
    procs = {
        arch: subprocess.Popen(
            [*common, f"-arch={arch}", "-o", str(out / f"{arch}.cubin")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for arch in ("sm_90a", "sm_80")
    }
    logs = {}
    for arch, proc in procs.items():
        log, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"nvcc failed for {arch}:\n{log}"
        logs[arch] = log
    return out, logs


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_kernels_compile_without_spills(builds, arch, record_property):
    _, logs = builds
    table = _ptxas_table(logs[arch])
    kernels = {k: v for k, v in table.items() if "kernel" in k}
    # forward (cosine, loss) + loss backward (3 modes), each for bfloat16 and float16
    assert len(kernels) == 10, f"expected 10 kernel instantiations, got {sorted(kernels)}"
    for name, info in kernels.items():
        record_property(f"{arch} {name}", info)
        assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, f"{arch} {name} spills: {info}"
        assert info.get("stack") == 0, f"{arch} {name} uses a local-memory stack: {info}"
        assert info["registers"] <= 255, f"{arch} {name}: {info}"
