#!/usr/bin/env bash
# Media quality across an impaired trunk: starts node A, the UDP impairment
# proxy (switchboard-impair) in front of A's trunk port, and node B whose
# --peer is the proxy, so the trunk A<->B crosses the proxy (both directions
# impaired). Then runs trunk-quality.mjs (publisher + subscriber on A,
# subscriber on B), stops everything with SIGTERM and prints the result: one
# JSON line (starts with "{") and one table row (starts with "|").
#
#   bash e2e/measure-trunk.sh [options] [-- <proxy args>]
#   bash e2e/measure-trunk.sh --label "1% loss" -- --loss 0.01
#   bash e2e/measure-trunk.sh --table [--prefix before]      # the whole table
#
# options:
#   --label TEXT      label of the run (default: the proxy args)
#   --window S        measured window, seconds (default 30)
#   --warmup S        warm-up after both subscribers decode (default 5)
#   --out FILE        also write the JSON line to FILE
#   --direct          no proxy: B peers A directly (for developing the harness)
#   --table           run every row: none; 1% loss; 3% loss; 40±10 ms;
#                     2% loss + 40 ms; rate cap at 80% of the stream rate
#                     (the rate measured in the "none" row: B's inbound
#                     video+audio incl. RTP headers; RATE_KBPS=N overrides)
#   --out-dir DIR     table mode: where <prefix>-<row>.json go (default e2e/artifacts)
#   --prefix NAME     table mode: file name prefix (default "run")
# env: SWITCHBOARD_BIN (default <repo>/target/release/switchboard),
#      IMPAIR_BIN (default <repo>/target/release/switchboard-impair),
#      SWITCHBOARD_LOG (default "info"), CHROMIUM, KEEP_LOGS=1 (print log dir),
#      TRUNK_QUALITY (the measuring script; default <this dir>/trunk-quality.mjs,
#      e.g. a copy being edited while a table run uses this one).
# The proxy gets --seed 1 unless the proxy args name a seed.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SWITCHBOARD_BIN="${SWITCHBOARD_BIN:-$ROOT/target/release/switchboard}"
IMPAIR_BIN="${IMPAIR_BIN:-$ROOT/target/release/switchboard-impair}"
TRUNK_QUALITY="$(realpath "${TRUNK_QUALITY:-$HERE/trunk-quality.mjs}")"

LABEL=""; WINDOW=30; WARMUP=5; OUT=""; DIRECT=0; TABLE=0; OUT_DIR="$HERE/artifacts"; PREFIX="run"
PROXY_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --label) LABEL="$2"; shift 2 ;;
    --window) WINDOW="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --direct) DIRECT=1; shift ;;
    --table) TABLE=1; shift ;;
    --out-dir) OUT_DIR="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --) shift; PROXY_ARGS=("$@"); break ;;
    *) echo "unknown option $1 (proxy args go after --)" >&2; exit 2 ;;
  esac
done

[ -x "$SWITCHBOARD_BIN" ] || { echo "no switchboard binary at $SWITCHBOARD_BIN (set SWITCHBOARD_BIN)" >&2; exit 1; }
if [ "$DIRECT" = 0 ]; then
  [ -x "$IMPAIR_BIN" ] || { echo "no proxy binary at $IMPAIR_BIN (set IMPAIR_BIN, or --direct)" >&2; exit 1; }
fi
[ -d "$HERE/node_modules/playwright-core" ] || (cd "$HERE" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)

PIDS=()
LOGDIR=""
cleanup() {
  for p in "${PIDS[@]}"; do [ -n "$p" ] && { kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
  PIDS=()
}
trap cleanup EXIT

# wait_for <log> <pid> <regex> <what>: prints the first match of regex in log.
wait_for() {
  local log="$1" pid="$2" re="$3" what="$4" got=""
  for _ in $(seq 1 150); do
    got="$(grep -o "$re" "$log" | head -1 || true)"
    [ -n "$got" ] && { echo "$got"; return 0; }
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "$what exited" >&2; return 1; }
    sleep 0.1
  done
  cat "$log" >&2; echo "$what did not start" >&2; return 1
}

start_node() { # <log> <args...>: sets NODE_PID NODE_URL NODE_TRUNK
  local log="$1"; shift
  SWITCHBOARD_LOG="${SWITCHBOARD_LOG:-info}" \
    "$SWITCHBOARD_BIN" "$@" --http-port 0 --media-port 0 --trunk-port 0 >"$log" 2>&1 &
  NODE_PID=$!; PIDS+=("$NODE_PID")
  NODE_URL="$(wait_for "$log" "$NODE_PID" 'http://[0-9.:]*/' switchboard)"; NODE_URL="${NODE_URL%/}"
  NODE_TRUNK="$(wait_for "$log" "$NODE_PID" 'trunk=[0-9.:]*' 'switchboard trunk')"; NODE_TRUNK="${NODE_TRUNK#trunk=}"
}

stop() { # <pid> <name>: SIGTERM; a non-zero exit is reported, not fatal
  local rc=0
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || rc=$?
  [ "$rc" = 0 ] || echo "warning: $2 exited with code $rc" >&2
  PIDS=("${PIDS[@]/$1}")
}

