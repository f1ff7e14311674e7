#!/usr/bin/env bash
# Real-browser tests. Installs what they need (Debian chromium and
# firefox-esr, npm playwright-core and puppeteer-core), builds the node, and
# runs these suites against real nodes on free ports:
#   tests/call.test.mjs      two Chromium pages, node on 127.0.0.1
#   tests/simulcast.test.mjs a simulcast publisher gets one layer, fully decoded
#   tests/phone.test.mjs     a phone (390×844, touch) in a call of three: video first
#   tests/reuse.test.mjs     publishers come and go: reused m-lines carry the next one
#   tests/cluster.test.mjs   a page on each of three clustered nodes (trunks)
#   tests/trunk-loss.test.mjs two clustered nodes whose trunk crosses the UDP
#                            impairment proxy (switchboard-impair, 3 % loss)
#   tests/firefox.test.mjs   Firefox + Chromium, node on a veth address in a
#                            network namespace this script creates (Firefox
#                            does not use 127.0.0.1 for WebRTC; needs root)
#   tests/https.test.mjs     Chromium over https:// + wss:// on that address,
#                            test CA trusted by SPKI only; certificate renewed
#                            (SIGHUP) mid-call
#   tcp.sh                   ICE-TCP fallback: Chromium in a namespace whose
#                            UDP to the node is dropped (iptables) decodes
#                            video and audio over a TCP candidate pair; UDP
#                            wins without the rule (own namespaces; root)
# Each node must exit 0 on SIGTERM. SWITCHBOARD_BIN=<path> skips the build
# (then IMPAIR_BIN=<path> names the proxy; default target/release).
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd .. && pwd)"

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /usr/lib/firefox-esr/firefox-esr ] || missing+=(firefox-esr)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== npm ci"
PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --silent

if [ -z "${SWITCHBOARD_BIN:-}" ]; then
  echo "== building switchboard and switchboard-impair (release)"
  (cd "$ROOT" && cargo build --release -p switchboard -p impair)
  SWITCHBOARD_BIN="$ROOT/target/release/switchboard"
  IMPAIR_BIN="${IMPAIR_BIN:-$ROOT/target/release/switchboard-impair}"
  if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    SWITCHBOARD_BIN="$CARGO_TARGET_DIR/release/switchboard"
    IMPAIR_BIN="$CARGO_TARGET_DIR/release/switchboard-impair"
  fi
fi
IMPAIR_BIN="${IMPAIR_BIN:-$ROOT/target/release/switchboard-impair}"

mkdir -p artifacts
PIDS=()
NETNS=""
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [ -n "$NETNS" ]; then ip netns del "$NETNS" 2>/dev/null || true; fi
}
trap cleanup EXIT

# start_node <log> <command prefix...> -- <switchboard args...>: starts a
# node, waits for the URL it prints, sets NODE_PID and NODE_URL.
start_node() {
  local log="$1"; shift
  local prefix=()
  while [ "$1" != "--" ]; do prefix+=("$1"); shift; done
  shift
  SWITCHBOARD_LOG="${SWITCHBOARD_LOG:-info,sfu=debug}" \
    "${prefix[@]}" "$SWITCHBOARD_BIN" "$@" --http-port 0 --media-port 0 >"$log" 2>&1 &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  NODE_URL=""
  for _ in $(seq 1 100); do
    NODE_URL="$(grep -o 'https\?://[0-9.:]*/' "$log" | head -1 || true)"
    [ -n "$NODE_URL" ] && break
    kill -0 "$NODE_PID" 2>/dev/null || { cat "$log"; echo "switchboard exited"; exit 1; }
    sleep 0.1
  done
  [ -n "$NODE_URL" ] || { cat "$log"; echo "switchboard did not start"; exit 1; }
  NODE_URL="${NODE_URL%/}"
}

