#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv + dependencies, Azurite, lint, types, tests, rule tests.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

setup_python
setup_extra_pythons
setup_checkov
setup_azurite
setup_chromium
start_azurite
trap stop_azurite EXIT

step "ruff"
.venv/bin/ruff check shared tests function_app.py benchmarks
.venv/bin/ruff format --check shared tests function_app.py benchmarks

step "mypy"
.venv/bin/mypy
.venv/bin/mypy -p benchmarks

step "checkov (Bicep; every skip carries its justification inline)"
.tools/checkov-venv/bin/checkov -d infra --framework bicep --compact --quiet --skip-download

step "rule validation and rule tests"
.venv/bin/python -m shared validate --strict >/dev/null  # every shipped rule can fire: no warning
.venv/bin/python -m shared test-rules --min-tests 1

# The oldest and newest Python that Flex Consumption runs: the same tests except the Azurite-backed
# ones (marked, or parametrized "azurite"; storage behaviour does not depend on the Python version and
# the main run covers it), started in the background beside the main pytest run, their output shown
# after it; without the shared Azurite, so they cannot touch the main run's tables. The rule importers
# are an authoring tool, not part of the app: pySigma needs Python >= 3.11, so their tests are left
# out where it is missing.
NEEDS_PYSIGMA=(--ignore=tests/test_importers.py)  # Sigma importer tests (authoring only)
pids=() logs=()
for version in $EXTRA_PYTHONS; do
  [ -x ".venv-$version/bin/python" ] || continue
  skip=()
  if ! ".venv-$version/bin/python" -c "import sigma" 2>/dev/null; then
    skip=("${NEEDS_PYSIGMA[@]}")
  fi
  log=$(mktemp)
  env -u AZURITE_CONNECTION_STRING ".venv-$version/bin/python" -m pytest -q -p no:cacheprovider -m "not azurite" -k "not azurite" \
    "${skip[@]}" "$@" >"$log" 2>&1 &
  pids+=($!) logs+=("$version:$log:${skip[*]:+y}")
done

step "pytest"
.venv/bin/python -m pytest "$@" || main_status=$?

status=${main_status:-0}
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || status=1
  IFS=: read -r version log skipped <<<"${logs[$i]}"
  step "pytest on Python $version (without Azurite tests${skipped:+; without the Sigma importer tests: no pySigma})"
  cat "$log"
  rm -f "$log"
done
exit "$status"
