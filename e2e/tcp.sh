#!/usr/bin/env bash
# ICE-TCP fallback with a real browser (needs root: namespaces, iptables).
#
# Two network namespaces joined by a veth pair: the node's (10.78.0.1) and
# the browser's (10.78.0.2, default route via the node's end). Nothing is
# added to the machine's own namespace, so no host firewall rule or route
# is touched. Then:
#   1. iptables in the browser's namespace drops UDP to the node;
#      tests/tcp.test.mjs (two Chromium pages in a call) must decode video
#      and audio with a TCP candidate pair, and the rule must have dropped
#      UDP (its packet counter), and the node must count TCP connections.
#   2. without the rule, the same test must select a UDP pair (sanity: TCP
#      is only the fallback).
#   --measure N: then join -> first decoded frame of a receive-only
#   subscriber, N runs over UDP and N over TCP, alternating
#   (tcp-first-frame.mjs); prints every run and the medians.
#
#   bash e2e/tcp.sh [--measure N]
# env: SWITCHBOARD_BIN (default: build release into $CARGO_TARGET_DIR or
#      target/), CHROMIUM, SWITCHBOARD_LOG.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$HERE"
MEASURE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --measure) MEASURE="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || { echo "e2e/tcp.sh needs root (network namespaces, iptables)" >&2; exit 1; }
missing=()
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -d node_modules/playwright-core ] || PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --silent

if [ -z "${SWITCHBOARD_BIN:-}" ]; then
  echo "== building switchboard (release)"
  (cd "$ROOT" && cargo build --release -p switchboard)
  SWITCHBOARD_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/switchboard"
fi
[ -x "$SWITCHBOARD_BIN" ] || { echo "no switchboard binary at $SWITCHBOARD_BIN" >&2; exit 1; }

NODE_IP=10.78.0.1
BROWSER_IP=10.78.0.2
ADMIN=127.0.0.1:9464
NODE_NS="sbtcp-node-$$"
BR_NS="sbtcp-browser-$$"
NODE_PID=""
cleanup() {
  if [ -n "$NODE_PID" ]; then kill -TERM "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
  ip netns del "$BR_NS" 2>/dev/null || true
  ip netns del "$NODE_NS" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$NODE_NS"
ip netns add "$BR_NS"
N=(ip netns exec "$NODE_NS")
B=(ip netns exec "$BR_NS")
"${N[@]}" ip link set lo up
"${B[@]}" ip link set lo up
"${N[@]}" ip link add veth-node type veth peer name veth-browser netns "$BR_NS"
"${N[@]}" ip addr add "$NODE_IP/24" dev veth-node
"${B[@]}" ip addr add "$BROWSER_IP/24" dev veth-browser
"${N[@]}" ip link set veth-node up
"${B[@]}" ip link set veth-browser up
"${B[@]}" ip route add default via "$NODE_IP" dev veth-browser

mkdir -p artifacts
LOG=artifacts/switchboard-tcp.log
: >"$LOG" # before the node starts: its own redirection happens after fork
SWITCHBOARD_LOG="${SWITCHBOARD_LOG:-info}" "${N[@]}" "$SWITCHBOARD_BIN" \
  --bind "$NODE_IP" --public-ip "$NODE_IP" --http-port 0 --media-port 0 \
  --admin-bind "$ADMIN" >"$LOG" 2>&1 &
NODE_PID=$!
URL=""
for _ in $(seq 1 100); do
  URL="$(grep -o 'http://[0-9.:]*/' "$LOG" | head -1 || true)"
  [ -n "$URL" ] && break
  kill -0 "$NODE_PID" 2>/dev/null || { cat "$LOG"; echo "switchboard exited"; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$LOG"; echo "switchboard did not start"; exit 1; }
URL="${URL%/}"
echo "== node at $URL in namespace $NODE_NS; browser in $BR_NS ($BROWSER_IP)"

# metric NAME: the node's value (admin listener, inside the node's namespace).
metric() {
  "${N[@]}" node -e "fetch('http://$ADMIN/metrics').then(r => r.text()).then(t => process.stdout.write(t))" \
    | awk -v n="$1" '$1 == n { print $2 }'
}

DROP=(OUTPUT -p udp -d "$NODE_IP" -j DROP)
"${B[@]}" iptables -A "${DROP[@]}"
echo "== UDP from the browser to the node dropped: iptables -A ${DROP[*]}"
SB_URL="$URL" SB_EXPECT_PROTO=tcp "${B[@]}" node --test --test-concurrency=1 tests/tcp.test.mjs
DROPPED="$("${B[@]}" iptables -L OUTPUT -v -n -x | awk '$3 == "DROP" { print $1 }')"
ACCEPTED="$(metric switchboard_tcp_connections_accepted_total)"
REFUSED="$(metric switchboard_tcp_connections_refused_total)"
echo "== UDP packets the rule dropped: $DROPPED; node: TCP connections accepted $ACCEPTED, refused $REFUSED, frames dropped $(metric switchboard_tcp_frames_dropped_total)"
[ "${DROPPED:-0}" -gt 0 ] || { echo "the browser sent no UDP to the node: the rule proved nothing"; exit 1; }
[ "${ACCEPTED:-0}" -ge 2 ] || { echo "the node accepted fewer than 2 TCP connections"; exit 1; }

"${B[@]}" iptables -D "${DROP[@]}"
echo "== rule removed: UDP must win"
SB_URL="$URL" SB_EXPECT_PROTO=udp "${B[@]}" node --test --test-concurrency=1 tests/tcp.test.mjs

if [ "$MEASURE" -gt 0 ]; then
  echo "== join -> first decoded frame, $MEASURE runs each over UDP and TCP"
  SB_URL="$URL" "${B[@]}" node tcp-first-frame.mjs --runs "$MEASURE" \
    --block "iptables -A ${DROP[*]}" --unblock "iptables -D ${DROP[*]}"
fi

kill -TERM "$NODE_PID"
if wait "$NODE_PID"; then echo "== node stopped cleanly"; else echo "node exit code $?"; NODE_PID=""; exit 1; fi
NODE_PID=""
