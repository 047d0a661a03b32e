"""The microbenchmarks as a pytest-benchmark suite (not collected by the normal test run: testpaths is tests/).

    .venv/bin/python -m pytest bench/test_bench_ops.py --benchmark-only -q
    .venv/bin/python -m pytest bench/test_bench_ops.py --benchmark-json bench/results/pytest_bench.json
    .venv/bin/python -m pytest bench/test_bench_ops.py -k "sigmoid and fwd+bwd" --benchmark-compare

Shapes come from the environment: ``LLIP_BENCH_CONFIGS`` (default ``B/16``), ``LLIP_BENCH_BATCH`` (default
``128`` on CPU, ``4096`` on GPU; ``BixBt`` allowed), ``LLIP_BENCH_DTYPE`` (default float32 on CPU, bfloat16 on
GPU). Providers that cannot run here are skipped with their reasons. Each benchmark's ``extra_info`` carries
the FLOP model, FLOP/s and effective (form-1) FLOP/s; peak memory is measured by ``python -m bench.run``.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.providers import LLIP_PROVIDERS, MODES, OPS, Case, Unavailable, applicable, build, flop_model
from bench.run import parse_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = os.environ.get("LLIP_BENCH_CONFIGS", "B/16").split(",")
BATCHES = [parse_batch(b) for b in os.environ.get("LLIP_BENCH_BATCH", "4096" if DEVICE == "cuda" else "128").split(",")]
DTYPE = os.environ.get("LLIP_BENCH_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32")

CASES = [
    Case(op, mode, prov, cfg, bi, bt, DTYPE, DEVICE)
    for op in OPS
    for mode in MODES
    for prov in LLIP_PROVIDERS + ("pooled",)
    for cfg in CONFIGS
    for bi, bt in BATCHES
    if applicable(op, prov)
]


def _case_id(c: Case) -> str:
    return f"{c.op}-{c.mode}-{c.provider}-{c.config.replace('/', '')}-Bi{c.Bi}-Bt{c.Bt}-{c.dtype}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_op(benchmark, case: Case):
    try:
        built = build(case)
    except Unavailable as e:
        pytest.skip("; ".join(e.reasons))
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def setup():
        if built.setup is not None:
            built.setup()
        sync()

    def fn():
        built.fn()
        sync()

    benchmark.group = f"{case.op} {case.mode} {case.config} Bi{case.Bi} Bt{case.Bt} {case.dtype}"
    benchmark.pedantic(fn, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    fm = flop_model(case)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        flop_form=fm["form"],
        flops=fm["flops"],
        flops_form1=fm["flops_form1"],
        gflops=fm["flops"] / median_s / 1e9,
        gflops_effective=fm["flops_form1"] / median_s / 1e9,
    )
