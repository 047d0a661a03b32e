"""The microbenchmarks as a pytest-benchmark suite.

In the normal test run benchmarking is off (``addopts`` has ``--benchmark-disable``): every case then runs once,
untimed, at a tiny shape (config ``tiny``, Bi = Bt = 8), so that the suite cannot rot; the compiled reference runs
one case only (``SMOKE_COMPILED``: a cold ``torch.compile`` costs 10 to 20 s per graph on 2 cores, and every op
goes through the same wrapper). To measure, enable benchmarking:

    make bench      # the line below, results in bench/results/pytest_bench_cpu.json
    .venv/bin/python -m pytest tests/bench/test_bench_ops.py --benchmark-enable --benchmark-only \\
        --benchmark-json bench/results/pytest_bench_cpu.json
    .venv/bin/python -m pytest tests/bench/test_bench_ops.py --benchmark-enable --benchmark-only \\
        -k "sigmoid and fwd+bwd" --benchmark-compare

Shapes of a measuring run come from the environment: ``LLIP_BENCH_CONFIGS`` (default ``B/16``; comma-separated),
``LLIP_BENCH_BATCH`` (default ``128`` on CPU, ``4096`` on GPU; ``BixBt`` allowed, comma-separated),
``LLIP_BENCH_DTYPE`` (default float32 on CPU, bfloat16 on GPU). Providers that cannot run here are skipped with
their reasons. Each benchmark's ``extra_info`` carries the FLOP model, FLOP/s and effective (form-1) FLOP/s; peak
memory is measured by ``python -m bench run``.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.providers import LLIP_PROVIDERS, MODES, OPS, Case, Unavailable, applicable, build, flop_model
from bench.run import parse_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# What a run with benchmarking disabled executes, once per case: only that every case still runs.
SMOKE_CONFIGS = ["tiny"]
SMOKE_BATCHES = [(8, 8)]
SMOKE_COMPILED = ("sigmoid_loss", "fwd+bwd")  # the one (op, mode) of reference_compile that such a run compiles


def benchmarking(config: pytest.Config) -> bool:
    """Whether pytest-benchmark measures in this run (``--benchmark-enable`` overrides ``--benchmark-disable``)."""
    return not config.getoption("benchmark_disable") or config.getoption("benchmark_enable")


def cases(measure: bool) -> list[Case]:
    if measure:
        configs = os.environ.get("LLIP_BENCH_CONFIGS", "B/16").split(",")
        default_batch = "4096" if DEVICE == "cuda" else "128"
        batches = [parse_batch(b) for b in os.environ.get("LLIP_BENCH_BATCH", default_batch).split(",")]
        dtype = os.environ.get("LLIP_BENCH_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32")
    else:
        configs, batches, dtype = SMOKE_CONFIGS, SMOKE_BATCHES, "bfloat16" if DEVICE == "cuda" else "float32"
    return [
        Case(op, mode, prov, cfg, bi, bt, dtype, DEVICE)
        for op in OPS
        for mode in MODES
        for prov in LLIP_PROVIDERS + ("pooled",)
        for cfg in configs
        for bi, bt in batches
        if applicable(op, prov)
    ]


def _case_id(c: Case) -> str:
    return f"{c.op}-{c.mode}-{c.provider}-{c.config.replace('/', '')}-Bi{c.Bi}-Bt{c.Bt}-{c.dtype}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases(benchmarking(metafunc.config)), ids=_case_id)


def test_op(benchmark, case: Case, request: pytest.FixtureRequest):
    measure = benchmarking(request.config)
    if not measure and case.provider == "reference_compile" and (case.op, case.mode) != SMOKE_COMPILED:
        pytest.skip(f"benchmarking disabled: torch.compile runs for {' '.join(SMOKE_COMPILED)} only (see module doc)")
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
    benchmark.pedantic(fn, setup=setup, rounds=5, iterations=1, warmup_rounds=1)  # disabled: one untimed call
    fm = flop_model(case)
    assert fm["flops"] > 0 and fm["flops_form1"] > 0
    if not measure or benchmark.stats is None:  # nothing was timed
        return
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        flop_form=fm["form"],
        flops=fm["flops"],
        flops_form1=fm["flops_form1"],
        gflops=fm["flops"] / median_s / 1e9,
        gflops_effective=fm["flops_form1"] / median_s / 1e9,
    )
