#!/usr/bin/env bash
# Load benchmark: tollgate (full metering, 10,000 keys, journal on) against nginx as a plain
# pass-through reverse proxy (the baseline), both in front of the same mock upstream
# (`tollgate-mock`), driven by the same wrk load. One command:
#
#   benches/load.sh
#
# What it does
#   1. Installs what is missing (Debian): wrk, nginx (apt-get update once, then install).
#      Without nginx it still measures tollgate, with no baseline.
#   2. cargo build --release --bins (CARGO_TARGET_DIR respected, default target/).
#   3. Starts on loopback, on free ports: the mock (1 worker thread), tollgate (generated
#      config with NKEYS keys = sha256("tg-bench-<i>"), journal in a temp dir, upstream = the
#      mock, --worker-threads 1) and nginx (worker_processes 1, upstream keepalive 512,
#      proxy_buffering off, access_log off, non-daemon, temp prefix: benches/load/nginx.conf.in).
#   4. Per scenario -- `chat` (non-streaming, max_tokens 16) and `stream` (SSE, max_tokens 50:
#      50 word events + prelude/finish/[DONE]) -- fresh proxies, a warm-up run against each,
#      then ROUNDS x (baseline, tollgate) alternating, so machine noise hits both; medians.
#      Every request carries `Authorization: Bearer tg-bench-<random i>` (benches/load/chat.lua);
#      nginx ignores it, tollgate authenticates, routes, meters and journals it.
#   5. Reports req/s, p50/p90/p99/p99.9 latency (wrk's histogram, µs), proxy CPU seconds
#      (utime+stime from /proc/PID/stat; nginx = master + worker), CPU per request, peak RSS
#      (VmHWM; nginx: the worker), CPU utilisation of proxy/mock/wrk, tollgate/baseline req/s
#      ratio and added p99. Checks that wrk saw no errors or non-2xx responses, that the
#      proxies stayed up, and that tollgate's journal grew by at least the requests wrk completed.
#   6. LATENCY_AT_HALF=1 (default): both proxies again at a constant rate of half tollgate's
#      median max req/s (per scenario); target: tollgate adds <= 100 µs to the baseline's p99.
#      The load comes from tollgate-loadgen (src/bin/tollgate-loadgen.rs, built with the
#      other binaries): open loop, 32 connections, each send at its own time with
#      sub-millisecond precision, Poisson arrivals (ARRIVALS=uniform: evenly spaced).
#      INTERLEAVE=1 (default): each round is one loadgen run in which the proxies take
#      turns of EPOCH_MS (200) ms, in an order shuffled every cycle, HALF_DURATION of turns
#      each, so the machine's slow swings in speed (seen here: either proxy's p99 moving
#      2-3x between runs a minute apart) hit them alike and the added p99 of a round
#      compares like with like; the verdict uses the median of the rounds' differences.
#      INTERLEAVE=0: one run per proxy, alternating, as for max throughput.
#      CONTROL=1 (default, with INTERLEAVE=1): a second nginx, identical to the baseline,
#      takes turns with the other two. baseline vs control is an A/A comparison: what p99
#      differs by between two identical proxies measured alike is the bench's resolution,
#      printed beside the added p99 (on this 2-core VM it was often several hundred µs).
#      PACER=wrk uses wrk with a Lua delay() pacer instead (chat.lua), as before: wrk's
#      timers tick once a millisecond, so each millisecond's requests (~25 at 25k req/s)
#      leave together, and the latency measured is mostly queueing behind that burst, which
#      scales with CPU time per request times the burst size. (Debian ships no wrk2, and
#      hey -q prints latencies rounded to 100 µs.)
#   Markdown report on stdout; everything as JSON in $CARGO_TARGET_DIR/load-bench.json.
#   Exits 1 when a check failed. Loopback only; every step has a time bound; every process it
#   started is stopped on exit, Ctrl-C or failure. KEEP_WORK=1 keeps the temp dir (logs).
#
# CPU pinning (taskset), 2 cores: the proxy under test gets core 0 to itself; the mock and
# wrk share core 1. Both proxies get the same treatment, and all of a proxy's threads
# (tollgate's runtime worker + journal writer; nginx's master + worker) live on core 0, so no
# part of its cost hides on the other core. The "CPU util" column shows which core saturates:
# proxy ~100% means the proxy is the bottleneck; mock + wrk ~100% together means core 1 is,
# and then the req/s ratio understates the proxy's cost (compare CPU µs/req instead). With
# >= 3 cores: proxy 0, mock 1, wrk 2. With 1 core: unpinned. Override with PROXY_CPUS,
# MOCK_CPUS, LOAD_CPUS (taskset -c lists; empty = unpinned).
#
# Environment (defaults): DURATION (10s) CONNECTIONS (32) THREADS (1, wrk -t) ROUNDS (3)
#   WARMUP (3s) NKEYS (10000) SCENARIOS (chat,stream) LATENCY_AT_HALF (1) NICE (-10 as root)
#   NOISE_MAX (0.2: a round in which other processes used more cores than this is discarded
#   and repeated, at most ROUNDS times)
#   HALF_DURATION (= DURATION) PACER (loadgen; or wrk) ARRIVALS (poisson; or uniform)
#   INTERLEAVE (1) EPOCH_MS (200) CONTROL (1)
#   HALF_RATE (unset; a rate in req/s skips the max-throughput runs and runs only the
#   constant-rate ones at this rate, for repeating a latency comparison)
#   CARGO_TARGET_DIR (target) SKIP_BUILD (0; 1 = use the binaries
#   already built in $CARGO_TARGET_DIR/release)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
cd "$ROOT"
LOAD_DIR="$HERE/load"

DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-1}"
ROUNDS="${ROUNDS:-3}"
NOISE_MAX="${NOISE_MAX:-0.2}"
WARMUP="${WARMUP:-3s}"
NKEYS="${NKEYS:-10000}"
SCENARIOS="${SCENARIOS:-chat,stream}"
LATENCY_AT_HALF="${LATENCY_AT_HALF:-1}"
HALF_DURATION="${HALF_DURATION:-$DURATION}"
PACER="${PACER:-loadgen}"
INTERLEAVE="${INTERLEAVE:-1}"
CONTROL="${CONTROL:-1}"
EPOCH_MS="${EPOCH_MS:-200}"
ARRIVALS="${ARRIVALS:-poisson}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release"
OUT_JSON="$TARGET_DIR/load-bench.json"
UPSTREAM_KEY="sk-bench-upstream"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# Whole seconds in "10s", "2m", "10".
secs() {
  case "$1" in
    *ms) echo 1 ;;
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *h) echo $(( ${1%h} * 3600 )) ;;
    *) echo "$1" ;;
  esac
}

# One benchmark at a time on this machine: a second one would be the first one's noise.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/tollgate-load-bench.lock"
  if ! flock -n 9; then
    log "another benches/load.sh is running: waiting for it (30 min at most)"
    flock -w 1800 9 || die "still locked: ${TMPDIR:-/tmp}/tollgate-load-bench.lock"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 1. Tools.
# ---------------------------------------------------------------------------------------------
find_nginx() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ -n "$(find_nginx)" ] || missing+=(nginx)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    # Keep the package from starting a system nginx on port 80 (policy-rc.d 101 = "don't").
    policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      policy_added=1
    fi
    timeout 300 apt-get update -qq || log "apt-get update failed"
    for p in "${missing[@]}"; do
      DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "$p" >/dev/null \
        || log "could not install $p"
    done
    if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    log "missing ${missing[*]} and cannot apt-get install (not root, or not Debian)"
  fi
fi
command -v wrk >/dev/null 2>&1 || die "wrk is required"
command -v python3 >/dev/null 2>&1 || die "python3 is required (config generation, report)"
NGINX="$(find_nginx)"
[ -n "$NGINX" ] || log "nginx unavailable: measuring tollgate only, NO BASELINE"

# ---------------------------------------------------------------------------------------------
# 2. Build.
# ---------------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  log "SKIP_BUILD=1: using the binaries already in $BIN"
else
  log "cargo build --release --bins (target dir: $TARGET_DIR)"
  timeout 1800 cargo build --release --bins --quiet
fi
[ -x "$BIN/tollgate" ] && [ -x "$BIN/tollgate-mock" ] && [ -x "$BIN/tollgate-loadgen" ] || die "binaries not found in $BIN"