# run_one <label> <out file or ""> <proxy args...>: one measurement; the
# result's JSON line is left in RESULT_JSON and its row in RESULT_ROW.
run_one() {
  local label="$1" out="$2"; shift 2
  LOGDIR="$(mktemp -d /tmp/measure-trunk.XXXXXX)"
  export SWITCHBOARD_CLUSTER_SECRET="$("$SWITCHBOARD_BIN" secret)"
  start_node "$LOGDIR/a.log" --node-id 1
  local a_pid="$NODE_PID" a_url="$NODE_URL" a_trunk="$NODE_TRUNK" peer proxy_pid=""
  if [ "$DIRECT" = 1 ]; then
    peer="$a_trunk"
  else
    local seed=(--seed 1)
    case " $* " in *" --seed "*) seed=() ;; esac
    "$IMPAIR_BIN" --listen 127.0.0.1:0 --upstream "$a_trunk" "${seed[@]}" --stats-file "$LOGDIR/impair-stats" "$@" \
      >"$LOGDIR/impair.log" 2>&1 &
    proxy_pid=$!; PIDS+=("$proxy_pid")
    peer="$(wait_for "$LOGDIR/impair.log" "$proxy_pid" 'listening on [0-9.:]*' switchboard-impair)"
    peer="${peer#listening on }"
  fi
  start_node "$LOGDIR/b.log" --node-id 2 --peer "1@$peer"
  local b_pid="$NODE_PID" b_url="$NODE_URL"
  echo "== [$label] A $a_url (trunk $a_trunk), B $b_url -> peer $peer${proxy_pid:+ (proxy: $*)}; logs $LOGDIR" >&2
  # The trunk must be up before the pages join.
  local up=""
  for _ in $(seq 1 100); do
    if curl -fsS "$b_url/metrics" 2>/dev/null | grep -Eq '^switchboard_trunk_up\{[^}]*\} 1$'; then up=1; break; fi
    sleep 0.2
  done
  [ -n "$up" ] || echo "warning: B reports no trunk up after 20 s; measuring anyway" >&2
  local rc=0 res
  res="$(cd "$HERE" && node "$TRUNK_QUALITY" --a "$a_url" --b "$b_url" --window "$WINDOW" --warmup "$WARMUP" \
    --label "$label" ${out:+--out "$out"})" || rc=$?
  stop "$b_pid" "node B"
  [ -n "$proxy_pid" ] && stop "$proxy_pid" switchboard-impair
  stop "$a_pid" "node A"
  unset SWITCHBOARD_CLUSTER_SECRET
  [ "$rc" = 0 ] || { echo "trunk-quality.mjs failed ($rc); logs in $LOGDIR" >&2; return "$rc"; }
  RESULT_JSON="$(grep '^{' <<<"$res" | tail -1)"
  RESULT_ROW="$(grep '^|' <<<"$res" | tail -1)"
  # Add the proxy's arguments and its final stats (whole run, warm-up
  # included) to the JSON line.
  RESULT_JSON="$(RESULT_JSON="$RESULT_JSON" STATS="${proxy_pid:+$LOGDIR/impair-stats}" node -e '
    const r = JSON.parse(process.env.RESULT_JSON);
    r.proxy = { args: process.argv.slice(1).join(" ") || null, stats: null };
    if (process.env.STATS) {
      try { r.proxy.stats = JSON.parse(require("fs").readFileSync(process.env.STATS, "utf8")); } catch {}
    } else r.proxy = null;
    console.log(JSON.stringify(r));' -- "$@")"
  [ -z "$out" ] || echo "$RESULT_JSON" >"$out"
  if [ "${KEEP_LOGS:-0}" != 1 ]; then rm -rf "$LOGDIR"; fi
}

HEADER="$(node --input-type=module -e "import('$TRUNK_QUALITY').then((m) => console.log(m.TABLE_HEADER))")"

if [ "$TABLE" = 0 ]; then
  [ -n "$LABEL" ] || LABEL="${PROXY_ARGS[*]:-none}"
  run_one "$LABEL" "$OUT" "${PROXY_ARGS[@]}"
  echo "$RESULT_JSON"
  echo "$HEADER"
  echo "$RESULT_ROW"
  exit 0
fi

mkdir -p "$OUT_DIR"
ROWS=()
row() { # <slug> <label> <proxy args...>
  local slug="$1" label="$2"; shift 2
  run_one "$label" "$OUT_DIR/$PREFIX-$slug.json" "$@"
  echo "$RESULT_JSON"
  echo "$RESULT_ROW" >&2
  ROWS+=("$RESULT_ROW")
}
row none "none"
if [ -n "${RATE_KBPS:-}" ]; then
  CAP="$RATE_KBPS"
else
  CAP="$(node -e 'const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const kbps = r.B.kbps + (r.B.audio ? r.B.audio.kbps : 0);
    console.log(Math.round(0.8 * kbps));' "$OUT_DIR/$PREFIX-none.json")"
fi
row loss1 "1% loss" --loss 0.01
row loss3 "3% loss" --loss 0.03
row delay40 "40±10 ms" --delay-ms 30 --jitter-ms 20
row loss2-delay40 "2% loss + 40 ms" --loss 0.02 --delay-ms 40
row cap80 "cap ${CAP} kbps (80%)" --rate-kbps "$CAP"
echo "$HEADER"
printf '%s\n' "${ROWS[@]}"
