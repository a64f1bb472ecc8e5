# Helpers shared by benches/load.sh, benches/ab.sh and benches/instructions.sh (sourced, not
# run). start_mock keeps the pid it starts in the array PIDS.

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

# free_port: prints a free loopback TCP port.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# port_open PORT: whether something accepts connections on loopback PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# nginx_conf PREFIX PORT UPSTREAM UPSTREAM_KEY [one-process]: prints the baseline's config
# (benches/load/nginx.conf.in) for nginx under PREFIX on loopback PORT, proxying to UPSTREAM
# (host:port) with UPSTREAM_KEY; `one-process` adds `master_process off` (no worker processes).
nginx_conf() {
  local one=()
  [ "${5:-}" = one-process ] && one=(-e 's#^daemon off;#daemon off;\nmaster_process off;#')
  sed -e "s#@PREFIX@#$1#g" -e "s#@LISTEN@#127.0.0.1:$2#g" -e "s#@UPSTREAM@#$3#g" \
    -e "s#@UPSTREAM_KEY@#$4#g" "${one[@]}" "$(dirname "${BASH_SOURCE[0]}")/nginx.conf.in"
}
