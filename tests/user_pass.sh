#!/usr/bin/env bash
# The daemon-level suites once more, run by an ordinary user, as on their own machine.
#   bash tests/user_pass.sh USER_VENV [PYTEST ARGS...]   # as root, from tests/run.sh
#
# pytest runs as uid 65534 (nobody: the uid the unprivileged tests and the benchmark
# already use; no account is made on the host, and it has no groups and no home, so
# what passes here passes for any user with more) with the interpreter of USER_VENV
# (the project and its test extras installed in it: tests/run.sh), from a copy of this
# checkout of its own (the checkout may sit under root's 0700 home), with its own HOME,
# TMPDIR and XDG_RUNTIME_DIR, inside cgroups of its own in every hierarchy, made here as
# systemd's user@.service (Delegate=yes) gives a logged-in user one
# (cgroups/delegated.py). Every daemon the fixtures start is then an unprivileged one:
# FUSE backend, runs in a user namespace (their own overlay), limits in those cgroups.
# BRANCHD_TEST_UNPRIVILEGED=1 has tests/daemon/test_backend.py check that it is so.
# Tests that need root are marked ``root(why)`` and skipped, saying why
# (tests/conftest.py). Whatever the tests leave (mounts, processes, cgroups, files)
# goes with the pass.
set -euo pipefail
cd "$(dirname "$0")/.."

USER_UID=65534
user_venv=$1
shift
top=$(mktemp -d /tmp/branchd-user.XXXXXX)  # short: unix socket paths below it
cgroups=()

cleanup() {
    if [ ${#cgroups[@]} -gt 0 ]; then  # kills what is left in them
        python -c 'import sys, cgroups.delegated as d; d.remove(sys.argv[1:])' "${cgroups[@]}"
    fi
    # mounts a killed run may have left (the suite's own guard fails the run for them)
    awk -v t="$top/" 'index($2, t) == 1 {print $2}' /proc/self/mounts | sort -r \
        | while read -r m; do umount -l "$m" 2>/dev/null || fusermount3 -u -z "$m" || true; done
    rm -rf --one-file-system "$top"
}
trap cleanup EXIT

# the checkout's files (tracked, and new ones not ignored), the user's own
mkdir "$top/src" "$top/home" "$top/tmp" "$top/run"
if git rev-parse --show-toplevel >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard
else
    find . \( -path ./.git -o -path ./.venv -o -name __pycache__ -o -name ".*_cache" \) -prune \
        -o -type f -print0
fi | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$top/src"
chown -R "$USER_UID:$USER_UID" "$top"
chmod 0755 "$top"
chmod 0700 "$top/home" "$top/tmp" "$top/run"

mapfile -t cgroups < <(python -c '
import sys, cgroups.delegated as d
print("\n".join(d.delegate(int(sys.argv[1]), sys.argv[2])))' "$USER_UID" "branchd-user-pass.$$")

(
    for d in "${cgroups[@]}"; do echo "$BASHPID" > "$d/cgroup.procs"; done
    cd "$top/src"
    exec env -i PATH="$user_venv/bin:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 \
        USER=nobody LOGNAME=nobody HOME="$top/home" TMPDIR="$top/tmp" \
        XDG_RUNTIME_DIR="$top/run" BRANCHD_USER_PYTHON="$user_venv/bin/python" \
        BRANCHD_TEST_UNPRIVILEGED=1 \
        /usr/bin/setpriv --reuid="$USER_UID" --regid="$USER_UID" --clear-groups \
        "$user_venv/bin/python" -m pytest "$@"
)
