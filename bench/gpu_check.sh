#!/usr/bin/env bash
# One-call GPU check of the triton and cuda backends (one H200, no network), under 8 minutes in all.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default: $OUT, else bench/results/gpu
#
# Needs python with torch (CUDA) + triton + pytest; uses the repo through PYTHONPATH (no pip install). The steps
# are subcommands of the benchmarks' entry point, `python -m bench <subcommand>`, run from the repository root.
# Steps, scarcest numbers first, each under its own time limit (sum 460 s) and each writing JSON under OUT_DIR:
#   1. triton benchmark at paper shapes      -> triton_bench.json (+ .log)                     100 s
#   2. cuda backend check, no sanitizer      -> cuda/cuda_check.json (+ cuda_check.log)        150 s
#   3. triton tests, native                  -> pytest.json, junit.xml (+ pytest.log)          170 s
#   4. AOT compile table, --quick subset     -> compile_table.json (+ .log)                     40 s
# plus env.json and summary.json (each step's exit status and seconds). A failing or timed-out step does not
# stop the others; pytest is interrupted with SIGINT so that it still writes what it ran. The exit status is the
# first failure's.
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
steps=""

"$PY" - > "$OUT_DIR/env.json" <<'PYEOF'
import json, torch, triton, platform
print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                      cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)))
PYEOF
cat "$OUT_DIR/env.json"

# step NAME LIMIT_S LOG SIGNAL CMD...: run CMD under a time limit, log to OUT_DIR/LOG, record rc and seconds.
step() {
  local name=$1 limit=$2 log=$3 sig=$4
  shift 4
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout -s "$sig" -k 15 "$limit" "$@" > "$OUT_DIR/$log" 2>&1
  local rc=$?
  tail -6 "$OUT_DIR/$log"
  echo "$name rc=$rc ($((SECONDS - t0)) s)"
  [ $status -eq 0 ] && status=$rc
  steps="$steps${steps:+, }{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"log\": \"$log\"}"
}

step triton_bench 100 triton_bench.log TERM "$PY" -m bench triton --out "$OUT_DIR/triton_bench.json"
step cuda_check 150 cuda_check.log TERM "$PY" -m bench cuda-check "$OUT_DIR/cuda" --no-sanitizer
# -o addopts="": the ini's addopts has --benchmark-disable, which pytest rejects where pytest-benchmark is missing.
step triton_tests 170 pytest.log INT "$PY" -m pytest tests/kernels/test_triton.py -q -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT_DIR/junit.xml"
# junit.xml -> pytest.json: counts and the failing tests' ids and messages
"$PY" - "$OUT_DIR/junit.xml" > "$OUT_DIR/pytest.json" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print(json.dumps({"error": f"no junit report: {e}"}))
    sys.exit(0)
suite = root if root.tag == "testsuite" else root.find("testsuite")
failed = [dict(test=f"{c.get('classname')}::{c.get('name')}", message=(e.get("message") or "")[:500])
          for c in suite.iter("testcase") for e in list(c) if e.tag in ("failure", "error")]
print(json.dumps(dict({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
                      time_s=float(suite.get("time", 0)), failed=failed), indent=1))
PYEOF
step compile_table 40 compile_table.log TERM "$PY" -m bench compile-table --quick --workers 8 \
  --json "$OUT_DIR/compile_table.json"

echo "{\"status\": $status, \"steps\": [$steps]}" > "$OUT_DIR/summary.json"
cat "$OUT_DIR/summary.json"
exit $status
