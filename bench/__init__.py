"""Benchmarks for llip_kernels and the llip model, behind one entry point: ``python -m bench <subcommand>``.

Subcommands (``python -m bench --help`` lists them; each module keeps ``python -m bench.<module>`` working too):

- ``run`` (:mod:`bench.run`): microbenchmarks (ops x modes x providers x shapes) -> readable table + JSON.
- ``scaling`` (:mod:`bench.scaling`): time and peak memory against batch size -> JSON + PNG.
- ``e2e`` (:mod:`bench.e2e`): training-step time of Llip against SigLIP with identical towers.
- ``report`` (:mod:`bench.report`): ``bench/results/REPORT.md`` from the saved results.
- ``compare`` (:mod:`bench.compare`): regression guard between two result files.
- ``cpu-targets`` (:mod:`bench.cpu_targets`): the cpu backend's speed, memory and FLOP/s targets.
- ``triton`` (:mod:`bench.triton_bench`), ``cuda-check`` (:mod:`bench.cuda_check`): the GPU backends on a GPU.
- ``compile-table`` (:mod:`bench.triton_compile_table`): ahead-of-time compile of every Triton kernel (no GPU).

Shared pieces: :mod:`bench.common` (shapes, timer, yardstick, metadata), :mod:`bench.providers` (what is run, FLOP
model), :mod:`bench.memory` (peak memory), :mod:`bench.harness` (rows and tables). ``bench/gpu_check.sh`` runs the
GPU subcommands and the Triton tests in one call. The same microbenchmarks as a pytest-benchmark suite live in
``tests/bench/test_bench_ops.py``: the normal test run executes each case once at a tiny shape, ``make bench``
measures them.
"""