# ---------------------------------------------------------------------------------------------
# Pinning.
# ---------------------------------------------------------------------------------------------
NCPU="$(nproc)"
if [ "$NCPU" -ge 3 ]; then def_proxy=0 def_mock=1 def_load=2
elif [ "$NCPU" -eq 2 ]; then def_proxy=0 def_mock=1 def_load=1
else def_proxy="" def_mock="" def_load=""
fi
PROXY_CPUS="${PROXY_CPUS-$def_proxy}"
MOCK_CPUS="${MOCK_CPUS-$def_mock}"
LOAD_CPUS="${LOAD_CPUS-$def_load}"
if ! command -v taskset >/dev/null 2>&1; then
  PROXY_CPUS="" MOCK_CPUS="" LOAD_CPUS=""
  log "no taskset: unpinned"
fi
# Priority: as root, proxy, mock and wrk run at nice -10 (NICE), so that a compiler or test
# run elsewhere on the machine steals less from them; same for both proxies.
NICE="${NICE-$([ "$(id -u)" = 0 ] && echo -10 || echo 0)}"
# Command prefixes (arrays, not functions: `prefix cmd &` must make $! the process itself).
PIN_PROXY=() PIN_MOCK=() PIN_LOAD=()
if [ -n "$NICE" ] && [ "$NICE" != 0 ]; then PIN_PROXY=(nice -n "$NICE") PIN_MOCK=(nice -n "$NICE") PIN_LOAD=(nice -n "$NICE"); fi
if [ -n "$PROXY_CPUS" ]; then PIN_PROXY+=(taskset -c "$PROXY_CPUS"); fi
if [ -n "$MOCK_CPUS" ]; then PIN_MOCK+=(taskset -c "$MOCK_CPUS"); fi
if [ -n "$LOAD_CPUS" ]; then PIN_LOAD+=(taskset -c "$LOAD_CPUS"); fi

# ---------------------------------------------------------------------------------------------
# Processes and cleanup.
# ---------------------------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-load.XXXXXX")"
chmod 755 "$WORK"  # nginx workers run as nobody when started by root
PIDS=()
LOAD_PID=""

