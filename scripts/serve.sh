#!/usr/bin/env bash
# Starts a local Prefect server on 127.0.0.1, creates the process work pool, deploys the
# prefect.yaml deployments (nightly schedule + presets) and runs a worker in the foreground.
# Ctrl-C stops the worker and the server. Settings: PORT (4200), PREFECT_HOME (~/.prefect), POOL.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
PORT=${PORT:-4200}
POOL=${POOL:-headstart-local}
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"

prefect server start --host 127.0.0.1 --port "$PORT" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "$PREFECT_API_URL/health" 2>/dev/null; then
    break
  fi
  kill -0 "$server" 2>/dev/null || { echo "serve: prefect server exited; see its log above" >&2; exit 1; }
  sleep 1
done

prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect --no-prompt deploy --name nightly --name quick
echo "serve: UI at http://127.0.0.1:${PORT}; run a preset with: prefect deployment run headstart-pipeline/quick"
prefect worker start --pool "$POOL"
