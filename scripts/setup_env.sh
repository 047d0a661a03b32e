#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent: it reinstalls only when a
# requirements file or pyproject.toml changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLIP_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.llip-setup-stamp"
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[setup] creating the environment in $VENV (about a minute on first use)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/dev.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements/no-deps.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