stop_pid() {
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  if [ -n "$LOAD_PID" ]; then stop_pid "$LOAD_PID"; fi
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [ -n "${KEEP_WORK:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'exit 143' TERM

# Snapshot the binaries: a concurrent cargo build must not swap them between runs.
mkdir "$WORK/bin"
cp "$BIN/tollgate" "$BIN/tollgate-mock" "$BIN/tollgate-loadgen" "$WORK/bin/"
BIN="$WORK/bin"

forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
# free_port, port_open, nginx_conf.
# shellcheck source=load/common.sh
. "$LOAD_DIR/common.sh"

# CPU clock ticks (utime + stime, all threads) of the given pids, summed.
cpu_ticks() {
  local total=0 pid stat
  for pid in "$@"; do
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
    stat="${stat##*) }"
    total=$(( total + $(echo "$stat" | awk '{print $12 + $13}') ))
  done
  echo "$total"
}
# Busy clock ticks of the whole machine (all CPUs) from /proc/stat.
machine_busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
CLK_TCK="$(getconf CLK_TCK)"
children() { cat /proc/"$1"/task/*/children 2>/dev/null | xargs echo || true; }

# The mock: one for the whole benchmark.
log "starting tollgate-mock (1 worker thread, CPUs ${MOCK_CPUS:-any})"
"${PIN_MOCK[@]}" "$BIN/tollgate-mock" --listen 127.0.0.1:0 --worker-threads 1 \
  --openai-key "$UPSTREAM_KEY" --anthropic-key "$UPSTREAM_KEY" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
MOCK_ADDR=""
for _ in $(seq 1 100); do
  MOCK_ADDR="$(sed -n 's#^tollgate-mock listening on http://##p' "$WORK/mock.log" 2>/dev/null)"
  [ -n "$MOCK_ADDR" ] && break
  kill -0 "$MOCK_PID" 2>/dev/null || { cat "$WORK/mock.log" >&2; die "the mock exited"; }
  sleep 0.1
done
[ -n "$MOCK_ADDR" ] || die "the mock did not report its address"

log "generating the tollgate config ($NKEYS keys)"  # per scenario, in start_tollgate
# `[journal] dir` (segment directory); builds from before it have `[journal] path` (JSON lines).
# Each scenario gets a fresh journal: tollgate replays its journal at startup, so a restart on
# the previous scenario's one would measure that replay (time, memory) instead.
JOURNAL_KEY=dir
gen_config() {  # Args: scenario. Sets JOURNAL, writes $WORK/tollgate-<scenario>.toml.
  if [ "$JOURNAL_KEY" = dir ]; then JOURNAL="$WORK/journal-$1"; else JOURNAL="$WORK/journal-$1.jsonl"; fi
  python3 "$LOAD_DIR/gen-config.py" "$WORK/tollgate-$1.toml" "$MOCK_ADDR" "$JOURNAL" "$NKEYS" "$JOURNAL_KEY"
  BENCH_UPSTREAM_KEY="$UPSTREAM_KEY" "$BIN/tollgate" check-config "$WORK/tollgate-$1.toml" \
    >"$WORK/check-config.out" 2>&1
}
if ! gen_config probe; then
  JOURNAL_KEY=path
  gen_config probe || { cat "$WORK/check-config.out" >&2; die "generated config rejected"; }
fi

TG_PID="" TG_ADDR="" NGX_PID="" NGX_ADDR="" NGX_WORKERS="" CTL_PID="" CTL_ADDR="" CTL_WORKERS=""
start_tollgate() {
  local logf="$WORK/tollgate-$1.log"
  gen_config "$1" || { cat "$WORK/check-config.out" >&2; die "generated config rejected"; }
  JCURSOR=""
  BENCH_UPSTREAM_KEY="$UPSTREAM_KEY" "${PIN_PROXY[@]}" "$BIN/tollgate" serve \
    --config "$WORK/tollgate-$1.toml" --worker-threads 1 --log-format json >"$logf" 2>&1 &
  TG_PID=$!
  PIDS+=("$TG_PID")
  TG_ADDR=""
  for _ in $(seq 1 600); do
    TG_ADDR="$(sed -n 's/.*"message":"tollgate listening","addr":"\([^"]*\)".*/\1/p' "$logf" 2>/dev/null)"
    [ -n "$TG_ADDR" ] && return 0
    kill -0 "$TG_PID" 2>/dev/null || { cat "$logf" >&2; die "tollgate exited"; }
    sleep 0.1
  done
  die "tollgate did not report its address"
}
start_nginx() {
  local prefix="$WORK/nginx-$1" port
  mkdir -p "$prefix"
  port="$(free_port)"
  nginx_conf "$prefix" "$port" "$MOCK_ADDR" "$UPSTREAM_KEY" >"$prefix/nginx.conf"
  "${PIN_PROXY[@]}" "$NGINX" -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log" \
    >"$prefix/stdout.log" 2>&1 &
  NGX_PID=$!
  PIDS+=("$NGX_PID")
  NGX_ADDR="127.0.0.1:$port"
  for _ in $(seq 1 100); do
    NGX_WORKERS="$(children "$NGX_PID")"
    if port_open "$port" && [ -n "$NGX_WORKERS" ]; then return 0; fi
    kill -0 "$NGX_PID" 2>/dev/null || { cat "$prefix/error.log" "$prefix/stdout.log" >&2; die "nginx exited"; }
    sleep 0.1
  done
  die "nginx did not start"
}
stop_proxy() {
  [ -n "$1" ] || return 0
  stop_pid "$1"
  forget_pid "$1"
}

# Bytes of journal data written so far (segment files, or the JSON-lines file).
journal_bytes() {
  find "$JOURNAL" -maxdepth 1 -type f \( -name '*.seg' -o -name '*.jsonl' \) -printf '%s\n' 2>/dev/null \
    | awk '{s += $1} END {print s + 0}'
}
# Reads the usage entries written since JCURSOR, once the journal has stopped growing and
# holds at least $1 of them (10 s at most), advances JCURSOR and prints their summary (JSON).
JCURSOR=""
journal_collect() {
  local want="$1" max_tokens="$2" last=-1 stable=0 b stats="" n
  for _ in $(seq 1 100); do
    b="$(journal_bytes)"
    if [ "$b" = "$last" ]; then stable=$((stable + 1)); else stable=0; fi
    last="$b"
    if [ "$stable" -ge 3 ]; then
      stats="$(python3 "$LOAD_DIR/journal.py" "$JOURNAL" "$JCURSOR" "$max_tokens")"
      n="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["entries"])' "$stats")"
      [ "$n" -ge "$want" ] && break
      stable=0
    fi
    sleep 0.1
  done
  [ -n "$stats" ] || stats="$(python3 "$LOAD_DIR/journal.py" "$JOURNAL" "$JCURSOR" "$max_tokens")"
  JCURSOR="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["cursor"])' "$stats")"
  printf '%s' "$stats"
}

# ---------------------------------------------------------------------------------------------
# One load run. Args: kind (warmup|max|half) scenario round duration rate (0 = max) target...
# One target: wrk (max) or tollgate-loadgen (constant rate). Several targets (constant rate
# with the loadgen only): one loadgen run in which they take turns every EPOCH_MS, so each
# gets `duration` of turns and slow machine drifts hit them alike. Measured runs append one
# JSON line per target to runs.jsonl.
# ---------------------------------------------------------------------------------------------
RUNS="$WORK/runs.jsonl"
: >"$RUNS"
target_pids() {
  case "$1" in
    tollgate) echo "$TG_PID" ;;
    control) echo "$CTL_PID $CTL_WORKERS" ;;
    *) echo "$NGX_PID $NGX_WORKERS" ;;
  esac
}
target_addr() {
  case "$1" in
    tollgate) echo "$TG_ADDR" ;;
    control) echo "$CTL_ADDR" ;;
    *) echo "$NGX_ADDR" ;;
  esac
}
run_load() {
  local kind="$1" sc="$2" round="$3" dur="$4" rate="$5"
  shift 5
  local targets_here=("$@") n="$#" t
  local stream max_tokens
  case "$sc" in
    chat) stream=0 max_tokens=16 ;;
    stream) stream=1 max_tokens=50 ;;
    *) die "unknown scenario $sc (chat, stream)" ;;
  esac
  local joined="${targets_here[*]}"
  local out="$WORK/load-$kind-$sc-$round-${joined// /-}.out" m0 all_pids=""
  declare -A p0=()
  for t in "${targets_here[@]}"; do
    # shellcheck disable=SC2046
    p0[$t]="$(cpu_ticks $(target_pids "$t"))"
    all_pids+=" $(target_pids "$t")"
  done
  m0="$(cpu_ticks "$MOCK_PID")"
  local b0; b0="$(machine_busy_ticks)"
  python3 "$LOAD_DIR/procs.py" snap "$WORK/procs.json"
  # sh reaps the load generator, then prints its own stat line, whose cutime + cstime are
  # the generator's CPU use.
  local load_cmd secs_total
  if [ "$rate" != 0 ] && [ "$PACER" = loadgen ]; then
    # Constant rate: the open-loop generator (sub-millisecond send times; see its docs).
    secs_total=$(( $(secs "$dur") * n ))
    load_cmd=("$BIN/tollgate-loadgen" --rate "$rate" --connections "$CONNECTIONS"
      --duration-s "$secs_total" --nkeys "$NKEYS" --max-tokens "$max_tokens"
      --arrivals "$ARRIVALS" --epoch-ms "$EPOCH_MS")
    for t in "${targets_here[@]}"; do load_cmd+=(--addr "$(target_addr "$t")"); done
    [ "$stream" = 1 ] && load_cmd+=(--stream)
  else
    [ "$n" = 1 ] || die "wrk drives one target at a time"
    secs_total="$(secs "$dur")"
    load_cmd=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$dur" --timeout 10s -s "$LOAD_DIR/chat.lua"
      "http://$(target_addr "${targets_here[0]}")/v1/chat/completions")
  fi
  BENCH_NKEYS="$NKEYS" BENCH_STREAM="$stream" BENCH_MAX_TOKENS="$max_tokens" \
  BENCH_RATE="$rate" BENCH_THREADS="$THREADS" \
    "${PIN_LOAD[@]}" timeout -k 5 $(( secs_total + 60 )) \
    sh -c '"$@"; rc=$?; echo "LOADSTAT $(cat /proc/$$/stat)"; exit $rc' sh \
    "${load_cmd[@]}" >"$out" 2>&1 &
  LOAD_PID=$!
  local rc=0
  wait "$LOAD_PID" || rc=$?
  LOAD_PID=""
  local m1 b1 pid
  declare -A p1=()
  for t in "${targets_here[@]}"; do
    # shellcheck disable=SC2046
    p1[$t]="$(cpu_ticks $(target_pids "$t"))"
  done
  m1="$(cpu_ticks "$MOCK_PID")"
  b1="$(machine_busy_ticks)"
  # Excluded: the proxies, the mock, this script and its children (the generator is reaped
  # by then).
  local others
  # shellcheck disable=SC2086
  others="$(python3 "$LOAD_DIR/procs.py" diff "$WORK/procs.json" \
    "$all_pids $MOCK_PID ${TG_PID:-} ${NGX_PID:-} ${NGX_WORKERS:-} ${CTL_PID:-} ${CTL_WORKERS:-} $$ $BASHPID")"
  if [ "$rc" != 0 ] || ! grep -q '^LOADJSON ' "$out"; then
    cat "$out" >&2
    die "the load generator failed against ${targets_here[*]} ($kind/$sc, exit $rc)"
  fi
  local load_ticks proxies_ticks=0
  load_ticks="$(sed -n 's/^LOADSTAT .*) //p' "$out" | awk '{print $14 + $15}')"
  for t in "${targets_here[@]}"; do proxies_ticks=$(( proxies_ticks + p1[$t] - p0[$t] )); done
  for t in "${targets_here[@]}"; do
    local wrkjson alive=true rss jd=null reqs jstats=null
    if [ "$n" = 1 ]; then
      wrkjson="$(sed -n 's/^LOADJSON //p' "$out")"
    else
      wrkjson="$(sed -n "s/^LOADJSON \({\"addr\":\"$(target_addr "$t")\".*\)/\1/p" "$out")"
    fi
    [ -n "$wrkjson" ] || { cat "$out" >&2; die "no result for $t in the load generator's output"; }
    # shellcheck disable=SC2046
    for pid in $(target_pids "$t"); do kill -0 "$pid" 2>/dev/null || alive=false; done
    if [ "$t" = tollgate ]; then
      rss="$(hwm_kb "$TG_PID")"
      reqs="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$wrkjson")"
      # Not in a $(...): JCURSOR must advance in this shell.
      journal_collect "$reqs" "$max_tokens" >"$WORK/journal-stats.json"
      jstats="$(cat "$WORK/journal-stats.json")"
      jd="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["entries"])' "$jstats")"
    else
      # shellcheck disable=SC2046
      set -- $(target_pids "$t")
      rss="$(hwm_kb "$2")"
    fi
    [ "$kind" = warmup ] && continue
    # With several targets, each gets its share (1/n) of what mock, generator and the rest
    # of the machine used, plus all of its own CPU time.
    printf '{"kind":"%s","scenario":"%s","target":"%s","round":%s,"rate":%s,"interleaved":%s,"proxy_cpu_s":%s,"mock_cpu_s":%s,"load_cpu_s":%s,"machine_busy_s":%s,"proxy_rss_kb":%s,"journal_delta":%s,"journal":%s,"alive":%s,"others_top":%s,"wrk":%s}\n' \
      "$kind" "$sc" "$t" "$round" "$rate" "$([ "$n" -gt 1 ] && echo true || echo false)" \
      "$(awk -v a="${p0[$t]}" -v b="${p1[$t]}" -v t="$CLK_TCK" 'BEGIN{print (b-a)/t}')" \
      "$(awk -v a="$m0" -v b="$m1" -v t="$CLK_TCK" -v n="$n" 'BEGIN{print (b-a)/t/n}')" \
      "$(awk -v a="${load_ticks:-0}" -v t="$CLK_TCK" -v n="$n" 'BEGIN{print a/t/n}')" \
      "$(awk -v a="$b0" -v b="$b1" -v all="$proxies_ticks" -v own="$(( p1[$t] - p0[$t] ))" \
          -v t="$CLK_TCK" -v n="$n" 'BEGIN{print ((b-a-all)/n + own)/t}')" \
      "${rss:-0}" "$jd" "$jstats" "$alive" "$others" "$wrkjson" >>"$RUNS"
    python3 - "$RUNS" <<'EOF2' >&2
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
w = r["wrk"]; lat = w["latency_us"]; e = sum(w["errors"].values())
print(f"    {r['kind']:4} {r['scenario']:6} {r['target']:8} round {r['round']}: "
      f"{w['requests'] / (w['duration_us'] / 1e6):8.0f} req/s  p50 {lat['p50']} µs  "
      f"p99 {lat['p99']} µs  errors {e}"
      + (f"  journal +{r['journal_delta']} {dict(r['journal']['outcomes'])}" if r["journal"] else ""))
