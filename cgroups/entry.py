"""The first process of every run: enter its namespace, drop privileges, exec the candidate.

``spawn`` starts this file once, as ``python -I -S entry.py SOCK_FD``
with an empty environment, ``/`` as its directory and /dev/null as its stdio: a
fork server. For each socket it is sent it clones itself with ``CLONE_PARENT``,
so that the new entry is the daemon's child (the daemon reaps it and reads its
exit status, as it would a process it started), and answers the new pid; the
entry, Python and these imports long started, carries on below with that
socket. (A Python start with these imports costs 20-35 ms of CPU here, a clone
1-2 ms: 200 runs started at once no longer queue behind 200 interpreter
starts.) The server is single-threaded, so the raw clone copies no other
thread's half-held lock. It is stdlib only and imports nothing
of the project: it runs with the daemon's privileges, so nothing from the
request (PATH, LD_PRELOAD, PYTHON*, the cwd) may be looked up or loaded before
the drop, and ``-I -S`` keeps Python's own start-up away from the environment
and from user site directories.

An entry blocks reading its run from its socket (a unix socket): a length-prefixed
``marshal``-ed spec with the run's stdin, stdout, stderr and, for a bind, the
workspace's descriptor attached. The daemon sends it only once this process
sits in the run's cgroup, so nothing of the run happens unlimited. Then, in
order:

1. a private mount namespace (``ns`` "mount", as root) or a user namespace
   mapping our uid and gid to themselves plus a mount namespace ("user", an
   unprivileged daemon); every mount below ``/`` becomes a slave, so the
   daemon's later mounts and unmounts still reach us;
2. the bind: the branch (``source``, a path below the daemon's own mountpoint)
   is cloned with ``open_tree`` and attached with ``move_mount`` onto the
   workspace directory (``target``) opened *here*, after checking that it is
   the directory the daemon holds (the descriptor sent, same device and
   inode): a workspace path swapped for a symlink to ``/etc`` is refused,
   never mounted over. The bind is ``nosuid`` for another user's run. In a
   user namespace the daemon may send the branch's layers too (``overlay``:
   the mount options, naming them as ``/proc/self/fd/N`` from ``layer_fd``
   on): then a kernel overlay of the branch's delta is mounted on that same
   checked directory instead, and only where the kernel refuses it is the
   branch bound, with the reason sent back as a note;
3. every path of ``hide`` (the daemon's mountpoint and state directory) is
   covered with an empty read-only tmpfs: the other branches are out of reach;
4. supplementary groups, gid and uid are set to the caller's (a root daemon
   running another user's candidate), with ``no_new_privs``;
5. ``chdir(cwd)`` as that user, signals that Python ignores are reset, the
   soft open-file limit the daemon raised for itself is put back, and the
   candidate is exec'ed with its own environment (its PATH finds argv[0]).

Notes go back on the socket first, a line each, starting with ``~``. A failure
in 1-4 or the chdir goes back as "ERRNO message" and ends the process with
status 1; the socket is close-on-exec, so end-of-file
with nothing read means the exec happened. A failed exec itself is the
candidate's failure, as a shell reports it: a line on stderr and status 127
(not found) or 126.
"""

import ctypes
import marshal
import os
import resource
import signal
import socket
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_SLAVE = 0x4000, 0x80000
# the new mount API (Linux 5.2; mount_setattr 5.12): the same numbers on every architecture
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, 0o2000000
AT_EMPTY_PATH, AT_RECURSIVE = 0x1000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
MOUNT_ATTR_NOSUID = 0x2
PR_SET_NO_NEW_PRIVS = 38
CLONE_PARENT = 0x00008000
# clone(2)'s number, by machine: its other arguments are all 0 here (a fork's), so their
# order, which differs between these, does not matter
SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "loongarch64": 220,
             "ppc64le": 120, "ppc64": 120, "armv7l": 120, "i686": 120}
MAX_FDS = 253  # SCM_MAX_FD: the most one message carries



