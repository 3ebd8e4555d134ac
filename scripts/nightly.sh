#!/usr/bin/env bash
# Nightly performance-regression run: the pytest-benchmark suite against its stored baseline
# (benchmarks/gate.py), the `nightly` matrix against its stored baseline (bench compare), W&B upload
# of the matrix when configured. Names every regression; see docs/nightly.md.
#
#   scripts/nightly.sh                      compare with baselines/<device>/
#   scripts/nightly.sh --update-baseline    run, then record this run as the baselines for this device
#                                           (the suite NIGHTLY_BASELINE_RUNS times, default 3: medians)
# Exit code: 0 no regression; 1 a regression, or a benchmark/cell failed; 2 nothing to compare with
# (no baseline for this device, or a baseline measured another way).
# Environment (all optional):
#   NIGHTLY_BASELINES   baseline root (default baselines; baselines live in <root>/<device>/)
#   NIGHTLY_OUT         output directory (default runs/nightly-<date>-<time>)
#   NIGHTLY_BENCH_K     pytest -k filter for the benchmarks (the calibration benchmark always runs)
#   NIGHTLY_MATRIX      matrix to run (default nightly; "none" skips the matrix)
#   NIGHTLY_WANDB       W&B mode for the matrix and the perf-gate run (default auto: online with credentials,
#                       else offline)
#   NIGHTLY_TOLERANCE   normalised benchmark slowdown that fails (default 0.10)
#   NIGHTLY_BASELINE_RUNS  suite runs a baseline takes each benchmark's median of (default 3)
#   NIGHTLY_CONFIRM     1 (default) = a flagged benchmark fails only if a rerun in a fresh process confirms it
#   NIGHTLY_MATRIX_THROUGHPUT_TOL  matrix img/s drop that fails (bench compare --throughput-tol; default
#                       0.10 on a GPU, 0.99 = not gated on a CPU, where the suite's calibrated numbers gate speed)
#   NIGHTLY_SKIP_SETUP  1 = use .venv as it is (do not run scripts/setup_env.sh)
#   GANBENCH_BENCH_THREADS  torch/BLAS threads of the benchmarks (default 1; recorded, must match the baseline)
set -euo pipefail
{ # bash reads the whole block before running it: editing or pulling this file mid-run cannot derail the run
cd "$(dirname "$0")/.."
update=0
for arg in "$@"; do
  case "$arg" in
    --update-baseline) update=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (expected --update-baseline)" >&2; exit 2 ;;
  esac
done
[ "${NIGHTLY_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup_env.sh >/dev/null
PY=.venv/bin/python
device=$($PY -c "import re; from benchmarks.timing import device_name; print(re.sub('[^A-Za-z0-9.-]+', '_', device_name()).strip('_'))")
base_dir=${NIGHTLY_BASELINES:-baselines}/$device
out=${NIGHTLY_OUT:-runs/nightly-$(date +%Y%m%d-%H%M%S)}
matrix=${NIGHTLY_MATRIX:-nightly}
tolerance=${NIGHTLY_TOLERANCE:-0.10}
# The matrix's img/s is wall-clock time. On a shared CPU it measures the neighbours (unchanged reruns
# differed by up to -96% on our 2-core box), so there the calibrated suite gates speed and the matrix
# gates quality, memory and failures.
case "$device" in
  cpu_*) matrix_throughput_tol=${NIGHTLY_MATRIX_THROUGHPUT_TOL:-0.99} ;;
  *) matrix_throughput_tol=${NIGHTLY_MATRIX_THROUGHPUT_TOL:-0.10} ;;
esac

if [ $update = 0 ]; then  # fail before an hour of work, not after it
  missing=()
  [ -f "$base_dir/benchmarks.json" ] || missing+=("$base_dir/benchmarks.json")
  [ "$matrix" = none ] || [ -f "$base_dir/matrix/results.jsonl" ] || missing+=("$base_dir/matrix/results.jsonl")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[nightly] error: no baseline for $device (${missing[*]}); record one on this machine with scripts/nightly.sh --update-baseline" >&2
    exit 2
  fi
fi
mkdir -p "$out"
status=0
fail() { [ "$1" -gt "$status" ] && status=$1; return 0; }  # keep the worst exit code seen
summary=()

echo "[nightly] benchmarks on $device -> $out/benchmarks.json"
kargs=()
[ -n "${NIGHTLY_BENCH_K:-}" ] && kargs=(-k "test_calibration_kernel or ($NIGHTLY_BENCH_K)")
bench_ok=1
runs=1
[ $update = 1 ] && runs=${NIGHTLY_BASELINE_RUNS:-3}  # a baseline is each benchmark's median over runs
for i in $(seq 1 "$runs"); do
  json="$out/benchmarks.json"
  [ "$runs" -gt 1 ] && json="$out/benchmarks-run$i.json" && echo "[nightly] baseline run $i of $runs"
  $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-only --benchmark-json="$json" \
    --benchmark-columns=median,rounds --benchmark-sort=name "${kargs[@]}" || bench_ok=0
