#!/usr/bin/env bash
# A/B: two tollgate binaries, run alternately against the same mock upstream with the same
# wrk load and CPU pinning (proxy core 0; mock and wrk core 1), so machine noise hits both.
# Reports, per binary, the median req/s and proxy CPU µs per request, and the ratios B/A.
# Use it to check that a change made the request path cheaper (e.g. the previous commit's
# binary against this one); benches/load.sh compares against nginx instead.
#
#   benches/ab.sh OLD_BINARY NEW_BINARY
#
# Environment (defaults): ROUNDS (3) DURATION (5, seconds) STREAM (0; 1 = SSE, 50 events)
#   NKEYS (10000) CONNECTIONS (32) RATE (0 = as fast as possible; N = a constant N req/s,
#   paced as in load.sh, to compare latency at a given load) CARGO_TARGET_DIR (target; the
#   mock comes from its release/ directory: build it with `cargo build --release --bins`).
# Also reports the median p50 and p99 latency (µs) of each binary.
# Loopback only; every process it starts is stopped on exit.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
A_BIN="$(realpath "$1")" B_BIN="$(realpath "$2")"
ROUNDS="${ROUNDS:-3}" DURATION="${DURATION:-5}" STREAM="${STREAM:-0}"
NKEYS="${NKEYS:-10000}" CONNECTIONS="${CONNECTIONS:-32}"
MOCK_BIN="${CARGO_TARGET_DIR:-$HERE/../target}/release/tollgate-mock"
[ -x "$MOCK_BIN" ] || { echo "no $MOCK_BIN: cargo build --release --bins" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 2; }
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
PIN0=() PIN1=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0=(taskset -c 0); PIN1=(taskset -c 1); fi

# shellcheck source=load/common.sh
. "$HERE/load/common.sh"
start_mock "$MOCK_BIN" "$WORK" "${PIN1[@]}"
MAX_TOKENS=16; [ "$STREAM" = 1 ] && MAX_TOKENS=50
load() {  # seconds url -> "requests p50_us p99_us"
  BENCH_NKEYS="$NKEYS" BENCH_STREAM="$STREAM" BENCH_MAX_TOKENS="$MAX_TOKENS" \
    BENCH_RATE="${RATE:-0}" BENCH_THREADS=1 \
    "${PIN1[@]}" wrk -t1 -c"$CONNECTIONS" -d"$1"s -s "$HERE/load/chat.lua" "$2" \
    | python3 -c 'import json, sys
for line in sys.stdin:
    if line.startswith("LOADJSON "):
        j = json.loads(line[9:])
        print(j["requests"], j["latency_us"]["p50"], j["latency_us"]["p99"])'
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() {  # label binary -> "label requests cpu_us_per_request"
  local dir="$WORK/$1-$RANDOM" addr pid
  mkdir -p "$dir"
  python3 "$HERE/load/gen-config.py" "$dir/tollgate.toml" "$MOCK" "$dir/journal" "$NKEYS" dir
  BENCH_UPSTREAM_KEY=upk "${PIN0[@]}" "$2" serve --config "$dir/tollgate.toml" \
    --worker-threads 1 --log-format json >"$dir/log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  addr="$(tollgate_addr "$dir/log")" || { cat "$dir/log" >&2; exit 1; }
  local url="http://$addr/v1/chat/completions" t0 t1 n
  load 2 "$url" >/dev/null
  t0="$(ticks "$pid")"
  read -r n p50 p99 < <(load "$DURATION" "$url")
  t1="$(ticks "$pid")"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo "$1 $n $(( (t1 - t0) * 1000000 / $(getconf CLK_TCK) / n )) $p50 $p99"
}
for _ in $(seq 1 "$ROUNDS"); do
  run A "$A_BIN"
  run B "$B_BIN"
done | tee "$WORK/results"
python3 - "$WORK/results" "$DURATION" "$A_BIN" "$B_BIN" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
dur = float(sys.argv[2])
med = {}
for label in ("A", "B"):
    mine = [r for r in rows if r[0] == label]
    med[label] = (statistics.median(int(r[1]) for r in mine) / dur,
                  statistics.median(int(r[2]) for r in mine),
                  statistics.median(float(r[3]) for r in mine),
                  statistics.median(float(r[4]) for r in mine))
for label, path in (("A", sys.argv[3]), ("B", sys.argv[4])):
    rps, cpu, p50, p99 = med[label]
    print(f"{label} {path}: {rps:,.0f} req/s, {cpu} µs CPU/req, p50 {p50:,.0f} µs, p99 {p99:,.0f} µs")
print(f"B/A: req/s {med['B'][0] / med['A'][0]:.2f}x, CPU per request {med['B'][1] / med['A'][1]:.2f}x, "
      f"p99 {med['B'][3] - med['A'][3]:+,.0f} µs")
PY
