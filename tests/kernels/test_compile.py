"""``torch.compile(fullgraph=True)`` of every public op, forward and backward, on every backend that runs here:
a cold start (a fresh process whose first call is the compiled one), then the other ops, then ``dynamic=True`` over
two batch shapes; ``aot_eager`` for every backend (it traces the forward and backward graphs like inductor, without
generating code) and ``inductor`` for the CPU paths. Each case runs ``compile_check.py`` in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("compile_check.py")
REPO = Path(__file__).resolve().parents[2]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CASES = [
    ("reference", "aot_eager"),
    ("torch", "aot_eager"),
    ("cpu", "aot_eager"),
    ("triton", "aot_eager"),
    ("cpu", "inductor"),
    ("torch", "inductor"),
]


@pytest.mark.parametrize("backend,compiler", CASES, ids=lambda v: v)
def test_compiled_ops_match_eager_from_a_cold_start(backend, compiler):
    if backend == "triton" and not (INTERPRETING or torch.cuda.is_available()):
        pytest.skip("the triton backend needs TRITON_INTERPRET=1 or a CUDA device")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), backend, compiler], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.splitlines()[-1] == "ok"
    assert done.stdout.count(": ok") == 6  # three ops, fixed and dynamic shapes
