# Every target sets up .venv on first use (scripts/setup_env.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup train test lint bench compile-table cuda-ext

setup:
	@bash scripts/setup_env.sh

# The main job: train llip-tiny on the built-in dataset (about five minutes on 2 CPU cores). ARGS passes options,
# e.g. `make train ARGS=--overwrite` to replace an earlier run in runs/llip-tiny, or ARGS="--resume auto".
train: setup
	$(VENV)/bin/llip train $(ARGS)

# The test suite (what CI runs). Triton kernels run under the interpreter on CPU.
test: setup
	$(PY) -m ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Build the CUDA extension against a CUDA build of torch in .venv-cuda (5.5 GB; it cannot run without a GPU).
cuda-ext:
	bash scripts/build_cuda_ext.sh

# The pytest-benchmark suite, measured (`make test` runs each of its cases once, untimed, at a tiny shape). Shapes
# from LLIP_BENCH_CONFIGS / LLIP_BENCH_BATCH / LLIP_BENCH_DTYPE, by default B/16 at Bi = Bt = 128 in float32 on a
# CPU (about 5 minutes on 2 cores). Every benchmark command: `python -m bench --help`, bench/README.md.
BENCH_JSON ?= bench/results/pytest_bench_cpu.json
bench: setup
	env -u TRITON_INTERPRET $(PY) -m pytest tests/bench/test_bench_ops.py -q -p no:cacheprovider \
		--benchmark-enable --benchmark-only --benchmark-json $(BENCH_JSON)

# Compile every Triton kernel ahead of time for sm_90a and sm_80 (no GPU needed) and print registers/spills/smem.
compile-table: setup
	env -u TRITON_INTERPRET $(PY) -m bench compile-table --workers 2 --json bench/results/triton_compile_table.json --md bench/results/triton_compile_table.md
