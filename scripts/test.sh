#!/usr/bin/env bash
# Set up (first time) and run the whole test suite, slow multi-process tests included.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The report test renders report.html in headless Chromium; install it when missing (root, Debian).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the report screenshot test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[test] chromium could not be installed; the screenshot test will be skipped"
fi
export GANBENCH_CACHE=${GANBENCH_CACHE:-$(mktemp -d)}
.venv/bin/python -m pytest tests "$@"
