#!/usr/bin/env bash
# Nightly performance-regression run: the pytest-benchmark suite against its stored baseline, the
# `nightly` matrix against its stored baseline, W&B upload when configured; exits non-zero on any
# regression and names it.
#
#   scripts/nightly.sh                      compare with baselines/<device>/ (exit 1 on regression)
#   scripts/nightly.sh --update-baseline    record new baselines for this device instead
# Environment (all optional):
#   NIGHTLY_BASELINES  baseline root (default baselines/)      NIGHTLY_OUT   output dir (default runs/nightly-<time>)
#   NIGHTLY_BENCH_K    pytest -k filter for the benchmarks     NIGHTLY_MATRIX  matrix to run (default nightly; "none" skips it)
#   NIGHTLY_WANDB      W&B mode for the matrix (default auto)   NIGHTLY_TOLERANCE  benchmark slowdown that fails (0.10)
set -euo pipefail
cd "$(dirname "$0")/.."
update=0
for arg in "$@"; do
  case "$arg" in
    --update-baseline) update=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (expected --update-baseline)" >&2; exit 2 ;;
  esac
done
bash scripts/setup_env.sh >/dev/null
PY=.venv/bin/python
device=$($PY -c "from benchmarks.conftest import device_name; import re; print(re.sub('[^A-Za-z0-9._-]+', '_', device_name()))")
base_dir=${NIGHTLY_BASELINES:-baselines}/$device
out=${NIGHTLY_OUT:-runs/nightly-$(date +%Y%m%d-%H%M%S)}
matrix=${NIGHTLY_MATRIX:-nightly}
tolerance=${NIGHTLY_TOLERANCE:-0.10}
mkdir -p "$out" "$base_dir"
export GANBENCH_CACHE=${GANBENCH_CACHE:-$PWD/.cache/ganbench}

echo "[nightly] benchmarks on $device -> $out/benchmarks.json"
kargs=()
[ -n "${NIGHTLY_BENCH_K:-}" ] && kargs=(-k "$NIGHTLY_BENCH_K")
compare_args=()
if [ $update = 0 ] && [ -f "$base_dir/benchmarks.json" ]; then
  # pytest-benchmark's own side-by-side table, and a backstop for gross raw slowdowns (25%); the
  # calibrated, stability-aware gate below is the one that decides at the 10% level.
  mkdir -p "$out/storage/baseline"
  cp "$base_dir/benchmarks.json" "$out/storage/baseline/0001_baseline.json"
  compare_args=(--benchmark-storage="file://$out/storage" --benchmark-compare=0001 --benchmark-compare-fail=median:25%)
fi
status=0
$PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-only --benchmark-json="$out/benchmarks.json" \
  --benchmark-columns=median,iqr,rounds "${compare_args[@]}" "${kargs[@]}" || status=1

if [ "$matrix" != none ]; then
  echo "[nightly] matrix $matrix -> $out/matrix"
  .venv/bin/bench run "$matrix" --out "$out/matrix" --wandb "${NIGHTLY_WANDB:-auto}" || status=1
fi

if [ $update = 1 ]; then
  cp "$out/benchmarks.json" "$base_dir/benchmarks.json"
  if [ "$matrix" != none ]; then rm -rf "$base_dir/matrix"; cp -r "$out/matrix" "$base_dir/matrix"; fi
  echo "[nightly] baseline recorded in $base_dir"
  exit $status
fi
if [ ! -f "$base_dir/benchmarks.json" ]; then
  echo "[nightly] error: no baseline for $device in $base_dir; record one with scripts/nightly.sh --update-baseline" >&2
  exit 2
fi
$PY -m benchmarks.gate "$base_dir/benchmarks.json" "$out/benchmarks.json" --tolerance "$tolerance" || status=1
if [ "$matrix" != none ]; then
  if [ -d "$base_dir/matrix" ]; then
    .venv/bin/bench compare "$base_dir/matrix" "$out/matrix" --json "$out/compare.json" || status=1
  else
    echo "[nightly] no matrix baseline in $base_dir/matrix; record one with --update-baseline" >&2; status=1
  fi
fi
[ $status = 0 ] && echo "[nightly] OK: no regression" || echo "[nightly] FAILED: regression (see above)" >&2
exit $status
