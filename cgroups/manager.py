"""The Manager: one cgroup subtree per daemon, candidates spawned into it, a thread that reaps them.

Tree (in the v2 tree and in each v1 hierarchy used):

    <this process's own cgroup>/<name>/<group>.<n>

One leaf per run, so a run's limits, statistics and kill are its own; a
group's runs (the daemon uses the branch id) are the runs with that group.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable

from .cgroup import Cgroup, write
from .errors import CgroupError, SpawnError
from .layout import V1_CONTROLLERS, Layout, detect
from .limits import Limits
from .run import KILL, SHUTDOWN, TIMEOUT, Run
from .spawn import Bind, Entries, User, namespaces, start

log = logging.getLogger(__name__)

_V2_LIMIT_CONTROLLERS = ("cpu", "io", "memory", "pids")
_V1_FOR_V2 = {"memory": "memory", "cpu": "cpu", "pids": "pids", "io": "blkio"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SUPERVISOR = "supervisor"  # leaf the daemon moves itself into (the v2 no-internal-process rule)

_names_lock = threading.Lock()
_names_in_use: set[str] = set()


class _Monitor:
    """A thread that reaps runs the moment their main process exits and enforces timeouts.

    Invariant: a run is watched from spawn until its `_finish` has run; runs
    finish even when nobody waits for them, so their cgroups go away promptly.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._poll = select.poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poll.register(self._wake_r, select.POLLIN)
        self._by_fd: dict[int, Run] = {}
        self._deadlines: list[tuple[float, int, Run]] = []
        self._kills: list[tuple[Run, str]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="cgroups-monitor", daemon=True)
        self._thread.start()

    def add(self, run: Run, timeout: float | None) -> None:
        fd = os.pidfd_open(run.pid)  # a zombie still has its pidfd: no race with a quick exit
        with self._lock:
            self._by_fd[fd] = run
            self._poll.register(fd, select.POLLIN)
            if timeout is not None:
                heapq.heappush(self._deadlines, (time.monotonic() + timeout, next(self._seq), run))
        self._wake()

    def kill_later(self, run: Run, reason: str) -> None:
        """Have the monitor thread kill `run` (kills that wait for the tree to be gone)."""
        with self._lock:
            self._kills.append((run, reason))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join()
        for fd in list(self._by_fd):
            os.close(fd)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                timeout_ms = None
                if self._deadlines:
                    timeout_ms = max(0, int((self._deadlines[0][0] - time.monotonic()) * 1000) + 1)
            for fd, _ in self._poll.poll(timeout_ms):
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    run = self._by_fd.pop(fd)
                    self._poll.unregister(fd)
                os.close(fd)
                self._guarded(run._finish, run)
            now = time.monotonic()
            due = []
            with self._lock:
                while self._deadlines and self._deadlines[0][0] <= now:
                    due.append(heapq.heappop(self._deadlines)[2])
                kills, self._kills = self._kills, []
            for run, reason in kills:
                self._guarded(functools.partial(run._stop, reason), run)
            for run in due:
                if run.poll() is None:
                    log.info(
                        "run %s: timeout of %gs reached, killing it", run.id, run.limits.timeout
                    )
                    self._guarded(functools.partial(run._stop, TIMEOUT), run)

    @staticmethod
    def _guarded(fn: Callable[[], object], run: Run) -> None:
        # the monitor must outlive any one run's failure, or every later run would hang
        try:
            fn()
        except Exception:
            log.exception("run %s: unexpected error in the monitor", run.id)


