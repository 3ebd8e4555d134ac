#!/usr/bin/env bash
# Create .venv (if absent) and install ganbench with its test extra. Sourced by run.sh and test.sh.
# torch is pinned first (scripts/torch_pin.sh): an unpinned torch would pull a different (multi-GB) build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
source scripts/torch_pin.sh
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.ganbench-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing (torch pinned: ${TORCH_PIN[*]})"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${TORCH_PIN[@]}"
  .venv/bin/python -m pip install -q -e ".[test]" "${TORCH_PIN[@]}"
  echo "$want" > "$stamp"
fi
