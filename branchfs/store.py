"""The Store: every workspace and branch under one state directory.

Layout of a state directory (docs/format.md has the details)::

    state.json              workspaces and branches: a snapshot (atomic_write)
    state.log.<n>           branch records changed since snapshot <n> (appended)
    branches/<id>/upper/    the branch's delta (overlayfs upper-dir conventions)
    branches/<id>/work/     empty; temp copies; overlayfs's workdir
    branches/<id>/origins   what the delta hides of its parent (``origins``)
    journal/commit-<id>.json  a commit's plan while it is being applied
    trash/                  deltas of ended branches, deleted in the background

State changes are written before the call returns; a commit goes through its
journal (plan, fsync, apply, state, remove journal) and ``Store()`` rolls a
complete journal forward and drops an incomplete one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import queue
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

from . import backing, commit, diff, merge, origins
from .commit import Step
from .durable import TMP_SUFFIX, atomic_write, fsync_path, read_log, syncfs
from .errors import (
    BadName,
    BaseReplaced,
    Busy,
    Conflict,
    Exists,
    HasChildren,
    NoSpace,
    NotFound,
    OutsideChange,
    Stale,
)
from .model import (
    ACTIVE,
    COMMITTED,
    DISCARDED,
    ENDED,
    INVALIDATED,
    Branch,
    Change,
    CommitResult,
    Workspace,
    check_name,
)
from .view import View

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "state.json"
# Records of ended branches kept for error messages ("was committed by ...") and
# `list --ended`; older ones are dropped so that state.json, which every change
# of the branch tree rewrites, stays small.
ENDED_KEPT = 256
# Between snapshots, changes of branch records are appended to state.log.<n>
# (n: the generation state.json names); past LOG_MAX lines a snapshot is taken.
LOG_PREFIX = "state.log."
LOG_MAX = 1000
# A commit of at most this many steps fsyncs each entry and directory it
# moves; a larger one calls syncfs once, which is cheaper than thousands of fsyncs.
FSYNC_EACH_MAX = 64
# an empty directory, the stand-in for a replaced workspace directory (Store.refresh)
EMPTY = "empty"
# journal/KEPT<name>: a journal that was not replayed, its directory being replaced
KEPT = "kept-"
# journal/MERGE<id>.json: results of three-way merges being written into a branch
MERGE = "merge-"
# what a sibling's commit does to a branch (Branch.on_sibling_commit)
REBASE, INVALIDATE = "rebase", "invalidate"
POLICIES = (REBASE, INVALIDATE)


P = ParamSpec("P")
T = TypeVar("T")


def _locked(fn: Callable[Concatenate[Store, P], T]) -> Callable[Concatenate[Store, P], T]:
    """A public method of the Store, with its lock held (see Store's docstring)."""
    @functools.wraps(fn)
    def locked(self: Store, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._lock:
            return fn(self, *args, **kwargs)
    return locked


@dataclass(frozen=True)
class Event:
    """A change of the branch tree, for subscribers (the FUSE adapter).

    kinds: ``workspace-added``, ``workspace-removed``, ``branch-created``,
    ``branch-ended`` (committed, discarded or invalidated; ``branch`` has the new
    status), ``branch-shared`` (a kernel overlay the daemon does not see into, a
    run's, writes the branch's upper dir from now on: see ``Store.shared``),
    ``rebased`` (``target``, the branch's own id, whose view changed at
    ``paths``: a sibling's commit merged in, a conflict resolved) and
    ``committed`` (``target`` is the id of the parent branch whose view changed
    at ``paths``, None when the changes went into the workspace directory)."""

    kind: str
    workspace: str
    branch: Branch | None = None
    target: str | None = None
    paths: tuple[str, ...] = ()


@dataclass
class _Rec:
    id: str
    name: str
    workspace: str
    parent_id: str | None
    status: str
    created: float
    note: str = ""  # why it ended (" by the commit of x"), for error messages
    # the workspace directory it forks (Workspace.ident when it was made; a child
    # has its parent's)
    base: str = ""
    on_sibling_commit: str = "rebase"  # REBASE or INVALIDATE (Branch.on_sibling_commit)
    owner: int | None = None  # uid (Branch.owner)
    conflicts: list[str] = dataclasses.field(default_factory=list)


class _Trash:
    """Deletes ended deltas in the background: one ``rm -rf`` child for all the
    names queued at the time, at the lowest CPU priority (a thread running
    shutil.rmtree would hold the GIL the FUSE handlers need); what it has not
    finished is found again in trash/ at the next open."""

    BATCH = 64  # names per rm

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._waiting: set[str] = set()  # names put and not yet through an rm

    def waiting(self) -> set[str]:
        """The names queued or being removed now (fsck: any other entry is stuck)."""
        with self._lock:
            return set(self._waiting)

    def put(self, name: str) -> None:
        with self._lock:
            self._waiting.add(name)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="branchfs-trash", daemon=True)
            self._thread.start()
        self._queue.put(name)

    def _run(self) -> None:
        done = False
        while not done:
            got = [self._queue.get()]
            while len(got) < self.BATCH and not self._queue.empty():
                got.append(self._queue.get())
            done = None in got
            names = [n for n in got if n is not None]
            if names:
                self._remove([os.path.join(self.path, n) for n in names])
                with self._lock:
                    self._waiting.difference_update(names)

    @staticmethod
    def _remove(paths: list[str]) -> None:
        # posix_spawn opens /dev/null in the child: no fd of this process (a
        # pipe, /dev/null) stays open while rm runs
        null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
        rm = ["rm", "-rf", "--", *paths]
        if os.geteuid() != 0:  # a run's overlay work dir: the kernel's, mode 0, not empty
            rm = ["sh", "-c", 'chmod -R u+rwx -- "$@"; exec rm -rf -- "$@"', "sh", *paths]
        try:
            pid = os.posix_spawnp("nice", ["nice", "-n", "19", *rm], os.environ,
                                  file_actions=null)
            status = os.waitpid(pid, 0)[1]
        except OSError as exc:
            log.warning("could not empty the trash (retried at the next open): %s", exc)
            return
        if status != 0:
            log.warning("could not empty the trash (retried at the next open): rm said %s",
                        os.waitstatus_to_exitcode(status))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class Store:
    """All workspaces and branches under one state directory.

    Invariants: at most one record per (workspace, branch name); an active
    branch's parent is active; every non-ended branch has its upper and work
    dirs open (fds) and every workspace its base dir; ``state.json`` and its log match
    the records whenever a public method returns.

    Threads: the thread that made the Store (the daemon's event loop, which also
    runs the FUSE handlers) may call every method; ``commit``, ``diff`` and
    ``finish_pending`` may also run on worker threads, one at a time per
    workspace (``daemon.lanes`` sees to it, and holds that workspace's FUSE
    requests during a commit). ``_lock`` guards the in-memory state (records,
    fds, views, the log): every public method holds it, and those three hold it
    only while they read or change that state, not while they walk or move a
    delta, so the loop waits for a commit at most that long (measured on a 2-core
    VM: a locked call costs about 0.6 us more than an unlocked one; during a
    10k-file commit on a worker, Store calls on the loop took 24 us median, 6 ms
    at most, GIL switches included). Off the loop, views
    are an operation's own (``_own_view``): the Store's views, with their caches
    and the process's inotify watcher, are only ever used on the loop thread.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, mountpoint: str | None = None) -> None:
        self.state_dir = os.path.realpath(state_dir)
        self.mountpoint = os.path.realpath(mountpoint) if mountpoint is not None else None
        self.recovered: list[str] = []
        self._lock = threading.RLock()
        self._owner = threading.get_ident()  # the event loop thread (see the class docstring)
        self._retired: list[View] = []  # views dropped off the loop, closed on it (_reap)
        self._listeners: list[Callable[[Event], None]] = []
        self._ws: dict[str, Workspace] = {}
        self._recs: dict[str, _Rec] = {}
        self._base_fds: dict[str, int] = {}  # workspace -> its directory, as it is now
        # identity -> a replaced workspace directory that live branches still fork
        self._old_bases: dict[str, int] = {}
        self._dir_fds: dict[str, tuple[int, int]] = {}  # id -> (upper fd, work fd)
        self._views: dict[str, View] = {}
        self._origins: dict[str, origins.Origins] = {}
        # workspace -> (journal, its path) of a commit that failed half way (finish_pending)
        self._pending: dict[str, tuple[dict[str, Any], str]] = {}
        self._log_gen = 0
        self._log_fd = -1
        self._log_lines = 0
        for sub in ("branches", "journal", "trash", EMPTY):
            os.makedirs(os.path.join(self.state_dir, sub), exist_ok=True)
        # what a branch of a replaced directory forks after a restart, when that
        # directory cannot be opened any more: nothing, so it shows its own changes
        self._empty_fd = os.open(self._path(EMPTY), backing.DIR_FLAGS)
        # the root of a kernel mount serving a branch, if any (the daemon's overlays
        # say): merges into a branch are written through it, for the kernel's view
        self.served: Callable[[str], int | None] = lambda bid: None
        # whether a kernel overlay mounted where the daemon cannot reach it (a run's, in
        # its own namespace) writes the branch's upper dir now (the daemon's runs say):
        # the branch's FUSE view then lets the kernel cache nothing of it
        self.shared: Callable[[str], bool] = lambda bid: False
        self._trash = _Trash(os.path.join(self.state_dir, "trash"))
        self._load()
        self._check_deltas()
        self._open_fds()
        self._recover()
        self._sweep()
        self._save()  # fold the log into a snapshot: a log only holds one open's changes

    # -- persistence --------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return os.path.join(self.state_dir, *parts)

    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(STATE_FILE + TMP_SUFFIX))
        try:
            with open(self._path(STATE_FILE), "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            data = None
        if data is not None:
            self._set_state(data)
            self._log_gen = data.get("log", 0)
            self._replay(self._log_path())
        for name in os.listdir(self.state_dir):  # logs a compaction superseded
            if name.startswith(LOG_PREFIX) and self._path(name) != self._log_path():
                os.unlink(self._path(name))
        self._open_log()

    def _log_path(self) -> str:
        return self._path(f"{LOG_PREFIX}{self._log_gen}")

    @_locked
    def log_path(self) -> str:
        """The state log appended to now (fsck reads it back)."""
        return self._log_path()

    def _replay(self, path: str) -> None:
        """Apply the log's records over the snapshot (``durable.read_log``: a torn
        last line is ignored; the log is folded into a new snapshot at open, so
        nothing is appended after it)."""
        try:
            items, torn = read_log(path)
        except FileNotFoundError:
            return
        if torn:
            log.warning("%s: ignored a torn last record", path)
        for item in items:
            if "set" in item:
                self._recs[item["set"]["id"]] = _Rec(**item["set"])
            else:
                self._recs.pop(item["drop"], None)

    def _open_log(self) -> None:
        self._log_fd = os.open(self._log_path(),
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._log_lines = 0

    def _log(self, changed: list[_Rec], dropped: tuple[str, ...] = ()) -> None:
        """Change some branch records: durably first, by appending them to the log
        (one write, one fdatasync) instead of rewriting state.json, then in memory.
        A write that fails changes neither (the one way records change)."""
        items = [{"drop": bid} for bid in dropped] + [{"set": vars(r)} for r in changed]
        end = os.lseek(self._log_fd, 0, os.SEEK_END)
        try:
            data = b"".join(_dumps(i) + b"\n" for i in items)
            if os.write(self._log_fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write to the state log")
            os.fdatasync(self._log_fd)
        except OSError:
            # nothing of a change that failed stays in the log (a torn line would be
            # in the middle of it after the next append): the caller has changed nothing
            with contextlib.suppress(OSError):
                os.ftruncate(self._log_fd, end)
            raise
        for bid in dropped:
            self._recs.pop(bid, None)
        for r in changed:
            self._recs[r.id] = r
        self._log_lines += len(items)
        if self._log_lines > LOG_MAX:
            self._save()

    def _set_state(self, data: dict[str, Any]) -> None:
        if data.get("version") != STATE_VERSION:
            raise BadName(f"state file version {data.get('version')} is not {STATE_VERSION}")
        self._ws = {w["name"]: Workspace(**w) for w in data["workspaces"]}
        self._recs = {}
        for b in data["branches"]:
            self._recs[b["id"]] = _Rec(**b)

    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "log": self._log_gen,
            "workspaces": [w.to_dict() for w in self._ws.values()],
            "branches": [vars(r).copy() for r in self._recs.values()],
        }

    def _save(self) -> None:
        """Write the whole state as a new snapshot that starts a new, empty log
        (the old log is removed after the snapshot that supersedes it is durable)."""
        self._prune()
        old = self._log_path()
        self._log_gen += 1
        atomic_write(self._path(STATE_FILE), _dumps(self._state()))
        os.close(self._log_fd)
        os.unlink(old)
        self._open_log()

    def _prune(self) -> None:
        """Forget all but the ENDED_KEPT newest ended records (dicts keep creation order)."""
        ended = [r.id for r in self._recs.values() if r.status in ENDED]
        for bid in ended[:max(0, len(ended) - ENDED_KEPT)]:
            del self._recs[bid]

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """Call *callback* after every change of the branch tree."""
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[Event], None]) -> None:
        self._listeners.remove(callback)

    @_locked
    def share(self, bid: str) -> None:
        """Tell subscribers that ``shared(bid)`` became true (they drop what they cached)."""
        b = self.branch_by_id(bid)
        if b is not None:
            self._emit(Event("branch-shared", b.workspace, b))

    def _emit(self, event: Event) -> None:
        for cb in self._listeners:
            try:
                cb(event)
            except Exception:
                log.exception("store subscriber failed on %s", event.kind)

    # -- fds and views ------------------------------------------------------

    def _open_fds(self) -> None:
        for w in list(self._ws.values()):
            if w.name not in self._base_fds:
                try:
                    fd = self._base_fds[w.name] = os.open(w.base, backing.DIR_FLAGS)
                except OSError as exc:
                    log.warning("workspace %s: cannot open %s: %s", w.name, w.base, exc)
                    continue
                self._identify(w, fd)
        for r in self._recs.values():
            if r.status not in ENDED and r.id not in self._dir_fds:
                root = self._path("branches", r.id)
                self._dir_fds[r.id] = (os.open(os.path.join(root, "upper"), backing.DIR_FLAGS),
                                       os.open(os.path.join(root, "work"), backing.DIR_FLAGS))

    def _close_branch_fds(self, bid: str) -> None:
        self._retire(bid)
        o = self._origins.pop(bid, None)
        if o is not None:
            o.close()
        fds = self._dir_fds.pop(bid, None)
        if fds is not None:
            for fd in fds:
                os.close(fd)

    def _base_fd(self, ws: str) -> int:
        try:
            return self._base_fds[ws]
        except KeyError:
            raise NotFound(f"workspace {ws} has no directory {self._ws[ws].base}") from None

    @_locked
    def base_fd(self, ws: str) -> int:
        """The held descriptor of the workspace's directory (the store's own: do not close)."""
        self.workspace(ws)
        return self._base_fd(ws)

    @_locked
    def view_by_id(self, bid: str) -> View:
        """The merged view of a branch that has not ended: the event loop thread's
        (off it, an operation makes its own: ``_own_view``)."""
        self._reap()
        v = self._views.get(bid)
        if v is None:
            v = self._views[bid] = View(self._layers(bid), work=self._dir_fds[bid][1],
                                        origins=self._origins_of(bid))
        return v

    def reload_origins(self, bid: str) -> None:
        """Read a branch's origins log again: a FUSE server process appended to it."""
        o = self._origins.pop(bid, None)
        if o is None:
            return
        o.close()
        v = self._views.get(bid)
        if v is not None:
            v.origins = self._origins_of(bid)

    def _layers(self, bid: str) -> list[int]:
        """The layers of branch *bid*'s view, top first: its upper dir, its
        ancestors', the directory it forks."""
        layers: list[int] = []
        r: _Rec | None = self._recs[bid]
        while r is not None:
            layers.append(self._dir_fds[r.id][0])
            r = self._recs[r.parent_id] if r.parent_id else None
        layers.append(self._base_fd_of(self._recs[bid]))
        return layers

    def _retire(self, bid: str) -> None:
        """Drop the Store's view of *bid*; it is closed (its cached directory fds,
        its inotify watches) on the event loop thread, whose it is (``_reap``)."""
        v = self._views.pop(bid, None)
        if v is None:
            return
        if threading.get_ident() == self._owner:
            v.close()
        else:
            self._retired.append(v)

    def _reap(self) -> None:
        if self._retired and threading.get_ident() == self._owner:
            retired, self._retired = self._retired, []
            for v in retired:
                v.close()

    def _origins_of(self, bid: str) -> origins.Origins:
        o = self._origins.get(bid)
        if o is None:
            o = self._origins[bid] = origins.Origins(self._path("branches", bid, origins.FILE))
        return o

    def _base_view(self, ws: str) -> View:
        return View([self._base_fd(ws)])

    def _replaced(self, r: _Rec) -> bool:
        """Whether *r* forks a directory that is no longer at its workspace's path."""
        w = self._ws[r.workspace]
        return r.base != w.ident

    def _base_fd_of(self, r: _Rec) -> int:
        """The directory *r* forks: the workspace's, or the replaced one it was made
        from (held since), or after a restart an empty stand-in."""
        if not self._replaced(r) and r.workspace in self._base_fds:
            return self._base_fds[r.workspace]
        return self._old_bases.get(r.base, self._empty_fd)

    def _identify(self, w: Workspace, fd: int) -> None:
        """Record which directory *fd*, just opened at *w*'s path, is; a new one
        there (replaced while the daemon was stopped) is said in the log."""
        ident = backing.identity(fd)
        if not w.ident:  # state from before identities: its records fork this one
            for r in self._recs.values():
                if r.workspace == w.name:
                    r.base = ident
        elif w.ident != ident:
            msg = (f"workspace {w.name}: {w.base} is not the directory it was (removed and "
                   "made again?): new branches fork the new one; older branches show only "
                   "their own changes and cannot be committed")
            log.warning("%s", msg)
            self.recovered.append(msg)  # told at start-up and by status, as recoveries are
        self._ws[w.name] = dataclasses.replace(w, ident=ident)

    @_locked
    def refresh(self, name: str) -> Workspace:
        """The workspace *name*, after a look at its path: a directory removed and
        made again there (``rm -rf proj; git clone ... proj``) is a new one. New
        branches fork the new one; branches of the old one keep forking it (its
        descriptor is held while they live), report ``base_replaced`` and cannot
        be committed into the new one. A path that is gone or no directory: new
        branches are refused until a directory is there again."""
        w = self.workspace(name)
        try:
            fd = os.open(w.base, backing.DIR_FLAGS)
        except OSError:
            fd = -1
        if fd >= 0 and name in self._base_fds and backing.identity(fd) == w.ident:
            os.close(fd)
            return w
        old = self._base_fds.pop(name, None)
        if old is not None:
            self._old_bases[w.ident] = old
        if fd >= 0:
            self._base_fds[name] = fd
            self._identify(w, fd)
            self._save()
        self._drop_unused_bases()
        return self._ws[name]

    def _drop_unused_bases(self) -> None:
        """Close the replaced directories that no live branch forks any more."""
        used = {r.base for r in self._recs.values() if r.status not in ENDED}
        for ident in [i for i in self._old_bases if i not in used]:
            os.close(self._old_bases.pop(ident))

    @_locked
    def status(self, bid: str) -> str | None:
        """The status of the branch with id *bid* (None if unknown): cheap, for
        the FUSE adapter's check on every request."""
        r = self._recs.get(bid)
        return r.status if r is not None else None

    @_locked
    def branch_by_id(self, bid: str) -> Branch | None:
        r = self._recs.get(bid)
        return self._branch(r) if r is not None else None

    # -- recovery -----------------------------------------------------------

    def _recover(self) -> None:
        jdir = self._path("journal")
        for name in sorted(os.listdir(jdir)):
            path = os.path.join(jdir, name)
            if name.startswith(KEPT):
                continue
            if name.endswith(TMP_SUFFIX):
                os.unlink(path)
                msg = f"dropped the incomplete journal {name}: that commit never started"
                log.warning("%s", msg)
                self.recovered.append(msg)
                continue
            with open(path, "rb") as f:
                journal = json.load(f)
            if name.startswith(MERGE):
                self._apply_merge(journal, path)
                msg = (f"completed the interrupted merge into branch {journal['name']} in "
                       f"workspace {journal['workspace']}")
                log.warning("%s", msg)
                self.recovered.append(msg)
                continue
            done = self._recs.get(journal["branch"])
            if done is None or done.status == COMMITTED:
                os.unlink(path)  # applied; only its removal was not durable yet
                msg = (f"removed the journal of the completed commit of branch "
                       f"{journal['name']} in workspace {journal['workspace']}")
            else:
                try:
                    self._apply_journal(journal, path)
                    msg = (f"completed the interrupted commit of branch {journal['name']} "
                           f"in workspace {journal['workspace']}")
                except OSError as exc:  # still no space, say: finished at a later request
                    self._pending[journal["workspace"]] = (journal, path)
                    msg = (f"could not yet complete the interrupted commit of branch "
                           f"{journal['name']} in workspace {journal['workspace']}: {exc}")
                except BaseReplaced as exc:
                    msg = self._keep(journal, path, exc)
            log.warning("%s", msg)
            self.recovered.append(msg)
        fsync_path(jdir)

    def _check_deltas(self) -> None:
        """A live branch whose delta directory is gone (removed by hand, a state
        directory restored from an older backup) cannot be served: it, and the
        branches that fork it, end as discarded, with the reason, and the daemon
        starts; what they held is lost already."""
        lost: dict[str, _Rec] = {}
        for r in self._recs.values():
            root = self._path("branches", r.id)
            if r.status not in ENDED and not all(
                    os.path.isdir(os.path.join(root, d)) for d in ("upper", "work")):
                lost.update((x.id, x) for x in [r, *self._descendants(r)]
                            if x.status not in ENDED)
        if not lost:
            return
        note = " at start-up: the delta directory it needs was missing"
        self._log([dataclasses.replace(r, status=DISCARDED, note=note) for r in lost.values()])
        for r in lost.values():
            msg = f"branch {r.name} of workspace {r.workspace} was discarded{note}"
            log.warning("%s", msg)
            self.recovered.append(msg)

    def _sweep(self) -> None:
        """Empty the trash and the work dirs; trash deltas no live record owns."""
        tdir = self._path("trash")
        for name in os.listdir(tdir):
            self._trash.put(name)
        for bid in os.listdir(self._path("branches")):
            r = self._recs.get(bid)
            if r is None or r.status in ENDED:
                self._to_trash(bid)
        for _, work in self._dir_fds.values():
            for name in os.listdir(work):
                backing.remove_at(work, name)

    @_locked
    def trash_orphan(self, bid: str) -> bool:
        """Move ``branches/<bid>``, a delta no live record owns, to the trash (as the
        next start would); False for a live branch's, which is never touched."""
        r = self._recs.get(bid)
        if (r is not None and r.status not in ENDED) or bid in self._dir_fds:
            return False
        self._to_trash(bid)
        return True

    def trash_waiting(self) -> set[str]:
        """The entries of trash/ being deleted now; any other one is stuck."""
        return self._trash.waiting()

    @_locked
    def empty_trash(self) -> list[str]:
        """Queue again the entries of trash/ that nothing is deleting: the names."""
        waiting = self._trash.waiting()
        names = [n for n in os.listdir(self._path("trash")) if n not in waiting]
        for name in names:
            self._trash.put(name)
        return names

    @_locked
    def has_directory(self, workspace: str) -> bool:
        """Whether the workspace's directory is open (``refresh`` first): False when
        its path is gone or is no directory."""
        self.workspace(workspace)
        return workspace in self._base_fds

    def _to_trash(self, bid: str) -> None:
        src = self._path("branches", bid)
        if not os.path.lexists(src):
            return
        name = f"{bid}.{secrets.token_hex(4)}"
        os.rename(src, self._path("trash", name))
        self._trash.put(name)

    # -- workspaces ---------------------------------------------------------

    @_locked
    def add_workspace(self, base: str, name: str | None = None,
                      owner: int | None = None) -> Workspace:
        real = self._resolve_base(base)
        for w in self._ws.values():
            if w.base == real:
                if name is not None and name != w.name:
                    raise Exists(f"{real} is already workspace {w.name}")
                return self.refresh(w.name)
        self._refuse_nested(real)
        if name is None:
            stem = os.path.basename(real) or "root"
            name, n = stem, 1
            while name in self._ws:
                n += 1
                name = f"{stem}-{n}"
        check_name(name, "workspace")
        if name in self._ws:
            raise Exists(f"workspace {name} already exists for {self._ws[name].base}")
        fd = os.open(real, backing.DIR_FLAGS)
        st = os.fstat(fd)
        ws = Workspace(name=name, base=real, owner=st.st_uid if owner is None else owner,
                       created=time.time(), ident=backing.identity(fd))
        self._base_fds[name] = fd
        self._ws[name] = ws
        self._save()
        self._emit(Event("workspace-added", name))
        return ws

    @_locked
    def remove_workspace(self, name: str, *, force: bool = False) -> list[Branch]:
        """Forget workspace *name*; its directory is not touched. Refused while it
        has live branches, unless *force*: then they are discarded first (returned)."""
        self.workspace(name)
        self._settled(name)
        mine = [r for r in self._recs.values() if r.workspace == name]
        live = [r for r in mine if r.status not in ENDED]
        if live and not force:
            raise HasChildren(f"workspace {name} has live branches "
                              f"({', '.join(sorted(r.name for r in live))}); discard them "
                              "first, or remove it with --force")
        gone: list[Branch] = []
        for r in live:
            if r.parent_id is None:  # with its descendants
                gone.extend(self.discard(name, r.name))
        try:
            self._log([], tuple(r.id for r in mine))
        except OSError as exc:
            _raise_os(exc, f"removing workspace {name}")
        fd = self._base_fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        self._drop_unused_bases()
        del self._ws[name]
        self._save()
        self._emit(Event("workspace-removed", name))
        return gone

    def _refuse_nested(self, real: str) -> None:
        """A workspace inside another, or around one, would let one file be reached
        (and committed) through two workspaces' branches that know nothing of each
        other: refused, naming the registered directory to use instead."""
        for w in self._ws.values():
            if _within(real, w.base):
                raise BadName(f"{real} is inside the registered workspace {w.base}: "
                              f"use that one (-w {w.base})")
            if _within(w.base, real):
                raise BadName(f"{real} contains the registered workspace {w.base}: "
                              f"use that one, or remove it first (workspace remove {w.base})")

    def _resolve_base(self, base: str) -> str:
        cur = self.resolve_path(base)
        if not os.path.isdir(cur):
            raise NotFound(f"workspace path {base} is not a directory")
        for own in (self.state_dir, self.mountpoint):
            if own is not None and _within(own, cur):
                raise BadName(f"workspace {base} contains the branch store's directory {own}")
        return cur

    def resolve_path(self, base: str) -> str:
        """os.path.realpath(*base*) that must exist, refusing (before touching
        it) anything inside the mountpoint or the state dir: a stat of our own
        mount from the thread that serves it would deadlock. Daemon code should
        resolve user-given paths with this, never with os.path.realpath."""
        path = os.path.join(os.getcwd(), base)  # not abspath: ".." must follow symlinks
        parts = [p for p in path.split("/") if p]
        cur = "/"
        hops = 0
        while parts:
            comp = parts.pop(0)
            if comp == ".":
                continue
            cur = os.path.dirname(cur) if comp == ".." else os.path.join(cur, comp)
            self._check_outside(cur, base)
            try:
                st = os.lstat(cur)
            except OSError:
                raise NotFound(f"{base} does not exist") from None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    raise BadName(f"{base} has too many levels of symlinks")
                target = os.readlink(cur)
                cur = "/" if target.startswith("/") else os.path.dirname(cur)
                parts = [p for p in target.split("/") if p] + parts
        return cur

    def _check_outside(self, path: str, given: str) -> None:
        for own, what in ((self.state_dir, "state directory"), (self.mountpoint, "mountpoint")):
            if own is not None and _within(path, own):
                raise BadName(f"{given} is inside the branch store's {what} {own}")

    @_locked
    def workspaces(self) -> list[Workspace]:
        return list(self._ws.values())

    @_locked
    def workspace(self, name: str) -> Workspace:
        try:
            return self._ws[name]
        except KeyError:
            raise NotFound(f"no workspace named {name}") from None

    # -- branches -----------------------------------------------------------

    def _branch(self, r: _Rec) -> Branch:
        parent = self._recs[r.parent_id].name if r.parent_id else None
        return Branch(name=r.name, workspace=r.workspace, parent=parent, status=r.status,
                      created=r.created, id=r.id, base_replaced=self._replaced(r),
                      on_sibling_commit=r.on_sibling_commit, conflicts=tuple(r.conflicts),
                      owner=r.owner)

    def _find(self, ws: str, name: str) -> _Rec | None:
        for r in self._recs.values():
            if r.workspace == ws and r.name == name:
                return r
        return None

    def _get(self, ws: str, name: str) -> _Rec:
        """The branch record, which must not have ended."""
        self.workspace(ws)
        r = self._find(ws, name)
        if r is None:
            raise NotFound(f"no branch named {name} in workspace {ws}")
        if r.status in ENDED:
            raise NotFound(f"branch {name} in workspace {ws} was {r.status}{r.note}")
        return r

    def _children(self, r: _Rec) -> list[_Rec]:
        return [c for c in self._recs.values() if c.parent_id == r.id]

    def _descendants(self, r: _Rec) -> list[_Rec]:
        out: list[_Rec] = []
        todo = [r]
        while todo:
            for c in self._children(todo.pop()):
                out.append(c)
                todo.append(c)
        return out

    @_locked
    def create_branch(self, workspace: str, name: str, parent: str | None = None, *,
                      on_sibling_commit: str = REBASE, owner: int | None = None) -> Branch:
        self.refresh(workspace)
        self._settled(workspace)
        check_name(name, "branch")
        if on_sibling_commit not in POLICIES:
            raise BadName(f"on_sibling_commit must be one of {', '.join(POLICIES)}, "
                          f"not {on_sibling_commit!r}")
        old = self._find(workspace, name)
        if old is not None and old.status not in ENDED:
            raise Exists(f"branch {name} already exists in workspace {workspace}"
                         + ("" if old.status == ACTIVE else f" ({old.status}{old.note})"))
        parent_rec = None
        if parent is not None:
            parent_rec = self._get(workspace, parent)
            if parent_rec.status != ACTIVE:
                raise Stale(f"parent branch {parent} was {parent_rec.status}{parent_rec.note}")
        if old is not None and any(c.status not in ENDED for c in self._descendants(old)):
            raise Exists(f"ended branch {name} still has live children")
        dropped = (old.id,) if old is not None else ()
        below = (self.view_by_id(parent_rec.id) if parent_rec is not None
                 else self._base_view(workspace))  # NotFound when its directory is gone
        root_st = below.lookup(())
        assert root_st is not None
        bid = secrets.token_hex(8)
        root = self._path("branches", bid)
        os.mkdir(root, 0o700)
        try:
            os.mkdir(os.path.join(root, "work"), 0o700)
            os.mkdir(os.path.join(root, "upper"), 0o700)
            origins.Origins.create(os.path.join(root, origins.FILE))
            rfd = os.open(root, backing.DIR_FLAGS)
            try:
                backing.copy_meta(root_st.st, rfd, "upper", backing.at(below.layers[0], "."))
            finally:
                os.close(rfd)
        except BaseException as exc:
            # a branch never made leaves no delta behind (a full disk: ENOSPC here)
            shutil.rmtree(root, ignore_errors=True)
            if isinstance(exc, OSError):
                _raise_os(exc, f"creating branch {name}")
            raise
        w = self._ws[workspace]
        rec = _Rec(id=bid, name=name, workspace=workspace,
                   parent_id=parent_rec.id if parent_rec else None, status=ACTIVE,
                   created=time.time(),
                   base=parent_rec.base if parent_rec else w.ident,
                   on_sibling_commit=on_sibling_commit, owner=owner)
        try:
            self._log([rec], dropped)
        except OSError as exc:
            self._to_trash(bid)
            _raise_os(exc, f"creating branch {name}")
        self._open_fds()
        b = self._branch(rec)
        self._emit(Event("branch-created", workspace, b))
        return b

    @_locked
    def branch(self, workspace: str, name: str) -> Branch:
        self.workspace(workspace)
        r = self._find(workspace, name)
        if r is None:
            raise NotFound(f"no branch named {name} in workspace {workspace}")
        return self._branch(r)

    @_locked
    def branches(self, workspace: str | None = None, *,
                 include_ended: bool = False) -> list[Branch]:
        """Branches that have not ended (active and invalidated ones), or all."""
        if workspace is not None:
            self.workspace(workspace)
        return [self._branch(r) for r in self._recs.values()
                if (workspace is None or r.workspace == workspace)
                and (include_ended or r.status not in ENDED)]

    @_locked
    def find_branch(self, name: str) -> Branch:
        """The one branch named *name* that has not ended, across workspaces."""
        live = [r for r in self._recs.values() if r.name == name and r.status not in ENDED]
        if len(live) > 1:
            where = ", ".join(sorted(r.workspace for r in live))
            raise Conflict(f"branch name {name} is ambiguous: it exists in workspaces {where}")
        if not live:
            ended = [r for r in self._recs.values() if r.name == name]
            if len(ended) == 1:
                r = ended[0]
                raise NotFound(f"branch {name} in workspace {r.workspace} was {r.status}{r.note}")
            raise NotFound(f"no branch named {name}")
        return self._branch(live[0])

    @_locked
    def delta_dir(self, workspace: str, name: str) -> str:
        return self._path("branches", self._get(workspace, name).id, "upper")

    @_locked
    def view(self, workspace: str, name: str | None) -> View:
        """The view of a branch that has not ended, or of the base (name None)."""
        if name is None:
            self.workspace(workspace)
            return self._base_view(workspace)
        return self.view_by_id(self._get(workspace, name).id)

    def _parent_view(self, r: _Rec) -> View:
        if r.parent_id is None:
            return View([self._base_fd_of(r)])
        return self.view_by_id(r.parent_id)

    def _own_view(self, bid: str | None, r: _Rec | None = None) -> View:
        """A view for one operation off the event loop: of branch *bid*, or (None)
        of *r*'s parent. Its own and uncached: the Store's views, their caches and
        the process's inotify watcher are the event loop thread's. Made with the
        lock held; its layers stay open while the branch lives."""
        if bid is None:
            assert r is not None
            if r.parent_id is None:
                return View([self._base_fd_of(r)], watched=False)
            bid = r.parent_id
        return View(self._layers(bid), work=self._dir_fds[bid][1],
                    origins=self._origins_of(bid), watched=False)

    def diff(self, workspace: str, name: str) -> list[Change]:
        """What branch *name* changed. Safe on a worker thread while no long
        operation of the workspace runs (``daemon.lanes``): only the lookup of
        the branch holds the Store's lock, not the walk."""
        with self._lock:
            r = self._get(workspace, name)
            self._settled(workspace)
            mine, parent = self._own_view(r.id), self._own_view(None, r)
        return diff.diff(mine, parent)

    # -- commit and discard -------------------------------------------------

    def commit(self, workspace: str, name: str, *, force: bool = False) -> CommitResult:
        """Apply the branch's changes to its parent atomically. Refused with
        ``OutsideChange`` (nothing changed) when a path it would replace or
        delete changed in the parent since the branch hid it, unless *force*.

        Safe on a worker thread, where the daemon runs it (``daemon.lanes``: one
        long operation per workspace at a time, the workspace's FUSE requests
        held): the Store's lock is held while records, fds and views are read or
        changed, and released while the delta is walked, moved and synced."""
        t0 = time.monotonic()
        with self._lock:
            r, upper, target, check, invalidated, rebased = self._commit_inputs(
                workspace, name, force)
        try:
            steps = commit.plan(upper, target, r.parent_id is None, check)
            if check is not None and check.conflicts:
                self._refuse(r, check.conflicts)
            self._check_space(upper, target.layers[0], steps, name)
            few = _sync_sources(upper, steps)
        except OSError as exc:
            _raise_os(exc, f"planning the commit of {name}")
        try:  # the parent's versions of the files both changed: bases of three-way merges
            for s, view in rebased:
                merge.capture(self._path("branches", s.id, merge.DIR), _paths(steps), target,
                              view)
        except OSError as exc:
            _raise_os(exc, f"keeping the parent's files for the siblings of {name}")
        note = f" by the commit of {name}"
        r_new = dataclasses.replace(r, status=COMMITTED, note="")
        changed = [r_new, *(dataclasses.replace(s, status=INVALIDATED, note=note)
                            for s in invalidated)]
        # the records change once the journal is durable
        with self._lock:
            ident = self._ws[workspace].ident
            for_parent = self._origins_of(r.id).for_parent() if r.parent_id is not None else []
        journal = {"version": 2, "branch": r.id, "name": name, "workspace": workspace,
                   "target": r.parent_id, "base": ident, "steps": steps,
                   "records": [vars(c) for c in changed],
                   "rebase": [s.id for s, _ in rebased],
                   "origins": for_parent}
        jpath = self._path("journal", f"commit-{r.id}.json")
        atomic_write(jpath, _dumps(journal),
                     before_replace=lambda: commit.crash_point("journal-tmp"))
        commit.crash_point("journal")
        try:
            self._apply_journal(journal, jpath, few=few)
        except OSError as exc:
            # the journal is durable: the commit is finished (rolled forward) before
            # anything else happens in this workspace; once more at once, as the cause
            # (a full disk) may be gone already
            with self._lock:
                self._pending[workspace] = (journal, jpath)
            log.warning("commit of %s/%s failed half way (%s): finishing it", workspace,
                        name, exc)
            try:
                self._finish(workspace)
            except (OSError, BaseReplaced):
                _raise_os(exc, f"committing {name}; nothing else happens in workspace "
                          f"{workspace} until its commit is finished (each request tries)")
        with self._lock:
            return self._committed(journal, time.monotonic() - t0)

    def _commit_inputs(self, workspace: str, name: str, force: bool
                       ) -> tuple[_Rec, int, View, origins.Check | None, list[_Rec],
                                  list[tuple[_Rec, View]]]:
        """With the lock held: what a commit of *name* needs, checked (the branch's
        record, its upper dir, its parent's view, the outside-change check, the
        siblings it invalidates and those it carries on, with their views)."""
        self.refresh(workspace)
        r = self._get(workspace, name)
        self._settled(workspace)
        if r.status == INVALIDATED:
            raise Stale(f"branch {name} was invalidated{r.note}: its parent changed under it")
        if r.parent_id is None and self._replaced(r):
            ws = self._ws[workspace]
            raise BaseReplaced(f"branch {name} forks a directory that is no longer at "
                               f"{ws.base} (removed and made again?): it cannot be committed "
                               "into the new one; diff or discard it")
        if r.conflicts:
            raise OutsideChange(
                f"branch {name} has unresolved conflicts with its parent at "
                f"{', '.join(r.conflicts)}: resolve each (branchctl resolve {name} PATH "
                "--ours|--theirs|--file F) or discard the branch", list(r.conflicts))
        live = [c.name for c in self._children(r) if c.status not in ENDED]
        if live:
            raise HasChildren(f"branch {name} has child branches ({', '.join(sorted(live))}); "
                              "commit or discard them first")
        upper = self._dir_fds[r.id][0]
        target = self._own_view(None, r)
        mine = self._origins_of(r.id)
        check = None
        if not force and mine.tracked:
            check = origins.Check(mine, target, upper)
        elif not force:
            log.warning("branch %s predates origin records: its commit is not checked "
                        "for outside changes", name)
        invalidated: list[_Rec] = []
        rebased: list[tuple[_Rec, View]] = []
        for s in self._recs.values():
            if (s.workspace == r.workspace and s.parent_id == r.parent_id and s.id != r.id
                    and s.status == ACTIVE and not self._replaced(s)):
                if s.on_sibling_commit == INVALIDATE:
                    invalidated.append(s)
                    invalidated.extend(d for d in self._descendants(s) if d.status == ACTIVE)
                else:
                    rebased.append((s, self._own_view(s.id)))
        return r, upper, target, check, invalidated, rebased

    def _committed(self, journal: dict[str, Any], seconds: float) -> CommitResult:
        """The result of an applied journal, told to the subscribers."""
        workspace, r = journal["workspace"], self._recs[journal["branch"]]
        invalidated = [self._recs[c["id"]] for c in journal["records"] if c["id"] != r.id]
        steps = journal["steps"]
        paths = _paths(steps)
        self._emit(Event("committed", workspace, self._branch(r),
                         target=r.parent_id, paths=paths))
        for bid in [r.id, *(s.id for s in invalidated)]:
            self._emit(Event("branch-ended", workspace, self._branch(self._recs[bid])))
        rebased, conflicted = [], []
        for bid in journal.get("rebase", []):
            s = self._recs.get(bid)
            if s is None or s.status != ACTIVE:
                continue
            try:
                _, conflicts = self._rebase(s, steps)
            except OSError as exc:  # r is committed all the same; s is as before the merge
                log.warning("merging the commit of %s into sibling %s failed: %s (its "
                            "commit is checked as after any outside change; branchctl "
                            "rebase tries again)", r.name, s.name, exc)
                conflicts = ["?"]
            rebased.append(s.name)
            if conflicts:
                conflicted.append(s.name)
        result = CommitResult(
            branch=r.name, workspace=workspace,
            into=self._recs[r.parent_id].name if r.parent_id else None,
            changes=commit.count_changes(steps),
            invalidated=[s.name for s in invalidated], seconds=seconds,
            rebased=rebased, conflicted=conflicted)
        log.info("committed %s/%s: %d changes, %d branches invalidated, %d carried on "
                 "(%d with conflicts)", workspace, r.name, result.changes, len(invalidated),
                 len(rebased), len(conflicted))
        return result

    # -- siblings that carry on: rebase and resolve --------------------------

    @_locked
    def rebase(self, workspace: str, name: str) -> tuple[list[str], list[str]]:
        """Bring branch *name* onto its parent's current state (also after changes
        made to the base outside branchd): every path it changed that its parent
        changed since is merged (text, three-way where the parent's earlier version
        was kept) or becomes a conflict. Returns (merged paths, all conflicts)."""
        r = self._get(workspace, name)
        self._settled(workspace)
        if self._replaced(r):
            raise BaseReplaced(f"branch {name} forks a directory that is no longer at "
                               f"{self._ws[workspace].base}: there is nothing to rebase onto")
        return self._rebase(r, ())

    def _rebase(self, r: _Rec, steps: Sequence[Step]) -> tuple[list[str], list[str]]:
        """Merge what changed in *r*'s parent into *r* where both changed a path
        (*steps*: those of the sibling's commit that changed it, if that is why).
        Where both did is what origins.Check says (as for r's own commit: that
        also finds changes made outside) and, from the steps, what no origin
        record tells of (a kernel overlay's copy-up).
        Journaled: the results are written first, then a journal naming them, then
        into the branch (replayed from the journal after a crash)."""
        mine = self._origins_of(r.id)
        upper = self._dir_fds[r.id][0]
        parent = self._own_view(None, r)
        check = origins.Check(mine, parent, upper)
        if mine.tracked:  # a branch older than origin records has its steps' overlaps only
            commit.plan(upper, parent, r.parent_id is None, check)
        changed = _paths(steps)
        mdir = self._path("branches", r.id, merge.DIR)
        view = self._own_view(r.id)
        results: list[list[str]] = []
        conflicts = [p for p in r.conflicts]
        for path in dict.fromkeys([*check.conflicts, *merge.overlaps(upper, steps, parent)]):
            if path in conflicts:
                continue
            out = merge.attempt(mdir, path, parent, view)
            if out is None:
                conflicts.append(path)
            else:
                results.append([path, out])
        journal = {"branch": r.id, "name": r.name, "workspace": r.workspace,
                   "results": results, "conflicts": sorted(conflicts)}
        jpath = self._path("journal", f"{MERGE}{r.id}.json")
        atomic_write(jpath, _dumps(journal),
                     before_replace=lambda: commit.crash_point("merge-journal-tmp"))
        commit.crash_point("merge-journal")
        self._apply_merge(journal, jpath)
        merged = [p for p, _ in results]
        self._emit(Event("rebased", r.workspace, self._branch(self._recs[r.id]), target=r.id,
                         paths=tuple(dict.fromkeys([*changed, *merged, *conflicts]))))
        for d in self._descendants(r):  # they see the parent's changes through r
            if d.status == ACTIVE and changed:
                self._emit(Event("rebased", r.workspace, self._branch(d), target=d.id,
                                 paths=tuple(changed)))
        if merged or conflicts:
            log.info("branch %s/%s carried on over its parent: merged %s; conflicts %s",
                     r.workspace, r.name, merged or "-", conflicts or "-")
        return merged, sorted(conflicts)

    def _apply_merge(self, journal: dict[str, Any], jpath: str) -> None:
        """Write a merge journal's results into its branch, take the parent's
        present entries as what the branch hid there, then its conflicts into its
        record. Idempotent (a replay writes the same results again)."""
        r = self._recs.get(journal["branch"])
        if r is not None and r.status not in ENDED:
            view, parent = self._own_view(r.id), self._own_view(None, r)
            mine = self._origins_of(r.id)
            mdir = self._path("branches", r.id, merge.DIR)
            for path, result in journal["results"]:
                parts = path.split("/")
                if os.path.exists(result):
                    merge.write_in_place(view, path, result, self.served(r.id))
                    commit.crash_point("merge-step")
                mine.note(parts, parent.lookup(parts))
                merge.forget(mdir, path)
            syncfs(self._dir_fds[r.id][0])
            self._log([dataclasses.replace(self._recs[r.id], conflicts=journal["conflicts"])])
        os.unlink(jpath)

    @_locked
    def resolve(self, workspace: str, name: str, path: str, how: str) -> list[str]:
        """Settle a conflict of branch *name* at *path*: ``ours`` keeps the branch's
        file as it is now (also after an edit), ``theirs`` takes the parent's (the
        branch's own entry goes), ``markers`` writes git's conflict markers into the
        branch's file and leaves the conflict open for an edit. Returns the
        conflicts left."""
        r = self._get(workspace, name)
        self._settled(workspace)
        if path not in r.conflicts:
            raise NotFound(f"branch {name} has no conflict at {path!r}"
                           + (f" (it has: {', '.join(r.conflicts)})" if r.conflicts else ""))
        parts = path.split("/")
        view, parent = self.view_by_id(r.id), self._parent_view(r)
        mdir = self._path("branches", r.id, merge.DIR)
        try:
            if how == "markers":
                out = merge.attempt(mdir, path, parent, view, markers=True)
                if out is None:
                    raise Conflict(f"{path} is not a text file on both sides: no markers; "
                                   "resolve it --ours or --theirs")
                merge.write_in_place(view, path, out, self.served(r.id))
                self._emit(Event("rebased", workspace, self._branch(r), target=r.id,
                                 paths=(path,)))
                return list(r.conflicts)
            if how == "theirs":
                try:  # its entry (a file, a whiteout, a tree) goes: the parent's shows
                    dfd = backing.open_dir(self._dir_fds[r.id][0], parts[:-1])
                except (FileNotFoundError, NotADirectoryError):
                    dfd = -1
                if dfd >= 0:
                    try:
                        backing.remove_at(dfd, parts[-1])
                    finally:
                        os.close(dfd)
                self._views.pop(r.id).close()  # rebuilt without the cached entry
                self._origins_of(r.id).forget(parts)
            elif how == "ours":
                self._origins_of(r.id).note(parts, parent.lookup(parts))
            else:
                raise BadName(f"resolve: how must be ours, theirs or markers, not {how!r}")
            syncfs(self._dir_fds[r.id][0])
            left = [p for p in r.conflicts if p != path]
            self._log([dataclasses.replace(r, conflicts=left)])
        except OSError as exc:
            _raise_os(exc, f"resolving {path} in {name}")
        merge.forget(mdir, path)
        self._emit(Event("rebased", workspace, self._branch(self._recs[r.id]), target=r.id,
                         paths=(path,)))
        return left

    def _finish(self, workspace: str) -> None:
        with self._lock:
            journal, jpath = self._pending[workspace]
        try:
            self._apply_journal(journal, jpath)
        except BaseReplaced as exc:
            with self._lock:
                del self._pending[workspace]
            log.warning("%s", self._keep(journal, jpath, exc))
            raise
        with self._lock:
            del self._pending[workspace]
        log.warning("finished the interrupted commit of %s/%s", workspace, journal["name"])

    def _keep(self, journal: dict[str, Any], path: str, exc: BaseReplaced) -> str:
        """Set aside a journal that must not be replayed (its directory was
        replaced); its branch stays active, to be diffed or discarded."""
        kept = os.path.join(os.path.dirname(path), KEPT + os.path.basename(path))
        os.rename(path, kept)
        return f"{exc}: not replayed; the journal is kept as {kept}"

    def finish_pending(self, workspace: str) -> CommitResult | None:
        """Finish a commit of *workspace* that failed half way, if there is one: its
        result, None if there was none. Raises Busy while it still cannot be done.
        Safe on a worker thread, as ``commit`` is."""
        with self._lock:
            if workspace not in self._pending:
                return None
            journal = self._pending[workspace][0]
        try:
            self._finish(workspace)
        except BaseReplaced:
            return None
        except OSError as exc:
            raise Busy(f"workspace {workspace}: the commit of {journal['name']} failed half "
                       f"way and cannot be finished yet ({exc.strerror or exc}); nothing "
                       "else happens in it until it is") from exc
        with self._lock:
            return self._committed(journal, 0.0)

    @_locked
    def pending(self, workspace: str) -> bool:
        """Whether *workspace* has a commit that failed half way (see finish_pending)."""
        return workspace in self._pending

    @_locked
    def pending_journals(self) -> set[str]:
        """The paths of the journals of commits that failed half way (finish_pending):
        every other ``journal/commit-*.json`` is a leftover."""
        return {jpath for _, jpath in self._pending.values()}

    @_locked
    def remove_done_journal(self, path: str) -> bool:
        """Remove a leftover journal whose commit is done (its branch is committed or
        forgotten), as a restart would; False (kept) for any other."""
        if path in self.pending_journals():
            return False
        with open(path, "rb") as f:
            journal = json.load(f)
        done = self._recs.get(journal["branch"])
        if done is not None and done.status != COMMITTED:
            return False
        os.unlink(path)
        log.warning("removed the leftover journal %s of the completed commit of %s/%s",
                    path, journal["workspace"], journal["name"])
        return True

    def _settled(self, workspace: str) -> None:
        """Refuse work in a workspace whose commit is not finished (see finish_pending)."""
        if workspace in self._pending:
            journal = self._pending[workspace][0]
            raise Busy(f"workspace {workspace}: the commit of {journal['name']} failed half "
                       "way and is not finished yet; nothing else happens in it until it is")

    def _refuse(self, r: _Rec, paths: list[str]) -> NoReturn:
        where = ("base" if r.parent_id is None
                 else f"parent branch {self._recs[r.parent_id].name}")
        more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
        log.info("commit of %s refused: %d paths changed outside it: %s", r.name, len(paths),
                 " ".join(paths[:20]))
        raise OutsideChange(f"{where} changed outside the branch: {paths[0]}{more}; "
                            "commit with force to overwrite", paths=paths)

    @staticmethod
    def _check_space(upper: int, target: int, steps: list[list[Any]], name: str) -> None:
        """Across filesystems a commit copies: refuse it before the journal
        (all-old) rather than run out of space half way through."""
        if os.fstat(upper).st_dev == os.fstat(target).st_dev:
            return
        need = commit.bytes_to_copy(upper, steps)
        sv = os.fstatvfs(target)
        free = sv.f_bavail * sv.f_frsize
        if need > free:
            raise NoSpace(f"committing {name} copies {need} bytes to another filesystem "
                          f"that has {free} bytes free")

    def _apply_journal(self, journal: dict[str, Any], jpath: str, *, few: bool = False) -> None:
        """Apply a durable journal's steps, make them durable, then its records.
        *few*: the moved entries are files and few (``_sync_sources`` said so),
        so fsyncs of the directories touched replace a syncfs."""
        bid = journal["branch"]
        with self._lock:
            upper = self._dir_fds[bid][0] if bid in self._dir_fds else None
            if upper is not None:
                target = self._own_view(None, self._recs[bid])
                parent_origins = (self._origins_of(journal["target"])
                                  if journal.get("origins") else None)
        if upper is not None:
            if journal["target"] is None:
                self._check_base(journal, target.layers[0])
            gname = f"commit-{bid}"
            gpath = self._path("trash", gname)
            os.makedirs(gpath, exist_ok=True)
            gfd = os.open(gpath, backing.DIR_FLAGS)
            try:
                same_fs = os.fstat(gfd).st_dev == os.fstat(target.layers[0]).st_dev
                grave = commit.Graveyard(gfd if same_fs else None)
                commit.apply_steps(journal["steps"], upper, target, grave)
                commit.crash_point("steps")
                if parent_origins is not None:
                    parent_origins.adopt(journal["origins"])
                if few and same_fs:
                    _sync_dirs(target.layers[0], journal["steps"])
                    os.fsync(gfd)
                    if journal.get("origins"):
                        fsync_path(self._path("branches", journal["target"], origins.FILE))
                else:
                    syncfs(target.layers[0])
            finally:
                os.close(gfd)
            self._trash.put(gname)
        changed = [_Rec(**c) for c in journal["records"]]
        with self._lock:
            self._log(changed)
            commit.crash_point("state")
            for stale in [b for b in self._dir_fds if self._recs[b].status in ENDED]:
                self._close_branch_fds(stale)
            # layer lists of the workspace's survivors are rebuilt on demand
            for b in [b for b, r in self._recs.items() if r.workspace == journal["workspace"]]:
                self._retire(b)
            self._to_trash(bid)
            self._drop_unused_bases()
        os.unlink(jpath)  # not fsynced: _recover knows an applied journal by its branch's record

    def _check_base(self, journal: dict[str, Any], fd: int) -> None:
        """A journal goes into the directory it was written for, never another."""
        ident = backing.identity(fd)
        if journal.get("base", ident) != ident:
            raise BaseReplaced(f"the commit of {journal['name']} was for a directory that "
                               f"is no longer at the path of workspace {journal['workspace']}")

    @_locked
    def discard(self, workspace: str, name: str) -> list[Branch]:
        r = self._get(workspace, name)
        self._settled(workspace)
        gone = [dataclasses.replace(g, status=DISCARDED, note="")
                for g in [r, *(d for d in self._descendants(r) if d.status not in ENDED)]]
        try:
            self._log(gone)
        except OSError as exc:
            _raise_os(exc, f"discarding {name}")
        for g in gone:
            self._close_branch_fds(g.id)
            self._to_trash(g.id)
        self._drop_unused_bases()
        out = [self._branch(g) for g in gone]
        for b in out:
            self._emit(Event("branch-ended", workspace, b))
        return out

    @_locked
    def close(self) -> None:
        self._reap()
        for bid in list(self._dir_fds):
            self._close_branch_fds(bid)
        for fd in [*self._base_fds.values(), *self._old_bases.values()]:
            os.close(fd)
        self._base_fds.clear()
        self._old_bases.clear()
        if self._empty_fd >= 0:
            os.close(self._empty_fd)
            self._empty_fd = -1
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        self._trash.close()


