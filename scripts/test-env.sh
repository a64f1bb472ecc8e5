#!/usr/bin/env bash
# Prepares what the tests need beyond Rust: the Python virtual environment `.venv` with the
# pinned official openai and anthropic SDKs (the end-to-end tests find it there). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import openai, anthropic" >/dev/null 2>&1; then
  echo "==> creating .venv with the SDKs from tests/e2e/requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
fi
