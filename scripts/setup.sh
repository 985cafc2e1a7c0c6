#!/usr/bin/env bash
# Create .venv and install dispersive with its development extras.
# Idempotent: re-runs only when pyproject.toml changed. Works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.setup-stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_args=(-q --disable-pip-version-check)
# This project's machines keep a CPU build of torch on disk; use it when present so that
# no multi-GB CUDA build is downloaded. Elsewhere pip takes torch from the index.
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
    "$VENV/bin/pip" install "${pip_args[@]}" "torch==2.13.0"
  else
    "$VENV/bin/pip" install "${pip_args[@]}" torch
  fi
fi
"$VENV/bin/pip" install "${pip_args[@]}" -e ".[dev]"
echo "$want" > "$stamp"
