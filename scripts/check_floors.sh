#!/usr/bin/env bash
# Check the declared lower bounds: build a scratch venv with every dependency in pyproject.toml at
# exactly its ">=" floor (extras test, wandb-report and export included; torch at scripts/torch_pin.sh,
# the build on disk) and run the quick tests in it. Not part of CI: it downloads the floor releases
# from PyPI and takes about 10 min (7 of them tests, on 2 cores). Extra arguments go to pytest (-x, ...).
#   FLOORS_VENV  where the venv goes (default /tmp/ganbench-floors-venv; reused if it exists)
#   PYTHON       the interpreter to build it from (default python3; 3.11+, for tomllib)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FLOORS_VENV:-/tmp/ganbench-floors-venv}
EXTRAS=test,wandb-report,export
source scripts/torch_pin.sh
[ -x "$VENV/bin/python" ] || { echo "[floors] creating $VENV"; "$PYTHON" -m venv "$VENV"; }
pins=$VENV/torch-pin.txt floors=$VENV/floors.txt
printf '%s\n' "${TORCH_PIN[@]}" > "$pins"
pin_args=(); for p in "${TORCH_PIN[@]}"; do pin_args+=(--pin "$p"); done
"$VENV/bin/python" scripts/floor_constraints.py --extras "$EXTRAS" "${pin_args[@]}" > "$floors"
echo "[floors] installing ${TORCH_PIN[*]}, then every dependency at its floor:"; cat "$floors"
"$VENV/bin/python" -m pip install -q -c "$pins" "${TORCH_PIN[@]}"
"$VENV/bin/python" -m pip install -q -c "$floors" -e ".[$EXTRAS]"
"$VENV/bin/python" -m pip freeze --exclude-editable > "$VENV/freeze.txt"
echo "[floors] installed (also in $VENV/freeze.txt):"; cat "$VENV/freeze.txt"
export GANBENCH_CACHE=${GANBENCH_CACHE:-$(mktemp -d)}
"$VENV/bin/python" -m pytest tests -m "not slow" -p no:cacheprovider "$@"
