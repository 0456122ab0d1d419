#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite.
# Usage: bash deploy/test.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
