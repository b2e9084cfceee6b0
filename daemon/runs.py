"""Candidate runs: processes the daemon starts in a branch, each in its own cgroup.

A run's record lives under ``<state>/runs/<branch-id>/<run-id>/``: the captured
stdout and stderr (unless the client passed its own descriptors) and, once the
run ends, ``result.json``. Runs belong to their branch (cgroup group = branch
id) so that discarding or invalidating a branch kills every process in it.

Where runs get a user namespace (an unprivileged daemon), a run with a bind
gets its branch from a kernel overlay mounted inside that namespace over the
branch's delta (upper: its upper dir, with a work dir of the run's own in the
branch's ``work/``; lowers: the ancestors' upper dirs, then the workspace),
the same layers ``daemon/overlays.py`` mounts as root; one run of a branch at
a time (overlays over one upper dir do not see each other's changes): the
others get the FUSE bind. While one is in a branch, the branch is
``Store.shared``: its FUSE view caches nothing, so the FUSE mount shows at
once what the run writes. Where the kernel refuses the overlay, the run gets
the FUSE bind, and the log and its record say why.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import branchfs
import cgroups
from branchfs import overlay
from branchfs.backing import DIR_FLAGS
from branchfs.durable import atomic_write
from cgroups.spawn import LAYER_FD, MAX_LAYERS, Bind, Overlay, User

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """One started run. ``result`` is set exactly once, when the process tree is gone."""

    id: str
    branch_id: str
    uid: int  # who started it: only they (and root) may see, wait for or kill it
    run: cgroups.Run
    record_dir: Path
    captured: bool
    # what serves the branch in a user namespace's run: "overlay" (its own), "fuse" (the
    # bind; ``served_why`` says why not the overlay); None for other runs (as root, the
    # bind shows whatever serves the branch's path: its ``backend``)
    served: str | None = None
    served_why: str = ""
    workdir: str | None = None  # the overlay's, in the branch's work dir
    result: dict[str, Any] | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run": self.id, "pid": self.run.pid}
        if self.served is not None:
            out["served_by"] = self.served
            if self.served_why:
                out["served_why"] = self.served_why
        if self.captured:
            out["stdout_path"] = str(self.record_dir / "stdout")
            out["stderr_path"] = str(self.record_dir / "stderr")
        if self.result is not None:
            out["result"] = self.result
        return out


class RunTable:
    """The daemon's runs, keyed by id; spawns through one cgroups.Manager."""

    def __init__(self, state_dir: Path, mountpoint: Path, manager: cgroups.Manager,
                 store: branchfs.Store, settle: Callable[[], Awaitable[None]]) -> None:
        self.root = state_dir / "runs"
        self.mountpoint = mountpoint
        self.state_dir = state_dir
        # others may pass through (to their own run records, which they own) but not list
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.root.chmod(0o711)
        self.manager = manager
        self.store = store
        self.settle = settle  # the data plane's: Store events reached the kernel
        self.runs: dict[str, RunRecord] = {}
        self._overlaid: set[str] = set()  # the branches one of whose runs has its overlay
        store.shared = self._overlaid.__contains__

    async def start(
        self,
        *,
        branch_id: str,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        limits: cgroups.Limits,
        stdio: list[int] | None,
        bind: Bind | None,
        uid: int,
        gid: int,
    ) -> RunRecord:
        """Spawn ``argv`` in a new cgroup of the branch's group.

        ``stdio`` is the client's (stdin, stdout, stderr); None captures output
        into the run record (owned by the caller, who may read it) and gives
        the child /dev/null as stdin. With ``bind`` the run sees the branch at
        the workspace's path, and the daemon's mountpoint and state directory
        are hidden from it (no way to sibling branches).
        """
        run_id = uuid.uuid4().hex[:12]
        branch_dir = self.root / branch_id
        branch_dir.mkdir(mode=0o711, exist_ok=True)
        record_dir = branch_dir / run_id
        record_dir.mkdir(mode=0o700)
        mine = uid == os.geteuid()
        if not mine:
            os.chown(record_dir, uid, gid)
        opened: list[int] = []
        captured = stdio is None
        if stdio is None:
            opened = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
            for name in ("stdout", "stderr"):
                fd = os.open(record_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                opened.append(fd)
                if not mine:
                    os.fchown(fd, uid, gid)
            stdio = opened
        workdir = None
        why = ""
        own = bind is not None and self.manager.namespace[0] == "user"  # its own overlay
        if bind is not None and own:
            if branch_id in self._overlaid:  # (overlayfs: undefined, and the kernel says so)
                ov, why = None, ("another run of the branch has its own overlay: two over "
                                 "one upper dir would not see each other's changes")
            else:
                workdir = f"run.{run_id}"
                ov, why = self._overlay(branch_id, workdir)
            if ov is None:
                workdir = None
                log.info("run %s in branch %s gets the FUSE bind: %s", run_id, branch_id, why)
            else:
                bind = Bind(bind.source, bind.target, bind.target_fd, ov)
                opened.extend(ov.fds)
                self._overlay_starts(branch_id)
                await self.settle()  # the FUSE view cached nothing when the run starts
        # In a worker thread: the child's chdir into the branch is a FUSE request that this
        # daemon's trio thread must be free to answer.
        spawn = functools.partial(
            self.manager.spawn, argv, cwd=cwd, env=env, limits=limits, group=branch_id,
            stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], bind=bind,
            hide=[str(self.mountpoint), str(self.state_dir)] if bind else None,
            user=None if mine else _user(uid, gid),
        )
        try:
            run = await trio.to_thread.run_sync(spawn)
        except BaseException:
            if workdir is not None:
                self._overlay_ends(branch_id, workdir)
            raise
        finally:
            for fd in opened:
                os.close(fd)
        record = RunRecord(run_id, branch_id, uid, run, record_dir, captured=captured,
                           served="fuse" if own else None, served_why=why)
        if workdir is not None:
            if run.overlay_refused is None:
                record.served, record.workdir = "overlay", workdir
            else:
                record.served_why = run.overlay_refused
                log.warning("run %s in branch %s: %s", run_id, branch_id, run.overlay_refused)
                self._overlay_ends(branch_id, workdir)
        self.runs[run_id] = record
        token = trio.lowlevel.current_trio_token()
        # no task or thread waits for a run: its end is called back from the cgroups
        # monitor thread, which writes the result and hands it to the event loop
        run.add_done_callback(functools.partial(self._ended, record, token))
        log.info("run %s started in branch %s: pid %d, %s", run_id, branch_id, run.pid, argv)
        return record

    def _ended(self, record: RunRecord, token: trio.lowlevel.TrioToken,
               result: cgroups.RunResult) -> None:
        done = result.to_dict()
        atomic_write(record.record_dir / "result.json", json.dumps(done).encode())
        try:
            token.run_sync_soon(self._publish, record, done)
        except trio.RunFinishedError:
            pass  # the daemon is stopping: no one waits for it any more

    def _publish(self, record: RunRecord, done: dict[str, Any]) -> None:
        record.result = done
        if record.workdir is not None:
            self._overlay_ends(record.branch_id, record.workdir)
        record.done.set()
        log.info("run %s ended: %s", record.id, done)

    def _overlay(self, branch_id: str, workdir: str) -> tuple[Overlay | None, str]:
        """The overlay of the branch for a run (its fds ours, to close once it started),
        with *workdir* made for it in the branch's work dir (a mount empties its work
        dir: the root backend's overlays have their own). None, and why, where the chain
        cannot be one overlay."""
        view = self.store.view_by_id(branch_id)
        assert view.work is not None
        layers = len(view.layers) + 1
        if layers > MAX_LAYERS:
            return None, f"{layers} layers do not fit in one message to the run"
        try:
            data = overlay.options(LAYER_FD, LAYER_FD + 1, range(LAYER_FD + 2, LAYER_FD + layers))
        except OSError as exc:
            return None, str(exc)
        os.mkdir(workdir, 0o700, dir_fd=view.work)
        fds = [os.dup(view.layers[0]), os.open(workdir, DIR_FLAGS, dir_fd=view.work)]
        fds += [os.dup(fd) for fd in view.layers[1:]]
        return Overlay(data, tuple(fds)), ""

    def _overlay_starts(self, branch_id: str) -> None:
        self._overlaid.add(branch_id)
        self.store.share(branch_id)  # what the kernel cached of its FUSE view goes

    def _overlay_ends(self, branch_id: str, workdir: str) -> None:
        """A run's overlay is gone (or never was): the branch is cacheable again, and the
        work dir goes (while the branch lasts: else with it)."""
        self._overlaid.discard(branch_id)
        if self.store.status(branch_id) == "active":
            view = self.store.view_by_id(branch_id)
            assert view.work is not None
            try:
                overlay.remove_workdir(view.work, workdir)
            except OSError as exc:  # still held by a process that left the run's tree
                log.info("the overlay work dir %s of branch %s stays: %s", workdir, branch_id,
                         exc)

    def get(self, run_id: str) -> RunRecord | None:
        return self.runs.get(run_id)

    def kill_branch(self, branch_id: str, reason: str) -> int:
        """Kill every run of the branch; *reason* (a protocol.ENDED_BY key) becomes their
        results' ``ended_by``. How many processes there were."""
        return self.manager.kill_group(branch_id, reason)

    def kill(self, record: RunRecord, reason: str) -> None:
        """Kill one run; *reason* as for kill_branch."""
        record.run.kill(reason)

    def active(self) -> int:
        return sum(1 for r in self.runs.values() if r.result is None)


def _user(uid: int, gid: int) -> User:
    """The caller as a root daemon runs their candidate: uid and gid from SO_PEERCRED,
    the supplementary groups the user database gives them (none for a uid without an
    entry)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return User(uid, gid, ())
    return User(uid, gid, tuple(os.getgrouplist(name, gid)))
