"""Benchmarks for llip_kernels and the llip model (issue 7).

- :mod:`bench.run`: microbenchmarks (ops x modes x providers x shapes) -> readable table + JSON.
- :mod:`bench.scaling`: time and peak memory against batch size -> JSON + PNG.
- :mod:`bench.e2e`: training-step time of Llip against SigLIP with identical towers.
- :mod:`bench.compare`: regression guard between two result files.
- :mod:`bench.report`: ``bench/results/REPORT.md`` from the saved results.
- ``bench/test_bench_ops.py``: the same microbenchmarks as a pytest-benchmark suite.

Nothing here is collected by the normal test run (``testpaths = ["tests"]``).
"""
