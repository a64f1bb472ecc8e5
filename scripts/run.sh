#!/usr/bin/env bash
# Runs tollgate on its embedded example config (config/tollgate.toml) in front of the mock
# upstream, journaling to data/journal/. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins
BIN="${CARGO_TARGET_DIR:-target}/release"

export TOLLGATE_OPENAI_KEY="${TOLLGATE_OPENAI_KEY:-sk-mock-openai}"
export TOLLGATE_ANTHROPIC_KEY="${TOLLGATE_ANTHROPIC_KEY:-sk-mock-anthropic}"
export TOLLGATE_ADMIN_TOKEN="${TOLLGATE_ADMIN_TOKEN:-local-admin-token-change-me}"
# The mock takes the keys it expects from the environment, not the command line (where
# any user's `ps` would show them).
MOCK_OPENAI_KEY="$TOLLGATE_OPENAI_KEY" MOCK_ANTHROPIC_KEY="$TOLLGATE_ANTHROPIC_KEY" \
  "$BIN/tollgate-mock" --listen 127.0.0.1:9100 &
MOCK=$!
trap 'kill $MOCK 2>/dev/null || true' EXIT
exec_status=0
"$BIN/tollgate" serve "$@" || exec_status=$?
exit $exec_status
