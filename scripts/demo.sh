#!/usr/bin/env bash
# The main job on the embedded default (in-memory state, no Azure account): replay the bundled demo
# alerts (every wire format) through the shipped rules, print one table line per incident, write an
# HTML report (demo-report.html, or $DEMO_REPORT), and forward
# them, signed, to a local webhook receiver that verifies each signature and prints what arrives.
# Usage: bash scripts/demo.sh [alert files...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

setup_python requirements.txt >/dev/null
if [ "$#" -eq 0 ]; then
  set -- samples/demo/*.json samples/demo/*.jsonl
fi
WEBHOOK_SECRET="$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')"
export WEBHOOK_SECRET
port=$(free_port)
log=$(mktemp)
.venv/bin/python -m shared receiver --port "$port" >"$log" 2>&1 &
receiver=$!
trap 'kill $receiver 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 50); do grep -q listening "$log" && break; sleep 0.1; done

report="${DEMO_REPORT:-demo-report.html}"
step "replaying $# file(s) through rules/: one line per incident (full JSON snapshots: replay --output json)"
status=0
.venv/bin/python -m shared replay --output table --html "$report" --forward "http://127.0.0.1:$port/incidents" "$@" || status=$?

step "what the local webhook receiver got (signatures verified), with each incident's entities"
sleep 0.3
grep -v listening "$log" || true
step "open $report in a browser: incidents, a timeline per host and each incident's evidence (works offline)"
exit "$status"