class SetupError(Exception):
    """A step before the exec failed: ``errno`` (0 if none) and a one-line message."""

    def __init__(self, message: str, errno: int | None = 0) -> None:
        super().__init__(message)
        self.errno = errno or 0


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}", err)
    return rc


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_namespace(ns: str) -> None:
    if ns == "user":
        uid, gid = os.geteuid(), os.getegid()
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(user, mount namespace)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    else:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "making / a slave mount")


def mount_overlay(dst: int, options: str, layer_fd: int, layers: int) -> str | None:
    """Mount the overlay of *options* on the directory *dst*; None, or why not.

    The layers arrive as the daemon's descriptors (at ``layer_fd`` on), which lie in
    the daemon's mount namespace: the kernel takes only layers of our own, so each
    is opened again by its path here and must be the same directory still."""
    for fd in range(layer_fd, layer_fd + layers):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            ours = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            return f"a layer cannot be opened here: {exc.strerror}"
        sent, now = os.fstat(fd), os.fstat(ours)
        os.dup2(ours, fd, inheritable=False)
        os.close(ours)
        if (sent.st_dev, sent.st_ino) != (now.st_dev, now.st_ino):
            return f"the layer {path} was moved or replaced"
    if _libc.mount(b"overlay", f"/proc/self/fd/{dst}".encode(), b"overlay", 0,
                   options.encode()) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def bind(source: str, target: str, target_fd: int, nosuid: bool,
         overlay: str | None = None, layer_fd: int = 0, layers: int = 0) -> str | None:
    """Serve the branch at *target*: its kernel *overlay* (mount options) where one is
    sent and the kernel takes it, else the bind of *source*. A note saying why the
    overlay was refused, or None."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        src = os.open(source, flags)
    except OSError as exc:
        raise SetupError(f"cannot open the branch at {source}: {exc.strerror}",
                         exc.errno) from None
    try:
        replaced = SetupError(f"the workspace directory {target} was moved or replaced since "
                              "it was registered", 116)  # ESTALE
        try:
            dst = os.open(target, flags | os.O_NOFOLLOW)
        except (NotADirectoryError, FileNotFoundError):
            raise replaced from None  # a symlink (ELOOP is ENOTDIR with O_DIRECTORY) or gone
        except OSError as exc:
            raise SetupError(f"cannot open the workspace {target}: {exc.strerror}",
                             exc.errno) from None
        try:
            held, now = os.fstat(target_fd), os.fstat(dst)
            if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
                raise replaced
            refused = None
            if overlay is not None:
                refused = mount_overlay(dst, overlay, layer_fd, layers)
                if refused is None:
                    return None
                refused = (f"the kernel refused an overlay on {target} ({refused}): "
                           "the run sees the branch through the FUSE mount")
            tree = _check(_libc.syscall(SYS_OPEN_TREE, src, b"",
                                        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH
                                        | AT_RECURSIVE), f"open_tree({source})")
            try:
                if nosuid:
                    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_NOSUID, 0, 0, 0)  # struct mount_attr
                    _check(_libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                                        attr, ctypes.sizeof(attr)), "mount_setattr(nosuid)")
                _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", dst, b"",
                                     MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
                       f"binding the branch over {target}")
            finally:
                os.close(tree)
            return refused
        finally:
            os.close(dst)
    finally:
        os.close(src)


def hide(path: str) -> None:
    _check(_libc.mount(b"branchd-hidden", os.fsencode(path), b"tmpfs",
                       MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=0555"),
           f"hiding {path}")


def drop(uid: int, gid: int, groups: list[int], no_new_privs: bool) -> None:
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise SetupError(f"cannot become uid {uid} gid {gid}: {exc.strerror}",
                         exc.errno) from None
    if no_new_privs:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")


def setup(spec: dict) -> list[str]:
    """Steps 1-5; the notes for the daemon."""
    notes = []
    if spec["ns"] != "none":
        enter_namespace(spec["ns"])
    if spec.get("bind"):
        source, target, target_fd = spec["bind"]
        note = bind(source, target, target_fd, spec["nosuid"], spec.get("overlay"),
                    spec.get("layer_fd", 0), spec.get("layers", 0))
        if note:
            notes.append(note)
        os.close(target_fd)
        for i in range(spec.get("layers", 0)):
            os.close(spec["layer_fd"] + i)
    for path in spec.get("hide", ()):
        hide(path)
    if spec.get("user"):
        uid, gid, groups = spec["user"]
        drop(uid, gid, groups, spec["no_new_privs"])
    if spec.get("probe"):
        return notes
    try:
        os.chdir(spec["cwd"])
    except OSError as exc:
        raise SetupError(f"cannot enter {spec['cwd']}: {exc.strerror}", exc.errno) from None
    return notes


def receive(sock: socket.socket) -> tuple[dict, list[int]] | None:
    """The run's spec and descriptors (stdin, stdout, stderr[, workspace[, layers]]); None
    when the daemon closed the socket instead (it stopped, or gave up on this run)."""
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, MAX_FDS)
    if len(data) < 8:
        return None
    size, data = int.from_bytes(data[:8], "little"), data[8:]
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return marshal.loads(data), fds


def serve_forks(server: socket.socket) -> int:
    """The fork server: for each message (one socket attached), a new entry on it, a
    child of our parent; the reply is its pid, or minus the errno. Ends at end-of-file
    (the daemon closed its end, or died)."""
    number = SYS_CLONE.get(os.uname().machine)
    while True:
        msg, fds, _, _ = socket.recv_fds(server, 1, 1)
        if not msg:
            return 0
        if not fds:
            continue
        if number is None:
            pid, err = -1, 95  # EOPNOTSUPP: the daemon says which machine
        else:
            pid = _libc.syscall(number, ctypes.c_ulong(CLONE_PARENT | signal.SIGCHLD), 0, 0, 0, 0)
            err = ctypes.get_errno()
        if pid == 0:
            server.close()
            os.setsid()
            return main(fds[0])
        os.close(fds[0])
        server.sendall((pid if pid > 0 else -err).to_bytes(8, "little", signed=True))


def main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    os.set_inheritable(sock.fileno(), False)  # closed by the exec: the daemon reads EOF
    got = receive(sock)
    if got is None:
        return 1
    spec, fds = got
    for target, fd in zip((0, 1, 2), fds, strict=False):
        os.dup2(fd, target)
        os.close(fd)
    if spec.get("bind"):
        spec["bind"][2] = fds[3]
    # the layers where the overlay's options name them (above every fd received)
    for i, fd in enumerate(fds[4:4 + spec.get("layers", 0)]):
        os.dup2(fd, spec["layer_fd"] + i, inheritable=False)
        os.close(fd)
    try:
        notes = setup(spec)
    except SetupError as exc:
        sock.sendall(f"{exc.errno} {exc}".encode())
        return 1
    for note in notes:  # one line each (a newline in a path would end it)
        sock.sendall(f"~{note}".replace("\n", "\\n").encode() + b"\n")
    if spec.get("probe"):
        return 0
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python; SIG_IGN survives exec
        signal.signal(sig, signal.SIG_DFL)
    if spec.get("fd_limit"):  # the soft open-file limit the daemon had before raising its own
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (spec["fd_limit"], resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return execvpe(spec["argv"], spec["env"])


def execvpe(argv: list, env: dict) -> int:
    """Exec argv[0], searched in the candidate's PATH as a shell would; a status on failure.
    (os.execvpe imports modules, which the dropped user may not be able to read.)"""
    name = argv[0]
    dirs = [""] if "/" in name else (env.get("PATH") or os.defpath).split(":")
    err: OSError = FileNotFoundError(2, os.strerror(2))
    for d in dirs:
        try:
            os.execve(os.path.join(d, name) if d else name, argv, env)
        except OSError as exc:
            if not isinstance(err, PermissionError):  # a shell reports EACCES over ENOENT
                err = exc
    os.write(2, f"branchd: {name}: {err.strerror}\n".encode())
    return 127 if isinstance(err, FileNotFoundError) else 126


if __name__ == "__main__":
    sys.exit(serve_forks(socket.socket(fileno=int(sys.argv[1]))))
