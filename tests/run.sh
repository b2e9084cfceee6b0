#!/usr/bin/env bash
# The whole test suite: lint, type check, then every tier of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