EOF2
  done
}

# Marks the last $1 runs noisy when, in any of them, processes other than proxy, mock and wrk
# used more than NOISE_MAX cores (from /proc/stat). Exit status 1 = noisy.
mark_noisy() {
  python3 - "$RUNS" "$1" "$NOISE_MAX" <<'EOF'
import json, sys
path, n, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
runs = [json.loads(l) for l in open(path)]
def other(r):
    d = r["wrk"]["duration_us"] / 1e6
    return (r["machine_busy_s"] - r["proxy_cpu_s"] - r["mock_cpu_s"] - r["load_cpu_s"]) / d
worst = max(other(r) for r in runs[-n:])
if worst <= limit:
    sys.exit(0)
for r in runs[-n:]:
    r["noisy"] = True
with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in runs)
top = sorted((o for r in runs[-n:] for o in r.get("others_top", [])), key=lambda o: -o["cpu_s"])[:3]
who = ", ".join(f"{o['process']} {o['cpu_s']}s" for o in top)
print(f"    (other processes used {worst:.2f} cores: round discarded, repeating; top: {who})",
      file=sys.stderr)
sys.exit(1)
EOF
}

# ROUNDS alternating rounds (one run per target each); a round disturbed by other processes
# is kept in the JSON but marked noisy and repeated, up to ROUNDS extra attempts.
# Args: kind scenario duration rate.
run_rounds() {
  local kind="$1" sc="$2" dur="$3" rate="$4" clean=0 attempt=0 t
  while [ "$clean" -lt "$ROUNDS" ] && [ "$attempt" -lt $(( ROUNDS * 2 )) ]; do
    attempt=$(( attempt + 1 ))
    local these=("${targets[@]}")
    if [ "$rate" != 0 ] && [ "$PACER" = loadgen ] && [ "$INTERLEAVE" = 1 ]; then
      [ -n "$CTL_PID" ] && these=(baseline control tollgate)
      run_load "$kind" "$sc" "$attempt" "$dur" "$rate" "${these[@]}"
    else
      for t in "${these[@]}"; do run_load "$kind" "$sc" "$attempt" "$dur" "$rate" "$t"; done
    fi
    if mark_noisy "${#these[@]}"; then clean=$(( clean + 1 )); fi
  done
}

