"""Starting a candidate so that none of its code runs outside its cgroup.

The child is a tiny /bin/sh shim: it (optionally enters a private mount
namespace and binds the branch over the workspace path,) stops itself with
SIGSTOP, and once continued execs the candidate. While it is stopped the parent
writes its pid into every cgroup.procs, then sends SIGCONT; a placement error
kills the stopped shim and raises, so the candidate never runs unlimited. No
preexec_fn (the daemon has threads): subprocess forks, sets the new session and
the file descriptors, and execs the shim.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CgroupError, SpawnError

log = logging.getLogger(__name__)

_SHIM_NAME = "branchd-shim"  # $0 of the shim: names it in the shell's own error messages
_SHIM = 'kill -STOP $$ && exec "$@"'
# $1 mount, $2 source, $3 target, $4 cwd, $5 how many paths to hide, then
# those paths, then the command. cd after the bind, so that a cwd at (or under)
# the target is the bound branch and not the directory beneath it; hide after
# the bind, so that hiding the branch's own mount does not undo the bind.
_BIND_SHIM = """\
m=$1 src=$2 dst=$3 cwd=$4 n=$5
shift 5
"$m" --bind -- "$src" "$dst" || exit
while [ "$n" -gt 0 ]; do
  "$m" -t tmpfs -o ro,size=4k,mode=0555 branchd-hidden "$1" || exit
  shift
  n=$((n - 1))
done
cd -- "$cwd" && kill -STOP $$ && exec "$@"
"""
_CAP_SYS_ADMIN = 21


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the programs the shim needs (found once; the child's PATH may be empty)."""

    sh: str
    unshare: str | None
    mount: str | None

    @classmethod
    def find(cls) -> Tools:
        sh = shutil.which("sh") or "/bin/sh"
        return cls(sh, shutil.which("unshare"), shutil.which("mount"))


def can_bind(tools: Tools) -> str | None:
    """None if private mount namespaces with a bind are possible here, else why not."""
    if tools.unshare is None or tools.mount is None:
        return "util-linux unshare and mount are needed for private mount namespaces"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1:
                return None
    return "private mount namespaces need CAP_SYS_ADMIN (run the daemon as root)"


def shim_argv(
    argv: list[str], cwd: str, bind: tuple[str, str] | None, hide: list[str], tools: Tools
) -> list[str]:
    if bind is None:
        return [tools.sh, "-c", _SHIM, _SHIM_NAME, *argv]
    assert tools.unshare is not None and tools.mount is not None
    source, target = bind
    return [
        tools.unshare, "--mount", "--propagation", "slave", "--",
        tools.sh, "-c", _BIND_SHIM, _SHIM_NAME,
        tools.mount, source, target, cwd, str(len(hide)), *hide, *argv,
    ]  # fmt: skip


def start(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str] | None,
    stdin: int | None,
    stdout: int | None,
    stderr: int | None,
    bind: tuple[str, str] | None,
    hide: list[str],
    place: Callable[[int], None],
    tools: Tools,
) -> subprocess.Popen[bytes]:
    """Start `argv` stopped, call `place(pid)`, then let it exec. Raises SpawnError.

    The returned Popen is the caller's to reap; its pid is the candidate's pid
    (the shim and unshare exec, they do not fork).
    """
    if not argv:
        raise SpawnError("empty command")
    if hide and bind is None:
        raise SpawnError("hide needs bind (a private mount namespace)")
    try:
        proc = subprocess.Popen(
            shim_argv(argv, cwd, bind, hide, tools),
            cwd="/" if bind is not None else cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise SpawnError(f"cannot start {argv[0]!r} in {cwd}: {exc.strerror}") from None

    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        what = "binding the branch" if bind is not None else "starting"
        raise SpawnError(
            f"{what} failed before {argv[0]!r} ran (shim status {proc.returncode}; "
            "its message is in the run's stderr)"
        )
    try:
        place(proc.pid)
    except CgroupError as exc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise SpawnError(f"cannot place {argv[0]!r} in its cgroup: {exc}") from None
    os.kill(proc.pid, signal.SIGCONT)
    return proc
