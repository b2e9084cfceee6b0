"""Starting a candidate so that none of its code runs outside its cgroup, or as root.

The child is ``cgroups/entry.py`` run by this interpreter with ``-I -S``, an
empty environment and ``/`` as its directory (see that file for what it does
and in which order). It first blocks reading its spec from a pipe; the parent
places its pid in every cgroup.procs and only then writes the spec, so the
candidate never runs unlimited; a placement error kills the waiting child and
raises. Setup errors come back on a close-on-exec pipe (an empty read: the
exec happened). No preexec_fn (the daemon has threads): subprocess forks, sets
the new session and the file descriptors, and execs the entry.
"""

from __future__ import annotations

import logging
import marshal
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CgroupError, SpawnError

log = logging.getLogger(__name__)

ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "entry.py")
_CAP_SYS_ADMIN = 21


@dataclass(frozen=True)
class User:
    """Whom a root daemon runs a candidate as: the caller's uid, gid and groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class Bind:
    """Bind ``source`` over ``target`` in the run's private mount namespace.

    ``target_fd`` is a descriptor of the directory the caller means by
    ``target`` (the daemon's held workspace fd): the entry refuses to mount
    over whatever else the path may lead to by then."""

    source: str
    target: str
    target_fd: int | None = None


def namespaces() -> tuple[str | None, str]:
    """Which private mount namespace runs can get here, and why, in words.

    "mount" with CAP_SYS_ADMIN (root); "user" where this unprivileged process may
    make a user namespace (probed for real); None where neither works."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1:
                return "mount", "root: a private mount namespace per run"
    proc, err = _launch({"ns": "user", "probe": True}, None, None, None)
    why = _setup_error(proc, err)
    if why is None and proc.wait() == 0:
        return "user", "unprivileged: a user and mount namespace per run"
    return None, f"user namespaces are refused here ({why or 'the probe failed'})"


def _launch(spec: dict, stdin: int | None, stdout: int | None, stderr: int | None,
            extra_fds: tuple[int, ...] = (),
            place: Callable[[int], None] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start the entry, place it, hand it ``spec``; its process and the read end of its
    error pipe."""
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", ENTRY, str(spec_r), str(err_w)],
            cwd="/", env={}, stdin=stdin, stdout=stdout, stderr=stderr, close_fds=True,
            pass_fds=(spec_r, err_w, *extra_fds), start_new_session=True,
        )
    except OSError as exc:
        for fd in (spec_r, spec_w, err_r, err_w):
            os.close(fd)
        raise SpawnError(f"cannot start the run's entry process: {exc.strerror}") from None
    os.close(spec_r)
    os.close(err_w)
    try:
        if place is not None:
            place(proc.pid)
        data = marshal.dumps(spec)
        try:
            _write_all(spec_w, data)
        except BrokenPipeError:
            pass  # it died: its error pipe or status says why
    except BaseException:
        os.close(spec_w)  # an empty spec: the entry exits without running anything
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(err_r)
        raise
    os.close(spec_w)
    return proc, err_r


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _setup_error(proc: subprocess.Popen[bytes], err_r: int) -> SpawnError | None:
    """What the entry reported before its exec (None: it exec'ed the candidate)."""
    chunks = []
    try:
        while chunk := os.read(err_r, 4096):
            chunks.append(chunk)
    finally:
        os.close(err_r)
    if not chunks:
        return None
    proc.wait()
    code, _, message = b"".join(chunks).decode(errors="replace").partition(" ")
    return SpawnError(message, int(code) or None if code.isdigit() else None)


def start(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str] | None,
    stdin: int | None,
    stdout: int | None,
    stderr: int | None,
    ns: str | None,
    bind: Bind | None,
    hide: list[str],
    user: User | None,
    place: Callable[[int], None],
) -> subprocess.Popen[bytes]:
    """Start `argv` (placed by `place(pid)` before any of it runs). Raises SpawnError.

    The returned Popen is the caller's to reap; its pid is the candidate's pid
    (the entry execs it, it does not fork).
    """
    if not argv:
        raise SpawnError("empty command")
    if (bind is not None or hide) and ns is None:
        raise SpawnError("bind and hide need a private mount namespace")
    extra: tuple[int, ...] = ()
    target_fd = None
    if bind is not None:
        try:
            target_fd = (os.dup(bind.target_fd) if bind.target_fd is not None
                         else os.open(bind.target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as exc:
            raise SpawnError(f"cannot open {bind.target}: {exc.strerror}") from None
        extra = (target_fd,)
    other = user is not None and user.uid != os.geteuid()
    spec = {
        "argv": argv, "cwd": cwd, "env": dict(os.environ if env is None else env),
        "ns": ns or "none", "hide": hide,
        "bind": (bind.source, bind.target, target_fd) if bind is not None else None,
        "user": (user.uid, user.gid, list(user.groups)) if other and user else None,
        "nosuid": other, "no_new_privs": other,
    }
    try:
        proc, err_r = _launch(spec, stdin, stdout, stderr, extra, _placer(place))
    finally:
        if target_fd is not None:
            os.close(target_fd)
    failed = _setup_error(proc, err_r)
    if failed is not None:
        raise SpawnError(f"{argv[0]!r} did not start: {failed}", failed.errno)
    return proc


def _placer(place: Callable[[int], None]) -> Callable[[int], None]:
    def placed(pid: int) -> None:
        try:
            place(pid)
        except CgroupError as exc:
            raise SpawnError(f"cannot place the run in its cgroup: {exc}") from None
    return placed

