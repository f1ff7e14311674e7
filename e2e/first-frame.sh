#!/usr/bin/env bash
# First frame across the trunk vs on the origin node, over several runs
# (one run varies a lot: it depends on when the publisher's encoder makes a
# keyframe). Each run is measure-trunk.sh with a short window: publisher +
# subscriber on A, subscriber on B, both subscribers click "join" at the same
# moment; first frame = click -> first decoded frame of the publisher's video.
#
#   bash e2e/first-frame.sh [RUNS] [-- <proxy args>]     (default 10 runs, 40 ± 10 ms)
#   SWITCHBOARD_BIN=/path/to/other/build bash e2e/first-frame.sh 10
#
# Prints one line per run (seed, A ms, B ms, B - A ms) and a summary line:
# median and range of B - A, and how many runs were within 150 ms.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUNS="${1:-10}"
[ $# -gt 0 ] && shift
PROXY=(--delay-ms 40 --jitter-ms 10)
if [ "${1:-}" = "--" ]; then shift; PROXY=("$@"); fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for i in $(seq 1 "$RUNS"); do
  bash "$HERE/measure-trunk.sh" --window 3 --warmup 1 --label "first-frame $i" \
    --out "$OUT/$i.json" -- "${PROXY[@]}" --seed "$i" >/dev/null 2>"$OUT/$i.err" \
    || { echo "run $i failed:"; tail -5 "$OUT/$i.err"; exit 1; }
done
python3 - "$OUT" "$RUNS" "${PROXY[*]}" <<'PY'
import json, sys, statistics
out, runs, proxy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
diffs = []
for i in range(1, runs + 1):
    d = json.load(open(f"{out}/{i}.json"))
    a, b = d["A"]["first_frame_ms"], d["B"]["first_frame_ms"]
    diffs.append(b - a)
    print(f"seed {i}: A {a} ms, B {b} ms, B - A {b - a:+} ms")
ok = sum(1 for x in diffs if x <= 150)
print(f"proxy [{proxy}], {runs} runs: B - A median {statistics.median(diffs):+.0f} ms, "
      f"range {min(diffs):+} .. {max(diffs):+} ms, within 150 ms: {ok}/{runs}")
PY