# stop_node <pid>: SIGTERM must end the node with exit code 0.
stop_node() {
  kill -TERM "$1"
  if wait "$1"; then echo "== node stopped cleanly"; else echo "node exit code $?"; exit 1; fi
  PIDS=("${PIDS[@]/$1}")
}

start_node artifacts/switchboard.log env --
echo "== node at $NODE_URL"
SB_URL="$NODE_URL" node --test --test-concurrency=1 tests/call.test.mjs tests/simulcast.test.mjs tests/reuse.test.mjs
SB_URL="$NODE_URL" node --test --test-concurrency=1 tests/phone.test.mjs
stop_node "$NODE_PID"

# Three clustered nodes on loopback: B dials A's trunk, C dials A's and B's.
export SWITCHBOARD_CLUSTER_SECRET="$("$SWITCHBOARD_BIN" secret)"
start_node artifacts/switchboard-a.log env -- --node-id 1 --trunk-port 0
A_PID="$NODE_PID"; A_URL="$NODE_URL"
A_TRUNK="$(grep -o 'trunk=[0-9.:]*' artifacts/switchboard-a.log | head -1 | cut -d= -f2)"
[ -n "$A_TRUNK" ] || { cat artifacts/switchboard-a.log; echo "node A printed no trunk address"; exit 1; }
start_node artifacts/switchboard-b.log env -- --node-id 2 --trunk-port 0 --peer "1@$A_TRUNK"
B_PID="$NODE_PID"; B_URL="$NODE_URL"
B_TRUNK="$(grep -o 'trunk=[0-9.:]*' artifacts/switchboard-b.log | head -1 | cut -d= -f2)"
start_node artifacts/switchboard-c.log env -- --node-id 3 --trunk-port 0 --peer "1@$A_TRUNK" --peer "2@$B_TRUNK"
C_PID="$NODE_PID"; C_URL="$NODE_URL"
echo "== cluster: node A at $A_URL (trunk $A_TRUNK), node B at $B_URL (trunk $B_TRUNK), node C at $C_URL"
SB_URL_A="$A_URL" SB_URL_B="$B_URL" SB_URL_C="$C_URL" node --test --test-concurrency=1 tests/cluster.test.mjs
stop_node "$C_PID"
stop_node "$B_PID"
stop_node "$A_PID"

# Two clustered nodes whose trunk crosses the impairment proxy: B's --peer is
# the proxy, which forwards to A's trunk port and drops 3 % of the datagrams
# each way (seeded). Publisher and subscriber on A, subscriber on B.
start_node artifacts/switchboard-loss-a.log env -- --node-id 1 --trunk-port 0
A_PID="$NODE_PID"; A_URL="$NODE_URL"
A_TRUNK="$(grep -o 'trunk=[0-9.:]*' artifacts/switchboard-loss-a.log | head -1 | cut -d= -f2)"
[ -n "$A_TRUNK" ] || { cat artifacts/switchboard-loss-a.log; echo "node A printed no trunk address"; exit 1; }
[ -x "$IMPAIR_BIN" ] || { echo "no impairment proxy at $IMPAIR_BIN (set IMPAIR_BIN)"; exit 1; }
"$IMPAIR_BIN" --listen 127.0.0.1:0 --upstream "$A_TRUNK" --seed 1 --loss 0.03 >artifacts/impair.log 2>&1 &
IMPAIR_PID=$!
PIDS+=("$IMPAIR_PID")
PROXY=""
for _ in $(seq 1 100); do
  PROXY="$(grep -o 'listening on [0-9.:]*' artifacts/impair.log | head -1 | cut -d' ' -f3 || true)"
  [ -n "$PROXY" ] && break
  kill -0 "$IMPAIR_PID" 2>/dev/null || { cat artifacts/impair.log; echo "switchboard-impair exited"; exit 1; }
  sleep 0.1
