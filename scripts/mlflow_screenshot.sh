#!/usr/bin/env bash
# A screenshot of the MLflow UI in a real (headless) browser, for the README:
#   scripts/mlflow_screenshot.sh <url path after the port, e.g. '#/experiments/1'> <out.png> [store db] [width,height]
# Needs Debian's chromium (apt-get install chromium). Starts `mlflow ui` on the store, waits for it,
# lets the page render, then stops the server.
set -euo pipefail
page=$1; out=$2; db=${3:-mlflow.db}; size=${4:-1600,1000}
port=$((5100 + RANDOM % 800))
.venv/bin/mlflow ui --backend-store-uri "sqlite:///$(realpath "$db")" --host 127.0.0.1 --port $port >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$size" \
  --virtual-time-budget=20000 --screenshot="$out" "http://127.0.0.1:$port/$page" 2>/dev/null
echo "wrote $out"
