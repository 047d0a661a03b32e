"""The triton kernels compile for Hopper (sm_90a) and Ampere (sm_80) without spilling registers.

Compiling needs the real Triton compiler, so the table script runs in a subprocess without TRITON_INTERPRET
(the suite sets it). The quick subset is the largest head dim (G/14, d = 160) in bf16 and fp32: the sigmoid
loss forward and both backward flavours; ``bench/triton_compile_table.py`` without ``--quick`` does all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aot_compile_sm90a_sm80_no_spills(tmp_path):
    out = tmp_path / "table.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a cold cache: really compile
    res = subprocess.run(
        [sys.executable, "bench/triton_compile_table.py", "--quick", "--workers", "2", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    for r in rows:
        assert r["registers"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["smem_ok"], r
    # bf16 products must land on Hopper's warpgroup tensor-core instructions
    assert all(r["wgmma"] for r in rows if r["arch"] == "sm_90a" and r["dtype"] == "bf16")
