#!/usr/bin/env bash
# Real-browser tests. Installs what they need (Debian chromium, npm
# playwright-core), builds and starts a node on free ports, runs the tests,
# stops the node. SWITCHBOARD_BIN=<path> skips the build.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd .. && pwd)"

if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi

echo "== npm ci"
npm ci --no-audit --no-fund --silent

if [ -z "${SWITCHBOARD_BIN:-}" ]; then
  echo "== building switchboard (release)"
  (cd "$ROOT" && cargo build --release -p switchboard)
  SWITCHBOARD_BIN="$ROOT/target/release/switchboard"
  if [ -n "${CARGO_TARGET_DIR:-}" ]; then SWITCHBOARD_BIN="$CARGO_TARGET_DIR/release/switchboard"; fi
fi

mkdir -p artifacts
LOG=artifacts/switchboard.log
SWITCHBOARD_LOG="${SWITCHBOARD_LOG:-info,sfu=debug}" \
  "$SWITCHBOARD_BIN" --http-port 0 --media-port 0 >"$LOG" 2>&1 &
PID=$!
cleanup() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
trap cleanup EXIT

URL=""
for _ in $(seq 1 100); do
  URL="$(grep -o 'http://[0-9.:]*/' "$LOG" | head -1 || true)"
  [ -n "$URL" ] && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "switchboard exited"; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$LOG"; echo "switchboard did not start"; exit 1; }
echo "== node at $URL"

SB_URL="${URL%/}" node --test --test-concurrency=1 tests/

# Graceful shutdown on SIGTERM must exit 0.
kill -TERM "$PID"
if wait "$PID"; then echo "== node stopped cleanly"; else echo "node exit code $?"; exit 1; fi
trap - EXIT