class Manager:
    """Owns one cgroup subtree (per layout) for one process (the daemon).

    Invariants: every cgroup it creates lies under `<own cgroup>/<name>` and is
    removed when its run ends or, at the latest, by `close()`; each limit that
    cannot be enforced here is warned about once (log and `warnings`); `name`
    is used by one Manager at a time in this process.
    """

    def __init__(self, name: str | None = None, layout: Layout | None = None, *,
                 fd_limit: int | None = None) -> None:
        self.name = name or "branchd"
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"invalid manager name {self.name!r}: use letters, digits, _ . -")
        with _names_lock:
            if self.name in _names_in_use:
                raise ValueError(f"a Manager named {self.name!r} already exists in this process")
            _names_in_use.add(self.name)
        self.layout = layout if layout is not None else detect()
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()
        self._ns: tuple[str | None, str] | None = None  # namespaces(), probed on first use
        self._entries = Entries(self._prepare_entry, self._release_entry)
        self._fd_limit = fd_limit  # the soft open-file limit runs get (None: ours)
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._leftovers: list[Cgroup] = []
        # names of the cgroups made under the base and not removed yet: those of
        # waiting entries (made before their run) and of live runs (fsck: strays)
        self._owned: set[str] = set()
        self._counter = itertools.count(1)
        self._closed = False
        try:
            self._base = self._make_base()
        except BaseException:
            with _names_lock:
                _names_in_use.discard(self.name)
            raise
        self._unsupported = (
            self._base.unsupported()
            if self._base is not None
            else {k: "no usable cgroup hierarchy" for k in ("memory", "cpus", "pids", "io_weight")}
        )
        if self._base is None or self._base.kill_method is None:
            self._warn(
                "kill",
                f"no race-free way to kill a run's whole tree ({self.layout.kind} cgroups: no "
                "cgroup.kill, no v1 freezer); a candidate's processes that leave its session "
                "survive a kill",
            )
        self._monitor = _Monitor()
        log.debug("cgroups manager %s on %s", self.name, self.layout)

    # -- setup -----------------------------------------------------------------

    def _warn(self, key: str, message: str) -> None:
        with self._warn_lock:
            if key in self._warned:
                return
            self._warned.add(key)
            self.warnings.append(message)
        log.warning("%s", message)

    def _make_base(self) -> Cgroup | None:
        """Create `<own>/<name>` in every hierarchy we use; a hierarchy we cannot use is warned
        about and left out (e.g. without root), so that candidates still run, unlimited."""
        layout = self.layout
        v2: str | None = None
        enabled: frozenset[str] = frozenset()
        if layout.v2_dir is not None:
            wanted = frozenset(_V2_LIMIT_CONTROLLERS) & layout.v2_controllers
            enabled = self._enable_own_v2(layout.v2_dir, wanted)
            node = None
            try:
                _remove_stale(os.path.join(layout.v2_dir, self.name))
                node = Cgroup.create(layout.v2_dir, {}, self.name, enabled)
                node.enable(enabled)
                v2 = node.v2
            except CgroupError as exc:
                self._warn("v2", f"cannot use the cgroup v2 tree: {exc}")
                enabled = frozenset()
                if node is not None:
                    node.remove()
        # v1 hierarchies only for what v2 does not do here
        needed = {_V1_FOR_V2[c] for c in _V1_FOR_V2 if c not in enabled}
        if v2 is None:
            needed.add("cpuacct")  # v2's cpu.stat counts CPU time without any controller
        if v2 is None or not os.path.exists(os.path.join(v2, "cgroup.kill")):
            needed.add("freezer")
        v1: dict[str, str] = {}
        failed: list[str] = []
        for c in V1_CONTROLLERS:
            parent = layout.v1_dir(c)
            if c not in needed or parent is None:
                continue
            path = os.path.join(parent, self.name)
            if path in v1.values():  # co-mounted with a controller done already
                v1[c] = path
                continue
            try:
                _remove_stale(path)
                Cgroup.create(None, {c: parent}, self.name, frozenset())
                v1[c] = path
            except CgroupError as exc:
                failed.append(f"{c} ({exc})" if not failed else c)
        if failed:
            self._warn("v1", f"cannot use the cgroup v1 hierarchies {', '.join(failed)}")
        if v2 is None and not v1:
            return None
        return Cgroup(v2, v1, enabled)

    def _enable_own_v2(self, own: str, wanted: frozenset[str]) -> frozenset[str]:
        """Enable `wanted` in our own cgroup's subtree_control; what could be enabled."""
        if not wanted:
            return wanted
        with open(os.path.join(own, "cgroup.subtree_control")) as f:
            if wanted <= set(f.read().split()):
                return wanted
        node = Cgroup(own, {}, frozenset())
        try:
            node.enable(wanted)
            return wanted
        except CgroupError as exc:
            first = exc
        # EBUSY: v2 lets a non-root cgroup with processes in it enable no
        # controllers for its children; move ourselves into a leaf (what
        # systemd's Delegate=yes expects of a service) and try again
        leaf = os.path.join(own, _SUPERVISOR)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf)
            write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            log.info("moved this process into %s to delegate controllers", leaf)
            node.enable(wanted)
            return wanted
        except (OSError, CgroupError) as exc:
            self._warn(
                "v2-delegation",
                f"cannot enable the v2 controllers {' '.join(sorted(wanted))} for our runs "
                f"({first}; {exc}): do other processes share our cgroup {own}?",
            )
            return frozenset()

    # -- API -------------------------------------------------------------------

    def unenforced(self, limits: Limits) -> list[str]:
        """Why each limit set in `limits` cannot be enforced here (empty when all can)."""
        return [
            self._unenforced(key) for key in self._unsupported if getattr(limits, key) is not None
        ]

    def _unenforced(self, key: str) -> str:
        return (
            f"{key} limit cannot be enforced ({self.layout.kind} cgroups): {self._unsupported[key]}"
        )

    @property
    def namespace(self) -> tuple[str | None, str]:
        """The private mount namespace runs get here ("mount" as root, "user" for an
        unprivileged process where user namespaces work, None) and why, in words."""
        if self._ns is None:
            self._ns = namespaces(self._entries)
        return self._ns

    @property
    def bind_unavailable(self) -> str | None:
        """None where spawn(bind=...) works, else why not."""
        mode, why = self.namespace
        return None if mode is not None else why

    def spawn(
        self,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str] | None = None,
        limits: Limits = Limits(),  # noqa: B008 (frozen, shared safely)
        group: str = "default",
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        bind: Bind | None = None,
        hide: list[str] | None = None,
        user: User | None = None,
    ) -> Run:
        """Start `argv` in a new cgroup with `limits`; its code runs only once placed.

        env None inherits this process's environment; a dict is the whole
        environment (the candidate's alone: nothing run before it sees it).
        bind runs it in a private mount namespace with ``bind.source`` bound
        over ``bind.target`` (in a user namespace, ``bind.overlay`` mounted there
        instead where the kernel takes it: else ``Run.overlay_refused`` says why);
        `hide` (with bind) covers each given directory there with an empty
        read-only tmpfs: the daemon passes its FUSE mountpoint and state
        directory, so that a candidate cannot reach its sibling branches
        through their real paths. `user` (a root manager
        only) runs it as that user, with no_new_privs and a nosuid bind.
        Raises SpawnError/CgroupError.
        """
        for key in self._unsupported:
            if getattr(limits, key) is not None:
                self._warn(key, self._unenforced(key))
        ns = None
        if bind is not None or hide:
            if why := self.bind_unavailable:
                raise SpawnError(f"cannot run {argv[0]!r} in a private mount namespace: {why}")
            ns = self.namespace[0]
        with self._lock:
            if self._closed:
                raise CgroupError(f"cgroups manager {self.name} is closed")
        entry = self._entries.take()
        node = entry.token  # the entry waits in a cgroup of its own already (_prepare_entry)
        assert node is None or isinstance(node, Cgroup)
        run_id = os.path.basename(node.dirs[0]) if node is not None else self._next_id()
        started = time.monotonic()
        try:
            if node is not None:
                node.apply(limits)
            proc, refused = start(
                entry, argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                ns=ns, bind=bind, hide=hide or [], user=user, fd_limit=self._fd_limit,
            )  # fmt: skip
        except BaseException:
            self._entries.end(entry)  # kills what is left of it and removes its cgroup
            raise
        finally:  # not before the hand-over: see Entries
            self._entries.replace()
        run = Run(
            run_id, group, limits, node, proc, started, self._run_done, self._monitor.kill_later
        )
        run.overlay_refused = refused
        with self._lock:
            closing = self._closed
            if not closing:
                self._runs[run_id] = run
                self._monitor.add(run, limits.timeout)
        if closing:
            # close() began while we started it: it will not see this run
            run._stop(SHUTDOWN)
            run._finish()
            raise CgroupError(f"cgroups manager {self.name} is closed")
        log.debug("run %s: pid %d started: %s", run_id, run.pid, argv)
        return run

    def _next_id(self) -> str:
        with self._lock:
            return f"run.{next(self._counter)}"

    def _prepare_entry(self, pid: int) -> Cgroup | None:
        """The cgroup of the run an entry process will start, with the entry in it already:
        a cgroup v2 migration costs milliseconds here, so it is done before the run is
        asked for (the cgroup's name is the run's id). None where no cgroup hierarchy is
        usable (warned about at start)."""
        if self._base is None:
            return None
        name = self._next_id()
        with self._lock:
            self._owned.add(name)  # before the mkdir: fsck never sees it as a stray
        try:
            node = Cgroup.create(self._base.v2, self._base.v1, name, self._base.v2_controllers)
        except BaseException:
            self._disown(name)
            raise
        try:
            node.place(pid)
        except CgroupError as exc:
            with contextlib.suppress(CgroupError):
                node.remove()
                self._disown(name)
            raise SpawnError(f"cannot place the run in its cgroup: {exc}") from None
        return node

    def _disown(self, name: str) -> None:
        with self._lock:
            self._owned.discard(name)

    def _release_entry(self, node: object) -> None:
        assert isinstance(node, Cgroup)
        node.remove()
        self._disown(os.path.basename(node.dirs[0]))

    def _run_done(self, run: Run, leftover: Cgroup | None) -> None:
        with self._lock:
            self._runs.pop(run.id, None)
            if leftover is not None:
                self._leftovers.append(leftover)
            elif run.cgroup is not None:
                self._owned.discard(os.path.basename(run.cgroup.dirs[0]))

    @property
    def base_dirs(self) -> list[str]:
        """The directories of this Manager's subtree (one per hierarchy used)."""
        return self._base.dirs if self._base is not None else []

    def strays(self) -> list[str]:
        """Cgroup directories under the base that no live run, waiting entry or known
        leftover owns: left by hand, or by a bug. Listed before the names in use are
        read, so a run's cgroup made meanwhile is never among them."""
        found = []
        for base in self.base_dirs:
            with contextlib.suppress(FileNotFoundError):
                found += [os.path.join(base, e.name) for e in os.scandir(base) if e.is_dir()]
        with self._lock:
            known = self._owned | {os.path.basename(c.dirs[0]) for c in self._leftovers}
        return sorted(p for p in found if os.path.basename(p) not in known)

    def leftovers(self) -> list[str]:
        """Cgroup directories of ended runs whose removal failed (retried by close)."""
        with self._lock:
            return [d for c in self._leftovers for d in c.dirs if os.path.isdir(d)]

    def remove_leftovers(self) -> list[str]:
        """Try again to remove the cgroups of ended runs: the directories removed."""
        with self._lock:
            todo, self._leftovers = self._leftovers, []
        done, kept = [], []
        for node in todo:
            try:
                node.remove()
                done += node.dirs
                self._disown(os.path.basename(node.dirs[0]))
            except CgroupError:
                kept.append(node)
        with self._lock:
            self._leftovers += kept
        return done

    def runs(self, group: str | None = None) -> list[Run]:
        """Runs that have not ended yet (of one group, or all)."""
        with self._lock:
            return [r for r in self._runs.values() if group is None or r.group == group]

    def kill_group(self, group: str, reason: str = KILL) -> int:
        """Kill every run of `group` (without waiting: see Run.kill), each result's
        ``ended_by`` being *reason*; how many processes."""
        return sum(r._request_stop(reason) for r in self.runs(group))

    def close(self) -> None:
        """Kill every run, wait for them to end, remove every cgroup this Manager made."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors = []
        try:
            for run in self.runs():
                try:
                    run._stop(SHUTDOWN)
                except CgroupError as exc:
                    errors.append(str(exc))
            for run in self.runs():
                if run.wait(10) is None:
                    errors.append(f"run {run.id} (pid {run.pid}) did not end")
            self._monitor.stop()
            self._entries.close()
            for node in [*self._leftovers, *([self._base] if self._base else [])]:
                try:
                    node.remove()
                except CgroupError as exc:
                    errors.append(str(exc))
        finally:
            with _names_lock:
                _names_in_use.discard(self.name)
        if errors:
            raise CgroupError(
                f"cgroups manager {self.name} closed with errors: {'; '.join(errors)}"
            )

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_stale(path: str) -> None:
    """Kill and remove a tree left by an earlier owner of the same name (a daemon that crashed)."""
    if not os.path.isdir(path):
        return
    log.warning("removing stale cgroup tree %s (left by an earlier process)", path)
    try:
        for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
            for _ in range(50):
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(dirpath)
    except OSError as exc:
        raise CgroupError(f"cannot remove stale cgroup tree {path}: {exc.strerror}") from None
