#!/usr/bin/env bash
# Build the llip CUDA extension (csrc/cuda/) against a CUDA build of torch, on a machine with or without a GPU.
#
#   bash scripts/build_cuda_ext.sh            # `make cuda-ext` calls this
#
# It creates $VENV_CUDA (default .venv-cuda) with the CUDA build of torch (about 5.5 GB; ~60 s from a local wheel
# cache), points CUDA_HOME at the real toolkit (the `nvcc` on PATH may be a wrapper script, which would make torch
# guess /usr/local), builds for TORCH_CUDA_ARCH_LIST (default 9.0a: H100/H200) through the same lazy builder the
# backend uses (llip_kernels/_build.py), and imports the result. Without a GPU the import still proves that the
# extension compiled and linked; running it needs a GPU (bench/cuda_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_CUDA=${VENV_CUDA:-.venv-cuda}
TORCH_CUDA_PIN=${TORCH_CUDA_PIN:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export LLIP_KERNELS_CACHE=${LLIP_KERNELS_CACHE:-$PWD/build/llip_kernels_cache}
export HF_HUB_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "build_cuda_ext: no nvcc at $CUDA_HOME/bin/nvcc; set CUDA_HOME to the CUDA toolkit folder" >&2
  exit 1
fi
if [ ! -x "$VENV_CUDA/bin/python" ]; then
  python3 -m venv "$VENV_CUDA"
fi
if ! "$VENV_CUDA/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  "$VENV_CUDA/bin/pip" install --quiet "$TORCH_CUDA_PIN" "numpy<2.4" ninja
fi

start=$(date +%s)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV_CUDA/bin/python" - <<'PY'
import torch

from llip_kernels.backends import cuda as cuda_backend

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME {cuda_backend.cuda_home()}")
ext = cuda_backend.extension()  # raises with the compiler's message if the build fails
print(f"built and imported {ext.__name__} from {ext.__file__}: {', '.join(n for n in dir(ext) if not n.startswith('_'))}")
PY
echo "build_cuda_ext: done in $(( $(date +%s) - start )) s (build folder under $LLIP_KERNELS_CACHE)"