done
[ -n "$PROXY" ] || { cat artifacts/impair.log; echo "switchboard-impair did not start"; exit 1; }
start_node artifacts/switchboard-loss-b.log env -- --node-id 2 --trunk-port 0 --peer "1@$PROXY"
B_PID="$NODE_PID"; B_URL="$NODE_URL"
echo "== impaired trunk: node A at $A_URL (trunk $A_TRUNK), node B at $B_URL via proxy $PROXY (3 % loss)"
SB_URL_A="$A_URL" SB_URL_B="$B_URL" node --test --test-concurrency=1 tests/trunk-loss.test.mjs
stop_node "$B_PID"
kill -TERM "$IMPAIR_PID"; wait "$IMPAIR_PID" || true
PIDS=("${PIDS[@]/$IMPAIR_PID}")
stop_node "$A_PID"
unset SWITCHBOARD_CLUSTER_SECRET

# A namespace with one veth pair (both ends inside) and a default route:
# Firefox gathers host candidates only on non-loopback interfaces, and only
# when a default route exists (measured; see docs/ARCHITECTURE.md).
NETNS="sbe2e-$$"
ip netns add "$NETNS"
NS=(ip netns exec "$NETNS")
"${NS[@]}" ip link set lo up
"${NS[@]}" ip link add veth-sb type veth peer name veth-br
"${NS[@]}" ip addr add 10.77.0.1/24 dev veth-sb
"${NS[@]}" ip addr add 10.77.0.2/24 dev veth-br
"${NS[@]}" ip link set veth-sb up
"${NS[@]}" ip link set veth-br up
"${NS[@]}" ip route add default via 10.77.0.1 dev veth-br
start_node artifacts/switchboard-netns.log "${NS[@]}" -- --bind 10.77.0.1
echo "== node at $NODE_URL (namespace $NETNS)"
SB_URL="$NODE_URL" "${NS[@]}" node --test --test-concurrency=1 tests/firefox.test.mjs
stop_node "$NODE_PID"

# HTTPS + WSS on the namespace's non-loopback address, with a certificate
# from a throwaway CA (openssl) that Chromium trusts only by the leaves'
# SPKI hashes (tests/https.test.mjs renews it mid-call).
TLS_DIR="$(pwd)/artifacts/tls"
rm -rf "$TLS_DIR"; mkdir -p "$TLS_DIR"
(
  cd "$TLS_DIR"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca.pem \
    -days 2 -subj "/CN=switchboard e2e CA" 2>/dev/null
  printf 'subjectAltName=IP:10.77.0.1\nextendedKeyUsage=serverAuth\n' > leaf.ext
  for leaf in cert next; do
    key="key.pem"; [ "$leaf" = next ] && key="next-key.pem"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$key" -out "$leaf.csr" \
      -subj "/CN=10.77.0.1" 2>/dev/null
    openssl x509 -req -in "$leaf.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
      -extfile leaf.ext -out "$leaf.pem" 2>/dev/null
  done
)
spki() { openssl x509 -in "$1" -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64; }
SB_SPKI="$(spki "$TLS_DIR/cert.pem"),$(spki "$TLS_DIR/next.pem")"
LOG=artifacts/switchboard-https.log
start_node "$LOG" "${NS[@]}" -- --bind 10.77.0.1 --tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem"
echo "== node at $NODE_URL (namespace $NETNS, TLS)"
SB_URL="$NODE_URL" SB_PID="$NODE_PID" TLS_DIR="$TLS_DIR" SB_SPKI="$SB_SPKI" \
  "${NS[@]}" node --test --test-concurrency=1 tests/https.test.mjs
grep -q 'TLS certificate reloaded' "$LOG" || { cat "$LOG"; echo "the node did not log the certificate reload"; exit 1; }
stop_node "$NODE_PID"

# ICE-TCP fallback (tcp.sh makes and removes its own two namespaces).
SWITCHBOARD_BIN="$SWITCHBOARD_BIN" bash tcp.sh
