#!/usr/bin/env bash
# The main job on the embedded default (in-memory state, no Azure account): replay the bundled demo
# alerts (every wire format) through the shipped rules and print the incidents.
# Usage: bash scripts/demo.sh [alert files...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

setup_python >/dev/null
if [ "$#" -eq 0 ]; then
  set -- samples/demo/*.json samples/demo/*.jsonl
fi
step "replaying $# file(s) through rules/ (incident snapshots below, one JSON per line)"
.venv/bin/python -m shared replay "$@"
