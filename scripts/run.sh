#!/usr/bin/env bash
# Runs tollgate on its embedded example config (config/tollgate.toml) in front of the mock
# upstream, journaling to data/usage.jsonl. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins
BIN="${CARGO_TARGET_DIR:-target}/release"

export TOLLGATE_OPENAI_KEY="${TOLLGATE_OPENAI_KEY:-sk-mock-openai}"
export TOLLGATE_ANTHROPIC_KEY="${TOLLGATE_ANTHROPIC_KEY:-sk-mock-anthropic}"
export TOLLGATE_ADMIN_TOKEN="${TOLLGATE_ADMIN_TOKEN:-local-admin-token-change-me}"
"$BIN/tollgate-mock" --listen 127.0.0.1:9100 \
  --openai-key "$TOLLGATE_OPENAI_KEY" --anthropic-key "$TOLLGATE_ANTHROPIC_KEY" &
MOCK=$!
trap 'kill $MOCK 2>/dev/null || true' EXIT
exec_status=0
"$BIN/tollgate" serve "$@" || exec_status=$?
exit $exec_status
