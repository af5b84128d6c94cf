# Shared set-up steps for scripts/*.sh (sourced, not run).

step() { printf '\n== %s ==\n' "$*" >&2; }

setup_python() {  # usage: setup_python [requirements file, default requirements-dev.txt]
  step "python environment (.venv)"
  local py="${PYTHON:-python3}" reqs="${1:-requirements-dev.txt}"
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$reqs" \
    2> >(grep -v '^WARNING: Location' >&2)
}

setup_azurite() {
  step "azurite (npm, into .tools/)"
  if [ ! -x .tools/node_modules/.bin/azurite ]; then
    mkdir -p .tools
    [ -f .tools/package.json ] || echo '{"name": "defender-correlator-tools", "private": true}' > .tools/package.json
    (cd .tools && npm install --no-audit --no-fund --loglevel=error azurite@3 >&2)
  fi
}

free_port() {
  .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_azurite() {
  if [ -n "${AZURITE_CONNECTION_STRING:-}" ]; then
    return  # already provided by the caller
  fi
  step "starting azurite on free ports"
  local blob queue table dir
  blob=$(free_port); queue=$(free_port); table=$(free_port)
  dir=$(mktemp -d)
  .tools/node_modules/.bin/azurite --silent --inMemoryPersistence --disableTelemetry --skipApiVersionCheck \
    --blobPort "$blob" --queuePort "$queue" --tablePort "$table" >"$dir/azurite.log" 2>&1 &
  AZURITE_PID=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$table") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$queue") 2>/dev/null; then
      break
    fi
    sleep 0.2
  done
  local key="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
  export AZURITE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$key;BlobEndpoint=http://127.0.0.1:$blob/devstoreaccount1;QueueEndpoint=http://127.0.0.1:$queue/devstoreaccount1;TableEndpoint=http://127.0.0.1:$table/devstoreaccount1;"
  export AZURITE_PID
}

stop_azurite() {
  if [ -n "${AZURITE_PID:-}" ]; then
    kill "$AZURITE_PID" 2>/dev/null || true
    wait "$AZURITE_PID" 2>/dev/null || true
  fi
}

setup_checkov() {
  step "checkov (own venv in .tools/, its pins stay apart from the project's)"
  if [ ! -x .tools/checkov-venv/bin/checkov ]; then
    mkdir -p .tools
    "${PYTHON:-python3}" -m venv .tools/checkov-venv
    .tools/checkov-venv/bin/python -m pip install --quiet --disable-pip-version-check "checkov==3.3.30" \
      2> >(grep -v '^WARNING: Location' >&2)
  fi
}

setup_chromium() {  # the HTML report test renders in Debian's chromium (a test dependency, not a runtime one)
  if command -v chromium >/dev/null 2>&1; then
    return
  fi
  step "chromium (Debian package, for the HTML report test)"
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
      || echo "warning: could not install chromium; the HTML report test will be skipped" >&2
  else
    echo "warning: chromium is missing and apt-get (as root) is not available; the HTML report test will be skipped" >&2
  fi
}

find_python() {  # usage: find_python 3.10 -> path of an interpreter of that version, or nothing
  local want="$1" candidate
  for candidate in "python$want" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/python /root/.pyenv/versions/"$want".*/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
      command -v "$candidate"
      return
    fi
  done
}

# The other Python versions Flex Consumption runs (README "Python versions"); the main .venv is 3.11.
EXTRA_PYTHONS="${EXTRA_PYTHONS-3.10 3.13}"

setup_extra_pythons() {  # a .venv-<version> per extra version, with the runtime pins + test tools only
  local version py
  for version in $EXTRA_PYTHONS; do
    py=$(find_python "$version")
    if [ -z "$py" ]; then
      if [ "${REQUIRE_PYTHON_MATRIX:-0}" = 1 ]; then
        echo "Python $version not found (pyenv or python$version on PATH)" >&2
        return 1
      fi
      echo "warning: Python $version not found; its tests are skipped here (CI requires it)" >&2
      continue
    fi
    step "python $version environment (.venv-$version)"
    [ -x ".venv-$version/bin/python" ] || "$py" -m venv ".venv-$version"
    grep -v -E '^(ruff|mypy|types-)' requirements-dev.txt | sed "s|^-r requirements.txt|-r $PWD/requirements.txt|" \
      > ".venv-$version/requirements-test.txt"
    ".venv-$version/bin/python" -m pip install --quiet --disable-pip-version-check -r ".venv-$version/requirements-test.txt" \
      2> >(grep -v '^WARNING: Location' >&2)
  done
}