# Median req/s of a scenario's tollgate max runs.
tollgate_max_rps() {
  python3 - "$RUNS" "$1" <<'EOF'
import json, statistics, sys
runs = [r for r in map(json.loads, open(sys.argv[1]))
        if r["kind"] == "max" and r["scenario"] == sys.argv[2] and r["target"] == "tollgate"]
runs = [r for r in runs if not r.get("noisy")] or runs  # noisy ones only if nothing else
rps = [r["wrk"]["requests"] / (r["wrk"]["duration_us"] / 1e6) for r in runs]
print(int(statistics.median(rps)) if rps else 0)
EOF
}

# ---------------------------------------------------------------------------------------------
# 3-5. The runs.
# ---------------------------------------------------------------------------------------------
targets=(tollgate)
if [ -n "$NGINX" ]; then targets=(baseline tollgate); fi
IFS=',' read -r -a scenario_list <<<"$SCENARIOS"
log "mock $MOCK_ADDR; wrk -t$THREADS -c$CONNECTIONS -d$DURATION x $ROUNDS rounds; CPUs: proxy ${PROXY_CPUS:-any}, mock ${MOCK_CPUS:-any}, wrk ${LOAD_CPUS:-any}; nice ${NICE:-0}"
for sc in "${scenario_list[@]}"; do
  # Fresh proxies per scenario, so peak RSS is per scenario.
  start_tollgate "$sc"
  CTL_PID="" CTL_ADDR="" CTL_WORKERS=""
  if [ -n "$NGINX" ] && [ "$CONTROL" = 1 ] && [ "$INTERLEAVE" = 1 ] && [ "$PACER" = loadgen ] \
    && [ "$LATENCY_AT_HALF" = 1 ]; then
    # The control: a second, identical nginx, measured in the same turns as the other two.
    start_nginx "$sc-control"
    CTL_PID="$NGX_PID" CTL_ADDR="$NGX_ADDR" CTL_WORKERS="$NGX_WORKERS"
  fi
  if [ -n "$NGINX" ]; then start_nginx "$sc"; fi
  log "scenario $sc: tollgate $TG_ADDR${NGINX:+, nginx $NGX_ADDR}${CTL_ADDR:+, control nginx $CTL_ADDR}; warm-up $WARMUP each"
  for t in "${targets[@]}" ${CTL_PID:+control}; do run_load warmup "$sc" 0 "$WARMUP" 0 "$t"; done
  if [ -n "${HALF_RATE:-}" ]; then
    half="$HALF_RATE"
  else
    run_rounds max "$sc" "$DURATION" 0
    half=$(( $(tollgate_max_rps "$sc") / 2 ))
  fi
  if [ "$LATENCY_AT_HALF" = 1 ] && [ "$half" -gt 0 ]; then
    log "scenario $sc: constant rate $half req/s (${HALF_RATE:+HALF_RATE, not }half of tollgate's max)"
    run_rounds half "$sc" "$HALF_DURATION" "$half"
  fi
  stop_proxy "$TG_PID"
  if [ -n "$NGINX" ]; then stop_proxy "$NGX_PID"; fi
  if [ -n "$CTL_PID" ]; then stop_proxy "$CTL_PID"; fi
