#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: unlike time,
# the count does not move with machine noise, so small request-path changes show up. Starts
# the mock and tollgate (under callgrind, instrumentation off until warmed up; the generated
# bench config: 10 000 keys, prices, capped accounts, journal), sends N requests with `hey`,
# and prints the total and per-request count; `callgrind_annotate` on the kept output file
# shows where they go. Kernel work (sockets, the journal's write) is not counted.
#
#   benches/instructions.sh [BINARY]     (default: $CARGO_TARGET_DIR/release/tollgate)
#   benches/instructions.sh nginx        the load bench's baseline instead: nginx with
#                                        benches/load/nginx.conf.in, one process
#                                        (master_process off), same mock, requests and count
#
# Environment (defaults): N (2000) STREAM (0; 1 = SSE with 50 events) OUT (callgrind output
#   file, kept; default a temp file). Needs valgrind and hey (apt-get install valgrind hey).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN_DIR="${CARGO_TARGET_DIR:-$HERE/../target}/release"
TARGET="${1:-$BIN_DIR/tollgate}"
N="${N:-2000}" STREAM="${STREAM:-0}"
for tool in valgrind callgrind_control callgrind_annotate hey; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install valgrind hey)" >&2; exit 2; }
done
WORK="$(mktemp -d)"
OUT="${OUT:-$WORK/callgrind.out}"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK/journal"; }
trap cleanup EXIT

# shellcheck source=load/common.sh
. "$HERE/load/common.sh"
start_mock "$BIN_DIR/tollgate-mock" "$WORK"
if [ "$TARGET" = nginx ]; then
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
  [ -x "$NGINX" ] || { echo "nginx is missing (apt-get install nginx-light)" >&2; exit 2; }
  mkdir -p "$WORK/nginx"
  PORT="$(free_port)"
  # One process, so the worker's instructions are the ones counted.
  nginx_conf "$WORK/nginx" "$PORT" "$MOCK" upk one-process >"$WORK/nginx.conf"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" \
    "$NGINX" -c "$WORK/nginx.conf" -p "$WORK/nginx" >"$WORK/nginx.log" 2>"$WORK/valgrind.log" &
  VG=$!
  PIDS+=("$VG")
  ADDR="127.0.0.1:$PORT"
  for _ in $(seq 1 300); do
    port_open "$PORT" && break
    kill -0 "$VG" 2>/dev/null || break
    sleep 0.2
  done
  port_open "$PORT" || { cat "$WORK/nginx.log" "$WORK/valgrind.log" >&2; exit 1; }
else
  TOLLGATE="$(realpath "$TARGET")"
  python3 "$HERE/load/gen-config.py" "$WORK/tollgate.toml" "$MOCK" "$WORK/journal" 10000 dir
  BENCH_UPSTREAM_KEY=upk valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" \
    "$TOLLGATE" serve --config "$WORK/tollgate.toml" --worker-threads 1 --log-format json \
    >"$WORK/tollgate.log" 2>"$WORK/valgrind.log" &
  VG=$!
  PIDS+=("$VG")
  ADDR="$(tollgate_addr "$WORK/tollgate.log" 180)" \
    || { cat "$WORK/tollgate.log" "$WORK/valgrind.log" >&2; exit 1; }
fi
STREAM_FIELD=""; MAX_TOKENS=16
if [ "$STREAM" = 1 ]; then STREAM_FIELD=',"stream":true'; MAX_TOKENS=50; fi
BODY='{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write a short poem about metering proxies and tokens."}],"max_tokens":'"$MAX_TOKENS$STREAM_FIELD"'}'
send() {
  hey -n "$1" -c 8 -m POST -H "Authorization: Bearer tg-bench-7" -T application/json \
    -d "$BODY" "http://$ADDR/v1/chat/completions" | grep -E '^\s+\[[0-9]+\]'
}
send 200 >/dev/null
# The config watcher reads and digests the (1 MB) config once at the first event in its
# directory (the log above); let that happen before counting.
sleep 2
callgrind_control -i on "$VG" >/dev/null
send "$N"
callgrind_control -i off "$VG" >/dev/null
callgrind_control -d "$VG" >/dev/null
# The dump is written in the background: read it only once it is complete (its last line is
# `totals:`), or the count comes out short.
DUMP=""
for _ in $(seq 1 100); do
  DUMP="$(ls -t "$OUT"* 2>/dev/null | head -1)"
  [ -n "$DUMP" ] && grep -q '^totals:' "$DUMP" && break
  sleep 0.2
done
grep -q '^totals:' "$DUMP" || { echo "callgrind dump incomplete: $DUMP" >&2; exit 1; }
TOTAL="$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')"
echo "requests: $N (stream=$STREAM)"
echo "instructions: $TOTAL total, $(( TOTAL / N )) per request"
echo "callgrind output: $DUMP (callgrind_annotate --inclusive=yes $DUMP)"
