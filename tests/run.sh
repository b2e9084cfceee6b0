#!/usr/bin/env bash
# The whole test suite: lint, type check, then every tier of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
# The daemon-level suites once more on the FUSE backend: the run above served
# branches by kernel overlayfs where it could (auto, as root), and the same
# tests must hold for both backends (tests/daemon/test_backend.py checks that
# each branch really is served by the backend asked for).
echo "== pytest, FUSE backend"; BRANCHD_BACKEND=fuse python -m pytest tests/daemon tests/patterns "$@"
