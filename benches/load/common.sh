# Helpers shared by benches/ab.sh and benches/instructions.sh (sourced, not run). Both keep
# the pids they start in the array PIDS.

# start_mock MOCK_BINARY WORK_DIR [PIN_COMMAND...]: starts tollgate-mock on a free loopback
# port (upstream key `upk`), and sets MOCK to its host:port.
start_mock() {
  local bin="$1" work="$2"
  shift 2
  "$@" "$bin" --listen 127.0.0.1:0 --worker-threads 1 --openai-key upk --anthropic-key upk \
    >"$work/mock.log" 2>&1 &
  PIDS+=($!)
  MOCK=""
  for _ in $(seq 1 100); do
    MOCK="$(sed -n 's#^tollgate-mock listening on http://##p' "$work/mock.log")"
    [ -n "$MOCK" ] && return 0
    sleep 0.1
  done
  echo "the mock did not start" >&2
  return 1
}

# tollgate_addr LOG [SECONDS]: prints the address tollgate reports listening on (JSON logs),
# waiting up to SECONDS (60) for it; fails if it never does.
tollgate_addr() {
  local addr=""
  for _ in $(seq 1 $(( ${2:-60} * 5 ))); do
    addr="$(sed -n 's/.*"message":"tollgate listening","addr":"\([^"]*\)".*/\1/p' "$1")"
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.2
  done
  return 1
}
