#!/usr/bin/env bash
# The whole test suite. Makes .venv (the official openai Python SDK, for the SDK test) on
# first run, then runs every Rust test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "openai>=1.40,<3"
fi
export TOLLGATE_PYTHON="$PWD/.venv/bin/python"
export TOLLGATE_REQUIRE_SDK=1
cargo test --workspace --locked "$@"
