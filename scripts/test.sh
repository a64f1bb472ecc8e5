#!/usr/bin/env bash
# Runs every test: unit, integration (gateway + mock upstream on loopback) and the end-to-end
# tests that drive the gateway with the official openai and anthropic Python SDKs.
# Installs what a fresh machine lacks: the Python virtual environment with the pinned SDKs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import openai, anthropic" >/dev/null 2>&1; then
  echo "==> creating .venv with the SDKs from tests/e2e/requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
fi
export TOLLGATE_E2E_PYTHON="$PWD/.venv/bin/python"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast
  cargo test --doc --quiet
else
  cargo test --all-targets
fi
