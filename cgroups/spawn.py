"""Starting a candidate so that none of its code runs outside its cgroup, or as root.

A run's first process is an entry (``cgroups/entry.py``: see that file for what
it does and in which order), cloned by the fork server, that file run once by
this interpreter with ``-I -S``, an empty environment and ``/`` as its
directory. The clone is our child (``CLONE_PARENT``): ``Child`` reaps it.
``Entries`` keeps a few made ahead, each blocked on its own socket and already in
a cgroup of its own: to start a run, one is taken, its pid is placed in every
cgroup.procs, and only then are the spec and the run's stdio sent to it; a
placement error kills the waiting entry and raises, so the candidate never runs
unlimited. Setup errors come back on the socket (end-of-file with nothing read:
the exec happened). No preexec_fn (the daemon has threads): subprocess forks,
sets the new session and the file descriptors, and execs the fork server.
"""

from __future__ import annotations

import logging
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CgroupError, SpawnError

log = logging.getLogger(__name__)

ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "entry.py")
_CAP_SYS_ADMIN = 21
# Where the entry puts a run's overlay layers (fd LAYER_FD + i): above every descriptor
# one message can bring (253), below the smallest usual open-file limit (1024).
LAYER_FD = 512
MAX_LAYERS = 249  # with stdin, stdout, stderr and the workspace: one message's 253


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
    overlay: Overlay | None = None


@dataclass(frozen=True)
class Overlay:
    """A kernel overlay to serve the branch at ``Bind.target`` instead of the bind, in
    a user namespace: ``options`` as ``mount -t overlay`` takes them, naming ``fds``
    (the caller's, upper dir first) as ``/proc/self/fd/N`` from ``LAYER_FD`` on. Where
    the kernel refuses it, the run gets the bind, and ``start`` says why."""

    options: str
    fds: tuple[int, ...]


class Child:
    """A child of ours that subprocess did not start (the fork server cloned it): the
    part of Popen a run uses, with Popen's return codes (minus the signal that
    ended it). Reaped once, under a lock: its pid is never signalled after that."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None and self.returncode is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout)
            finally:
                os.close(pidfd)
        with self._lock:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None:
                os.kill(self.pid, signal.SIGKILL)


class ForkServer:
    """The process that clones entries: started on first use, and again if it died.
    One request at a time (a clone takes a millisecond or two)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", ENTRY, str(theirs.fileno())],
                cwd="/", env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, close_fds=True, pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise SpawnError(f"cannot start the run's entry process: {exc.strerror}",
                             exc.errno) from None
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def clone(self, sock: socket.socket) -> Child:
        """A new entry waiting on ``sock`` (the other end is the caller's)."""
        with self._lock:
            for _ in range(2):  # a server that died (killed by hand, OOM) is started again
                server = self._sock if self._sock is not None else self._start()
                try:
                    socket.send_fds(server, [b"f"], [sock.fileno()])
                    reply = server.recv(8, socket.MSG_WAITALL)
                except OSError:
                    reply = b""
                if len(reply) == 8:
                    pid = int.from_bytes(reply, "little", signed=True)
                    if pid > 0:
                        return Child(pid)
                    if -pid == 95:
                        raise SpawnError(f"cannot start runs on a {os.uname().machine} "
                                         "machine: its clone(2) number is not known", 95)
                    raise SpawnError(f"cannot start the run's entry process: "
                                     f"{os.strerror(-pid)}", -pid)
                self._stop()
            raise SpawnError("the run starter's fork server ends as soon as it starts")

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # end-of-file: it exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()


@dataclass
class Entry:
    """An entry process waiting for its run, and what ``prepare`` made for it (its cgroup)."""

    proc: Child
    sock: socket.socket
    token: object = None


