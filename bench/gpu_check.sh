#!/usr/bin/env bash
# One-call GPU check of the triton backend (H200, no network): native tests, AOT table, benchmark at paper shapes.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default: $OUT, else bench/results/gpu
#
# Needs python with torch (CUDA) + triton + pytest; uses the repo through PYTHONPATH (no pip install).
# Writes OUT_DIR/{env.json, triton_bench.json, triton_bench.log, pytest.log, junit.xml, compile_table.json,
# compile_table.log, summary.json}. The benchmark runs first (its numbers are the scarce part). Each step has its
# own time limit so the whole stays under ~8 minutes; a failing step does not stop the others (the exit status
# reports the first failure).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
status=0

"$PY" - > "$OUT_DIR/env.json" <<'EOF'
import json, torch, triton, platform
print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                      cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)))
EOF
cat "$OUT_DIR/env.json"

echo "== 1. benchmark at paper shapes (limit 150 s)"
timeout 150 "$PY" bench/triton_bench.py --out "$OUT_DIR/triton_bench.json" > "$OUT_DIR/triton_bench.log" 2>&1
rc=$?; tail -8 "$OUT_DIR/triton_bench.log"; echo "bench rc=$rc"; [ $status -eq 0 ] && status=$rc

echo "== 2. triton tests, native (limit 270 s)"
timeout 270 "$PY" -m pytest tests/test_triton_ops.py -q -p no:cacheprovider --junitxml="$OUT_DIR/junit.xml" \
  > "$OUT_DIR/pytest.log" 2>&1
rc=$?; tail -5 "$OUT_DIR/pytest.log"; echo "pytest rc=$rc"; [ $status -eq 0 ] && status=$rc

echo "== 3. AOT compile table, G/14 subset (limit 40 s)"
timeout 40 "$PY" bench/triton_compile_table.py --quick --json "$OUT_DIR/compile_table.json" \
  > "$OUT_DIR/compile_table.log" 2>&1
rc=$?; tail -3 "$OUT_DIR/compile_table.log"; echo "compile rc=$rc"; [ $status -eq 0 ] && status=$rc

echo "{\"status\": $status}" > "$OUT_DIR/summary.json"
exit $status
