#!/usr/bin/env bash
# Set up (first time) and run the default benchmark: offline, on the CPU, embedded datasets.
# Extra arguments go to `bench run` (e.g. scripts/run.sh --out runs/mine --wandb offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GANBENCH_CACHE=${GANBENCH_CACHE:-$PWD/.cache/ganbench}
out=runs/default-$(date +%Y%m%d-%H%M%S)
.venv/bin/bench run default --out "$out" "$@"
.venv/bin/bench show "$out"
echo "report: $out/report.html"
