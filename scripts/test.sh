#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv + dependencies, Azurite, lint, types, tests, rule tests.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

setup_python
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

step "checkov (Bicep; every skip carries its justification inline)"
.tools/checkov-venv/bin/checkov -d infra --framework bicep --compact --quiet --skip-download

step "rule validation and rule tests"
.venv/bin/python -m shared validate >/dev/null
.venv/bin/python -m shared test-rules --min-tests 1

step "pytest"
.venv/bin/python -m pytest "$@"