done
if [ "$runs" -gt 1 ] && [ $bench_ok = 1 ]; then
  $PY -m benchmarks.baseline "$out/benchmarks.json" "$out"/benchmarks-run*.json || bench_ok=0
fi
if [ $bench_ok = 0 ]; then summary+=("benchmark suite failed (see the pytest output)"); fail 1; fi

matrix_ok=1
if [ "$matrix" != none ]; then
  echo "[nightly] matrix $matrix -> $out/matrix"
  .venv/bin/bench run "$matrix" --out "$out/matrix" --wandb "${NIGHTLY_WANDB:-auto}" || matrix_ok=0
  if [ $matrix_ok = 0 ]; then summary+=("matrix $matrix: a cell failed (see $out/matrix)"); fail 1; fi
fi

if [ $update = 1 ]; then
  if [ $bench_ok = 0 ] || [ $matrix_ok = 0 ]; then
    echo "[nightly] error: not recording a baseline from a run that failed: ${summary[*]}" >&2
    exit 1
  fi
  mkdir -p "$base_dir"
  cp "$out/benchmarks.json" "$base_dir/benchmarks.json"
  if [ "$matrix" != none ]; then
    # bench compare reads results.jsonl only; the matrix and plan say what was run. No checkpoints.
    rm -rf "$base_dir/matrix"
    mkdir -p "$base_dir/matrix"
    for f in results.jsonl matrix.yaml plan.json; do
      [ -f "$out/matrix/$f" ] && cp "$out/matrix/$f" "$base_dir/matrix/$f"
    done
  fi
  echo "[nightly] baseline recorded in $base_dir"
  exit 0
fi

if [ -f "$out/benchmarks.json" ]; then
  echo "[nightly] benchmarks against $base_dir/benchmarks.json (tolerance $tolerance)"
  rc=0
  $PY -m benchmarks.gate "$base_dir/benchmarks.json" "$out/benchmarks.json" --tolerance "$tolerance" \
    --regressed-ids "$out/regressed.txt" | tee "$out/gate.txt" || rc=$?
  if [ $rc = 1 ] && [ "${NIGHTLY_CONFIRM:-1}" = 1 ]; then
    # A regression must reproduce: rerun the flagged benchmarks (and the calibration) in a fresh process.
    # Between processes this box moves some benchmarks by ~10% (memory placement), within one it does not.
    mapfile -t ids < "$out/regressed.txt"
    echo "[nightly] confirming ${#ids[@]} regression(s) in a fresh process: ${ids[*]}"
    $PY -m pytest "${ids[@]}" benchmarks/test_calibration.py -q -p no:cacheprovider --benchmark-only \
      --benchmark-json="$out/benchmarks-confirm.json" --benchmark-columns=median,rounds || bench_ok=0
    rc=0
    $PY -m benchmarks.gate "$base_dir/benchmarks.json" "$out/benchmarks-confirm.json" --tolerance "$tolerance" \
      | tee "$out/gate-confirm.txt" || rc=$?
    [ $rc = 0 ] && echo "[nightly] not reproduced in the rerun: noise, not a regression (first pass: $out/gate.txt)"
    [ $rc = 1 ] && summary+=("$(grep '^REGRESSED' "$out/gate-confirm.txt" | sed 's/^REGRESSED:/REGRESSED (reproduced):/')")
  elif [ $rc = 1 ]; then
    summary+=("$(grep '^REGRESSED' "$out/gate.txt" || echo 'benchmarks regressed')")
  fi
  [ $rc -gt 1 ] && summary+=("benchmarks: cannot compare with the baseline (see above)")
  fail $rc
  if [ $rc -le 1 ]; then  # the table and the final verdict (after the rerun) as this night's perf-gate W&B run
    confirmed=()
    [ -f "$out/benchmarks-confirm.json" ] && confirmed=(--confirmed "$out/benchmarks-confirm.json")
    $PY -m benchmarks.gate "$base_dir/benchmarks.json" "$out/benchmarks.json" --tolerance "$tolerance" \
      "${confirmed[@]}" --wandb "${NIGHTLY_WANDB:-auto}" --wandb-dir "$out" | grep '^W&B' || true
  fi
fi
if [ "$matrix" != none ] && [ -f "$out/matrix/results.jsonl" ]; then
  echo "[nightly] matrix against $base_dir/matrix"
  rc=0
  .venv/bin/bench compare "$base_dir/matrix" "$out/matrix" --json "$out/compare.json" \
    --throughput-tol "$matrix_throughput_tol" | tee "$out/compare.txt" || rc=$?
  [ $rc = 1 ] && summary+=("matrix: $(grep '^REGRESSED' "$out/compare.txt" || echo 'cells regressed')")
  [ $rc -gt 1 ] && summary+=("matrix: cannot compare with the baseline (see above)")
  fail $rc
fi

if [ $status = 0 ]; then
  echo "[nightly] OK: no regression ($out)"
else
  echo "[nightly] FAILED ($out):" >&2
  for line in "${summary[@]}"; do echo "  $line" >&2; done
fi
exit $status
}
