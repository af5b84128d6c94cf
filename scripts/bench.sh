#!/usr/bin/env bash
# Benchmarks (printed figures, not tests). Usage: bash scripts/bench.sh [engine|big|functions|worst|all]
# engine: the three streams (non-alert-heavy, alert-dense, seed-match-heavy) plus real-template rows against
#   parse-and-discard, the hand-written baseline and a Bytewax flow (when Bytewax installs), the rules-scaling
#   curve, predicate rate, memory per group.
# big: replay of 1 GB of distinct alert-dense records, peak RSS (BENCH_BIG_MB to change the size).
# worst: only the worst-case batches (1 MiB of invalid records; 100 new groups), with the ratio to before.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
setup_python >/dev/null
what="${1:-all}"
if [ "$what" = engine ] || [ "$what" = all ]; then
  # Bytewax is a benchmark-only dependency, in its own virtualenv (its pins must not touch the app's);
  # when it does not install, the engine benchmark runs without its column.
  bytewax=()
  step "bytewax (benchmark only, .venv-bench)"
  if [ -x .venv-bench/bin/python ] || "${PYTHON:-python3}" -m venv .venv-bench; then
    if .venv-bench/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt \
        2> >(grep -v '^WARNING: Location' >&2); then
      bytewax=(--bytewax .venv-bench/bin/python)
    else
      echo "bytewax did not install: no Bytewax column" >&2
    fi
  fi
  step "engine benchmark"
  .venv/bin/python benchmarks/bench_engine.py --scaling "${bytewax[@]}"
  .venv/bin/python benchmarks/bench_micro.py
fi
if [ "$what" = big ] || [ "$what" = all ]; then
  step "1 GB replay (distinct alert-dense records)"
  .venv/bin/python benchmarks/bench_engine.py --big-file-mb "${BENCH_BIG_MB:-1000}" --big-stream alert-dense
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