done

# ---------------------------------------------------------------------------------------------
# 6. Report.
# ---------------------------------------------------------------------------------------------
half_note=""
[ "$LATENCY_AT_HALF" = 1 ] || half_note="Constant-rate latency at half throughput: skipped (LATENCY_AT_HALF=0)."
[ -n "$NGINX" ] || half_note="No baseline: nginx could not be installed. $half_note"
baseline_version="none"
if [ -n "$NGINX" ]; then baseline_version="$("$NGINX" -v 2>&1 | sed 's/.*: //')"; fi
git_rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then git_rev="$git_rev+dirty"; fi
cat >"$WORK/config.json" <<EOF
{"duration": "$DURATION", "half_duration": "$HALF_DURATION", "connections": $CONNECTIONS,
 "threads": $THREADS, "rounds": $ROUNDS, "warmup": "$WARMUP", "nkeys": $NKEYS,
 "scenarios": "$SCENARIOS", "latency_at_half": $([ "$LATENCY_AT_HALF" = 1 ] && echo true || echo false),
 "cpus": {"proxy": "$PROXY_CPUS", "mock": "$MOCK_CPUS", "load": "$LOAD_CPUS", "online": $NCPU},
 "nice": "${NICE:-0}", "noise_max_cores": $NOISE_MAX,
 "git": "$git_rev", "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
 "mock": "tollgate-mock --worker-threads 1", "tollgate": "tollgate serve --worker-threads 1",
 "baseline": "$baseline_version", "wrk": "$(wrk --version 2>&1 | head -1 | awk '{print $2}')",
 "pacer": "$PACER", "arrivals": "$ARRIVALS",
 "interleave": $([ "$INTERLEAVE" = 1 ] && echo true || echo false), "epoch_ms": $EPOCH_MS,
 "control": $([ "$CONTROL" = 1 ] && echo true || echo false), "half_rate": ${HALF_RATE:-null},
 "half_note": "$half_note"}
EOF
mkdir -p "$TARGET_DIR"
python3 "$LOAD_DIR/report.py" "$RUNS" "$OUT_JSON" "$WORK/config.json"