class Entries:
    """Entry processes started ahead, each waiting on its socket for one run.

    ``prepare(pid)`` (the Manager: a cgroup made for the entry, with the entry
    placed in it) runs for each entry before it waits in the pool, so that
    neither the clone nor the cgroup's making and migration (milliseconds on
    cgroup v2) is on a run's way; ``release(token)`` undoes it for an entry never
    used.
    Invariant: every entry in ``_idle`` is a prepared child of ours that has not
    been given a run; ``take`` hands one out (starting one if none waits), and
    ``replace``, called once that entry has its run, has the pool filled again
    to ``size`` in the background, one entry at a time, by one thread at most
    (``_filler``, which ``close`` waits for). Not from ``take``: that work beside
    the hand-over takes the CPU the run's own start needs. Entries, and the fork
    server, exit by themselves when their socket closes (a daemon that dies
    leaves none behind)."""

    def __init__(self, prepare: Callable[[int], object] | None = None,
                 release: Callable[[object], None] | None = None, size: int = 4) -> None:
        self.size = size
        self._prepare = prepare
        self._release = release
        self._lock = threading.Lock()
        self._idle: deque[Entry] = deque()
        self._filler: threading.Thread | None = None
        self._closed = False
        self._server = ForkServer()

    def _start(self) -> Entry:
        try:  # (out of descriptors: the filler thread logs it, the daemon goes on)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise SpawnError(f"cannot start the run's entry process: {exc.strerror}",
                             exc.errno) from None
        try:
            proc = self._server.clone(theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        entry = Entry(proc, ours)
        if self._prepare is not None:
            try:
                entry.token = self._prepare(proc.pid)
            except BaseException:
                self.end(entry)
                raise
        return entry

    def _fill(self) -> None:
        """``replace``'s thread: start entries one at a time until the pool is full."""
        try:
            while self._wanted():
                entry = self._start()
                with self._lock:
                    if not self._closed and len(self._idle) < self.size:
                        self._idle.append(entry)
                        continue
                self.end(entry)
        except CgroupError as exc:
            log.warning("could not start a run's entry ahead: %s", exc)

    def _wanted(self) -> bool:
        with self._lock:
            return not self._closed and len(self._idle) < self.size

    def take(self) -> Entry:
        with self._lock:
            if self._closed:
                raise SpawnError("the run starter is closed")
            entry = self._idle.popleft() if self._idle else None
        return entry if entry is not None else self._start()

    def replace(self) -> None:
        """Fill the pool again in the background, after ``take`` handed one out."""
        with self._lock:
            if self._closed or (self._filler is not None and self._filler.is_alive()):
                return
            self._filler = threading.Thread(target=self._fill, name="branchd-entries",
                                            daemon=True)
            self._filler.start()

    def end(self, entry: Entry) -> None:
        """End an entry that got no run (closing its socket makes it exit)."""
        entry.sock.close()
        try:
            entry.proc.wait(5)
        except subprocess.TimeoutExpired:
            entry.proc.kill()
            entry.proc.wait()
        if entry.token is not None and self._release is not None:
            self._release(entry.token)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            filler = self._filler
        if filler is not None:  # it ends the entry it may be starting (and its cgroup)
            filler.join()
        for entry in idle:
            self.end(entry)
        self._server.close()


def namespaces(entries: Entries) -> tuple[str | None, str]:
    """Which private mount namespace runs can get here, and why, in words.

    "mount" with CAP_SYS_ADMIN (root); "user" where this unprivileged process may
    make a user namespace (probed for real); None where neither works."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1:
                return "mount", "root: a private mount namespace per run"
    entry = entries.take()
    try:
        proc, _ = _hand_over(entry, {"ns": "user", "probe": True}, [0, 1, 2])
        if proc.wait() == 0:
            return "user", "unprivileged: a user and mount namespace per run"
        why = f"the probe exited with {proc.returncode}"
    except SpawnError as exc:
        why = str(exc)
    finally:
        if entry.token is not None and entries._release is not None:
            entries._release(entry.token)
        entries.replace()
    return None, f"user namespaces are refused here ({why})"


def _hand_over(entry: Entry, spec: dict, fds: list[int]
               ) -> tuple[Child, list[str]]:
    """Send an entry ``spec`` and ``fds``; its process once it exec'ed (or, for a probe,
    set up), and the notes it sent. Raises SpawnError with what the entry reported."""
    proc, sock = entry.proc, entry.sock
    with sock:
        try:
            data = marshal.dumps(spec)
            socket.send_fds(sock, [len(data).to_bytes(8, "little") + data[:65536]], fds)
            if len(data) > 65536:
                sock.sendall(data[65536:])
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        except OSError as exc:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SpawnError(f"cannot hand the run over: {exc.strerror}") from None
    notes = []
    while reply.startswith(b"~"):
        line, _, reply = reply.partition(b"\n")
        notes.append(line[1:].decode(errors="replace"))
    if not reply:
        return proc, notes
    proc.wait()
    code, _, message = reply.decode(errors="replace").partition(" ")
    raise SpawnError(message, int(code) or None if code.isdigit() else None)


def start(
    entry: Entry,
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
    fd_limit: int | None = None,
) -> tuple[Child, str | None]:
    """Hand `argv` to `entry` (already in the run's cgroup). Raises SpawnError.

    The returned Child is the caller's to reap; its pid is the candidate's pid
    (the entry execs it, it does not fork). stdio None: this process's own. With
    it, why the kernel refused ``bind.overlay`` (None: mounted, or none asked).
    """
    if not argv:
        raise SpawnError("empty command")
    if (bind is not None or hide) and ns is None:
        raise SpawnError("bind and hide need a private mount namespace")
    if bind is not None and bind.overlay is not None and (
            ns != "user" or len(bind.overlay.fds) > MAX_LAYERS):
        raise SpawnError(f"an overlay of {len(bind.overlay.fds)} layers in a {ns} namespace")
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        return _start(entry, argv, cwd, env, _stdio(stdin, stdout, stderr, null), ns, bind,
                      hide, user, fd_limit)
    finally:
        os.close(null)


def _stdio(stdin: int | None, stdout: int | None, stderr: int | None, null: int) -> list[int]:
    """The run's fds 0-2 as subprocess takes them: None (ours), an fd, DEVNULL, or for
    stderr STDOUT."""
    fds = [0 if stdin is None else stdin, 1 if stdout is None else stdout,
           2 if stderr is None else stderr]
    fds = [null if fd == subprocess.DEVNULL else fd for fd in fds]
    if fds[2] == subprocess.STDOUT:
        fds[2] = fds[1]
    if any(fd < 0 for fd in fds):
        raise SpawnError(f"unsupported stdio {fds}: pass descriptors, None or DEVNULL")
    return fds


def _start(entry: Entry, argv: list[str], cwd: str, env: dict[str, str] | None,
           fds: list[int], ns: str | None, bind: Bind | None, hide: list[str],
           user: User | None, fd_limit: int | None
           ) -> tuple[Child, str | None]:
    target_fd = None
    if bind is not None:
        try:
            target_fd = (os.dup(bind.target_fd) if bind.target_fd is not None
                         else os.open(bind.target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as exc:
            raise SpawnError(f"cannot open {bind.target}: {exc.strerror}", exc.errno) from None
        fds.append(target_fd)
    overlay = bind.overlay if bind is not None else None
    if overlay is not None:
        fds.extend(overlay.fds)
    other = user is not None and user.uid != os.geteuid()
    spec = {
        "argv": argv, "cwd": cwd, "env": dict(os.environ if env is None else env),
        "ns": ns or "none", "hide": hide,
        "bind": [bind.source, bind.target, None] if bind is not None else None,
        "user": (user.uid, user.gid, list(user.groups)) if other and user else None,
        "nosuid": other, "no_new_privs": other, "fd_limit": fd_limit,
    }
    if overlay is not None:
        spec.update(overlay=overlay.options, layers=len(overlay.fds), layer_fd=LAYER_FD)
    try:
        proc, notes = _hand_over(entry, spec, fds)
        return proc, notes[0] if notes else None
    except SpawnError as exc:
        raise SpawnError(f"{argv[0]!r} did not start: {exc}", exc.errno) from None
    finally:
        if target_fd is not None:
            os.close(target_fd)
