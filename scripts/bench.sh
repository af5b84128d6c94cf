#!/usr/bin/env bash
# Benchmarks (printed figures, not tests). Usage: bash scripts/bench.sh [engine|functions|worst|all]
# worst: only the worst-case batches (1 MiB of invalid records; 100 new groups), with the ratio to before.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
setup_python >/dev/null
what="${1:-all}"
if [ "$what" = engine ] || [ "$what" = all ]; then
  step "engine benchmark"
  .venv/bin/python benchmarks/bench_engine.py
fi
if [ "$what" = worst ]; then
  export BENCH_ONLY_WORST=1
fi
if [ "$what" = functions ] || [ "$what" = worst ] || [ "$what" = all ]; then
  setup_azurite
  start_azurite
  trap stop_azurite EXIT
  step "functions benchmark (Azurite)"
  .venv/bin/python benchmarks/bench_functions.py
fi