def _paths(steps: Sequence[Step]) -> tuple[str, ...]:
    """The paths a commit's steps change, in order."""
    return tuple(s[1] for s in steps)


def _sync_sources(upper: int, steps: list[commit.Step]) -> bool:
    """Make what the moves of *steps* take from *upper* durable before the
    journal names it. For a few files: an fsync of each and of its directory
    (True); for many entries or a directory moved whole: one syncfs (False)."""
    moves = [tuple(s[1].split("/")) for s in steps if s[0] == "move"]
    if len(steps) > FSYNC_EACH_MAX:
        syncfs(upper)
        return False
    for parent in {m[:-1] for m in moves}:
        dfd = backing.open_dir(upper, parent)
        try:
            for m in moves:
                if m[:-1] != parent:
                    continue
                st = backing.lstat_at(dfd, m[-1])
                if st is not None and stat.S_ISDIR(st.st_mode):
                    syncfs(upper)
                    return False
                if st is not None and stat.S_ISREG(st.st_mode):
                    fd = os.open(m[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def _sync_dirs(root: int, steps: list[commit.Step]) -> None:
    """fsync every directory under *root* that the applied *steps* changed."""
    dirs = {tuple(s[1].split("/"))[:-1] for s in steps}
    dirs |= {tuple(s[1].split("/")) for s in steps if s[0] == "dir"}
    for parts in dirs:
        try:
            fd = backing.open_dir(root, parts)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            # the steps are applied; someone has moved or swapped a directory since
            # (a user of the workspace): what we changed is synced by the filesystem
            # instead, never through the name that is no longer ours
            syncfs(root)
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _dumps(data: dict[str, Any]) -> bytes:
    """Compact JSON: the C encoder (``indent`` would take the pure-Python one,
    10x slower, and every create and discard writes the whole state)."""
    return json.dumps(data, separators=(",", ":")).encode()


def _within(path: str, root: str) -> bool:
    """Whether *path* is *root* or below it (whole components, never a string prefix)."""
    return path == root or os.path.commonpath([path, root]) == root


def _raise_os(exc: OSError, doing: str) -> NoReturn:
    """Re-raise an OSError met while *doing*; a full disk becomes NoSpace."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpace(f"no space left on device while {doing}") from exc
    raise exc
