"""The triton kernels compile for Hopper (sm_90a) and Ampere (sm_80) without spilling registers.

Compiling needs the real Triton compiler, so the table script runs in a subprocess without TRITON_INTERPRET
(the suite sets it). The test compiles the script's ``--quick`` subset (``QUICK`` in the script: every kernel
of the B/16 head in bf16 and fp32 on sm_90a, the G/14 head in bf16, and the sm_80 cases that need smaller
tiles or a register cap); ``bench/triton_compile_table.py`` without ``--quick`` compiles all 260 launch
configurations (bench/results/triton_compile_table.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_aot_compile_sm90a_sm80_no_spills(tmp_path):
    from bench.triton_compile_table import QUICK

    out = tmp_path / "table.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a cold cache: really compile
    res = subprocess.run(
        [sys.executable, "-m", "bench", "compile-table", "--quick", "--workers", "2", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    arch = {90: "sm_90a", 80: "sm_80"}
    assert {(r["config"], r["dtype"], r["arch"]) for r in rows} == {(c, t, arch[a]) for c, t, a in QUICK}
    assert sum(r["config"] == "B/16" for r in rows) == 2 * 13, "every kernel of one head, in both dtypes"
    for r in rows:
        assert r["registers"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["smem_ok"], r
        # fp32 4-warp programs must carry the register cap (without it ptxas settles for 128-168 and spills)
        assert r["num_warps"] == 8 or r["dtype"] != "fp32" or r["maxnreg"] == 255, r
    # bf16 products must land on Hopper's warpgroup tensor-core instructions
    assert all(r["wgmma"] for r in rows if r["arch"] == "sm_90a" and r["dtype"] == "bf16")
