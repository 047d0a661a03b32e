# Every target sets up .venv on first use (scripts/setup_env.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup train test lint bench compile-table cuda-ext

setup:
	@bash scripts/setup_env.sh

# The main job: train llip-tiny on the built-in dataset (about five minutes on 2 CPU cores).
train: setup
	$(VENV)/bin/llip train

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

# Compile every Triton kernel ahead of time for sm_90a and sm_80 (no GPU needed) and print registers/spills/smem.
compile-table: setup
	env -u TRITON_INTERPRET $(PY) bench/triton_compile_table.py --workers 2 --json bench/results/triton_compile_table.json --md bench/results/triton_compile_table.md
