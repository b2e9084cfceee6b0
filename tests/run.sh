#!/usr/bin/env bash
# The whole test suite: lint, type check, then every tier of tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# What an ordinary user's Debian machine has, for the tests that run the daemon
# and its runs as uid 65534 and for the unprivileged pass: /dev/fuse at the mode
# the fuse3 package gives it (0666; this host has 0600), and an interpreter that
# user may run, with the project and what its daemon-level tests import installed
# in it (the suite's venv interpreter may sit under /root, 0700). The project goes
# in as a built package, not editable, so that where this checkout lives does not
# matter; reinstalled each run, so it is this tree.
if [ "$(id -u)" -eq 0 ]; then
    chmod 0666 /dev/fuse
    USER_VENV="${BRANCHD_USER_VENV:-/var/tmp/branchd-user-venv}"
    if [ ! -x "$USER_VENV/bin/python" ]; then
        echo "== building $USER_VENV for the unprivileged tests"
        /usr/bin/python3 -m venv "$USER_VENV"
    fi
    # setuptools >= 70 builds wheels itself (the tests' editable installs, offline)
    "$USER_VENV/bin/pip" install -q --disable-pip-version-check ".[test,mcp,langgraph]" \
        "setuptools>=70" 2>&1 \
        | grep -v "^WARNING: Location" || true
    "$USER_VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps . \
        2>&1 | grep -v "^WARNING: Location" || true
    chmod -R a+rX "$USER_VENV"
    export BRANCHD_USER_PYTHON="$USER_VENV/bin/python"
fi

echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
# The daemon-level suites once more on the FUSE backend: the run above served
# branches by kernel overlayfs where it could (auto, as root), and the same
# tests must hold for both backends (tests/daemon/test_backend.py checks that
# each branch really is served by the backend asked for).
echo "== pytest, FUSE backend"; BRANCHD_BACKEND=fuse python -m pytest tests/daemon tests/patterns "$@"
# And once more by an ordinary user (uid 65534, in cgroups delegated to it): every
# daemon is then an unprivileged one, as a user's notebook or `branchctl serve`
# starts it (tests/user_pass.sh says how; tests marked root(why) are skipped).
if [ "$(id -u)" -eq 0 ]; then
    echo "== pytest, unprivileged (uid 65534)"
    bash tests/user_pass.sh "$USER_VENV" tests/daemon tests/patterns "$@"
else
    echo "== pytest, unprivileged: this run was it (not root: no other user to become)"
fi
