"""The control operations: one method per protocol op, over the Store and the runs.

Handlers take validated arguments and the peer's credentials, call the
filesystem core or the run table, and return a JSON-able result. They raise
domain errors; ``daemon.server`` is the one place that turns any exception into
a protocol error.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import grp
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import branchfs
import cgroups
from branchfs.model import ACTIVE, ENDED
from cgroups.spawn import Bind
from daemon import ascaller, diffpage, fsck, patch
from daemon.lanes import Lanes
from daemon.meta import MetaStore
from daemon.protocol import ADMIN, ANYONE, BRANCH, OPS, RUN, VERSION, WORKSPACE
from daemon.runs import RunRecord, RunTable

if TYPE_CHECKING:
    from daemon.dataplane import Plane

log = logging.getLogger(__name__)

RWX = os.R_OK | os.W_OK | os.X_OK  # what a caller needs on a workspace's base to use it
META_LIMIT = 64 * 1024  # bytes of JSON a branch may carry
# why a run could not start (cgroups.SpawnError.errno) -> error code; else bad-request
SPAWN_ERRORS = {errno.EACCES: "permission", errno.EPERM: "permission",
                errno.ENOENT: "not-found", errno.ENOTDIR: "not-found", errno.ESTALE: "stale"}


class RequestError(Exception):
    """A request the daemon refuses; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Peer:
    """A connection's client as the kernel saw it at connect() (daemon.server.peer_of):
    never looked up again by pid, which another process may have taken since."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups (SO_PEERGROUPS)


Handler = Callable[["Handlers", Peer, dict[str, Any], list[int]], Awaitable[dict[str, Any]]]


@dataclass
class Session:
    """The branches a connection created with ``"session": true`` and has not settled
    (by ``session-end``): when the connection closes first, its client died and the
    daemon discards them. One per connection, which sets it for its own task."""

    branches: list[tuple[str, str, str]] = field(default_factory=list)  # workspace, name, id


# the connection being answered (each connection is one trio task, with its own context)
SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("session",
                                                                        default=None)


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    value = args.get(name, default)
    if value is ...:
        raise RequestError("bad-request", f"missing argument {name!r}")
    if value is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise RequestError("bad-request", f"argument {name!r} has the wrong type")
    return value


class Handlers:
    """State shared by all connections: the store, the runs, the branches' metadata, the
    data plane (``daemon.dataplane``: the one way to the backends serving branches)."""

    def __init__(
        self,
        store: branchfs.Store,
        runs: RunTable,
        meta: MetaStore,
        data: Plane,
        *,
        mountpoint: Path,
        socket_path: Path,
        allow_uids: frozenset[int],
        on_change: Callable[[], None],
        shutdown: Callable[[], None],
    ) -> None:
        self.store = store
        self.runs = runs
        self.meta = meta
        self.data = data
        self.lanes = Lanes(data)
        self.mountpoint = mountpoint
        self.socket_path = socket_path
        self.allow_uids = allow_uids
        self.on_change = on_change
        self.shutdown = shutdown
        self.started = time.time()
        # root may act as anyone; an unprivileged daemon only as itself (and refuses, at
        # start, --allow-uid of anyone else: daemon.main), so root is the one other peer
        self.for_others = ascaller.acts_for_others()

    # --- helpers -------------------------------------------------------------------------

    def _branch(self, args: dict[str, Any]) -> branchfs.Branch:
        name = arg(args, "name", str)
        workspace = arg(args, "workspace", str, None)
        ws = (self.store.find_branch(name).workspace if workspace is None
              else self._workspace(workspace).name)
        self.store.refresh(ws)  # its base_replaced as it is now
        return self.store.branch(ws, name)

    def _workspace(self, name_or_path: str) -> branchfs.Workspace:
        """A workspace by name, or by the path of its base directory."""
        if "/" not in name_or_path and name_or_path not in (".", ".."):
            return self.store.refresh(name_or_path)
        real = self.store.resolve_path(name_or_path)  # never os.path.realpath: see there
        for ws in self.store.workspaces():
            if ws.base == real:
                return self.store.refresh(ws.name)
        raise branchfs.NotFound(f"no workspace with base {real}")

    def _active(self, branch: branchfs.Branch) -> branchfs.Branch:
        if branch.status == "active":
            return branch
        code = "stale" if branch.status == "invalidated" else "not-found"
        raise RequestError(code, f"branch {branch.name!r} was {branch.status}")

    def _run(self, args: dict[str, Any]) -> RunRecord:
        run_id = arg(args, "run", str)
        record = self.runs.get(run_id)
        if record is None:
            raise RequestError("not-found", f"no run {run_id!r}")
        return record

    def _base_of(self, branch: branchfs.Branch) -> str:
        return self.store.workspace(branch.workspace).base

    # --- who may do what: protocol.OPS declares it, authorize checks it --------------------

    def privileged(self, peer: Peer) -> bool:
        """Root and the daemon's own uid may do everything, to anyone's workspaces and runs
        (but for root, ``exec`` in an unprivileged daemon: ``authorize``)."""
        return peer.uid in (0, os.geteuid())

    async def authorize(self, peer: Peer, op: str, args: dict[str, Any]) -> None:
        """The one check of who may ask for *op* (daemon.server calls it before the op's
        handler): the permission protocol.OPS declares for it, against the workspace or
        the run that the request names. What a listing shows is filtered by the same
        rule (``_usable``, ``_visible``)."""
        need = OPS[op].permission
        if op == "exec" and not self._acts_as(peer):
            me = os.geteuid()
            raise branchfs.PermissionDenied(
                f"this daemon runs as uid {me} without the privileges to act as another "
                f"user: it runs commands as uid {me} only, not as uid {peer.uid} (run "
                f"branchctl as uid {me}, or run branchd as root)")
        if need == ANYONE or self.privileged(peer):
            return
        if need == ADMIN:
            raise branchfs.PermissionDenied(f"only root or the daemon's owner may {op}")
        if need == RUN:
            record = self._run(args)
            if record.uid != peer.uid:
                raise branchfs.PermissionDenied(f"run {record.id} is not uid {peer.uid}'s")
            return
        if need not in (WORKSPACE, BRANCH):
            raise AssertionError(f"op {op} declares an unknown permission {need!r}")
        if op == "workspace-add":  # not resolved as root: whether it exists is the kernel's
            await self._check_use(peer, os.path.join(os.getcwd(), arg(args, "path", str)))
            return  # to say, for the caller
        ws = await self._named(peer, op, args)
        if ws is not None:
            await self._check_use(peer, ws.base)
            args["workspace"] = ws.name  # the handler acts on the workspace checked here
        if need == BRANCH:
            assert ws is not None  # every BRANCH op names a branch
            self._check_owner(peer, [self.store.branch(ws.name, arg(args, "name", str))])
        elif op == "workspace-remove" and arg(args, "force", bool, False):
            assert ws is not None
            self._check_owner(peer, self.store.branches(ws.name))

    def _check_owner(self, peer: Peer, branches: list[branchfs.Branch]) -> None:
        """Branches made by another user are theirs to change, run in and end."""
        for b in branches:
            if b.owner is not None and b.owner != peer.uid:
                raise branchfs.PermissionDenied(f"branch {b.name} is uid {b.owner}'s: uid "
                                                f"{peer.uid} may read it, not change it")

    async def _named(self, peer: Peer, op: str, args: dict[str, Any]
                     ) -> branchfs.Workspace | None:
        """The workspace a request names: by name or path, or as the workspace of the
        branch it names (``parent`` for create); None where it names none (a listing of
        everything). A branch named without its workspace is looked for among those the
        caller may use first: another's workspace is not named to them, not even as
        making the name ambiguous."""
        key = "parent" if op == "create" else "name"
        workspace = arg(args, "workspace", str, None)
        if workspace is not None:
            if "/" in workspace or workspace in (".", ".."):  # a path: walked as the caller
                await self._check_use(peer, os.path.join(os.getcwd(), workspace))
            return self._workspace(workspace)
        if key not in OPS[op].required and args.get(key) is None:
            if op == "create":
                raise RequestError("bad-request", "create needs a workspace or a parent")
            return None
        name = arg(args, key, str)
        usable = {ws.name for ws in await self._usable(peer)}
        live: set[str] = set()
        ended: set[str] = set()
        for b in self.store.branches(include_ended=True):
            if b.name == name and b.workspace in usable:
                (ended if b.status in ENDED else live).add(b.workspace)
        if len(live) > 1:
            raise branchfs.Conflict(f"branch name {name} is ambiguous: it exists in "
                                    f"workspaces {', '.join(sorted(live))}")
        if live or len(ended) == 1:  # the one that ended: the handler says how
            return self.store.workspace((live or ended).pop())
        if any(b.name == name for b in self.store.branches()):  # of a workspace not theirs
            raise branchfs.PermissionDenied(f"uid {peer.uid} may not use the workspace of "
                                            f"branch {name}")
        raise branchfs.NotFound(f"no branch named {name}")

    def _acts_as(self, peer: Peer) -> bool:
        return self.for_others or peer.uid == os.geteuid()

    async def _as_caller(self, peer: Peer, fn: Callable[[], Any]) -> Any:
        """``fn()`` off the event loop with the caller's filesystem credentials; where
        this daemon cannot take them (it is unprivileged, the caller root), with its own:
        root may read whatever the daemon may, so that shows root nothing it could not
        read itself."""
        if not self._acts_as(peer):
            peer = Peer(peer.pid, os.geteuid(), os.getegid())
        return await trio.to_thread.run_sync(
            ascaller.call_as, peer.uid, peer.gid, list(peer.groups), fn)

    async def _check_use(self, peer: Peer, base: str) -> None:
        """The caller may use a workspace whose base the kernel lets them read, write and
        search, reaching it by its path as they would themselves."""
        err = await self._as_caller(peer, functools.partial(ascaller.access_error, base, RWX))
        if err in (errno.ENOENT, errno.ENOTDIR):  # the caller could see that much
            raise branchfs.NotFound(f"{base} does not exist")
        if err:
            raise branchfs.PermissionDenied(f"uid {peer.uid} may not use {base}: "
                                            f"{os.strerror(err)}")

    async def _usable(self, peer: Peer) -> list[branchfs.Workspace]:
        """The workspaces the caller may use: all that a listing shows them."""
        workspaces = self.store.workspaces()
        if self.privileged(peer):
            return workspaces
        return await self._as_caller(peer, lambda: [
            ws for ws in workspaces if ascaller.access_error(ws.base, RWX) == 0])

    def _visible(self, peer: Peer, record: RunRecord) -> bool:
        return self.privileged(peer) or record.uid == peer.uid

    async def _check_writable(self, peer: Peer, branch: branchfs.Branch) -> None:
        """A commit writes as root: each of its changes must land where the caller could
        have made it themselves (a directory they may write, a file they may rewrite),
        or a user allowed into a workspace would write, through a branch of someone
        else's, into its directories that are not theirs."""
        if self.privileged(peer) or self.store.status(branch.id) != "active":
            return  # (the store refuses a commit of an ended branch)
        ws = self.store.workspace(branch.workspace)
        target = (ws.base if branch.parent is None
                  else self.path_of(self.store.branch(ws.name, branch.parent)))
        changes = await self.lanes.off_loop(
            ws.name, functools.partial(self.store.diff, ws.name, branch.name))
        made = {c.path for c in changes if c.kind == "added" and c.type == "dir"}

        def first_refused() -> str | None:
            for c in changes:
                for rel in filter(None, (c.path, c.old_path)):
                    if os.path.dirname(rel) in made:  # in a directory the commit makes theirs
                        continue
                    if c.kind == "modified" and c.type == "file":  # rewritten in place
                        where, want = os.path.join(target, rel), os.W_OK
                    else:  # an entry made, removed or replaced in its directory
                        where, want = os.path.join(target, os.path.dirname(rel)), os.W_OK | os.X_OK
                    if ascaller.access_error(where, want):
                        return rel
            return None

        refused = await self._as_caller(peer, first_refused)
        if refused is not None:
            raise branchfs.PermissionDenied(f"uid {peer.uid} could not change {refused} in "
                                            f"{target} themselves: nothing committed")

    def runs_at(self) -> str:
        """Where runs see their branch, and why, in words (for status and the log)."""
        mode, why = self.runs.manager.namespace
        if mode is None:
            return f"branch path: {why}; runs see their branch at its own path only"
        return f"workspace path ({why})"

    def path_of(self, branch: branchfs.Branch) -> str:
        return self.data.path_of(branch)  # the same path with both backends

    def describe(self, branch: branchfs.Branch) -> dict[str, Any]:
        out = branch.to_dict()
        out["path"] = self.path_of(branch)
        out["base"] = self.store.workspace(branch.workspace).base
        # an ended or invalidated branch is gone from its path: nothing serves it
        out["backend"] = (self.data.backend_of(branch.id)
                          if branch.status == ACTIVE else None)
        # the FUSE server process serving it, where one does (None: the daemon)
        out["server_pid"] = self.data.server_pid(branch.id)
        out["meta"] = self.meta.get(branch.id)
        return out

    def _subtree(self, branch: branchfs.Branch) -> list[branchfs.Branch]:
        """*branch* and its live descendants, parents first."""
        live = [b for b in self.store.branches(branch.workspace) if b.status == ACTIVE]
        out = [branch]
        for b in out:
            out.extend(c for c in live if c.parent == b.name)
        return out

    def _ended(self, branches: list[branchfs.Branch], reason: str) -> None:
        """Kill every process of branches that just ended (their runs ended by *reason*)
        and forget their metadata."""
        for b in branches:
            killed = self.runs.kill_branch(b.id, reason)
            if killed:
                log.info("killed %d processes of ended branch %s", killed, b.name)
            self.meta.drop(b.id)
        self.on_change()

    # --- operations ----------------------------------------------------------------------

    async def op_hello(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"version": VERSION, "pid": os.getpid()}

    async def op_status(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The daemon's state; the counts are of what the caller may see."""
        manager = self.runs.manager
        usable = {ws.name for ws in await self._usable(peer)}
        mine = self.privileged(peer)
        seen = [b for b in self.store.branches() if b.workspace in usable]
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime": time.time() - self.started,
            "mountpoint": str(self.mountpoint),
            "socket": str(self.socket_path),
            **self._who_may_connect(),
            "state_dir": str(self.store.state_dir),
            "workspaces": len(usable),
            "branches": len(seen),
            # branches whose commit waits for `branchctl resolve`, with the paths
            "conflicted": [f"{b.workspace}/{b.name}: {', '.join(b.conflicts)}"
                           for b in seen if b.conflicts],
            "runs_active": sum(1 for r in self.runs.runs.values()
                               if r.result is None and self._visible(peer, r)),
            "backend": self.data.backend,
            "backend_reason": self.data.reason,
            "runs_at": self.runs_at(),
            "cgroup_layout": manager.layout.kind,
            "cgroup_warnings": list(manager.warnings),
            "recovered": list(self.store.recovered) if mine else [],  # names others' branches
        }

    def _who_may_connect(self) -> dict[str, Any]:
        """The socket's mode and group as they are now (an administrator may have changed
        them), and the uids its peer check lets in."""
        uids = sorted({0, os.geteuid(), *self.allow_uids})
        try:
            st = os.stat(self.socket_path)
        except OSError:  # removed behind the daemon's back: nobody new can connect
            return {"socket_mode": None, "socket_group": None, "allowed_uids": uids}
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return {"socket_mode": f"{stat.S_IMODE(st.st_mode):04o}", "socket_group": group,
                "allowed_uids": uids}

    async def op_workspace_add(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict:
        path = self.store.resolve_path(arg(args, "path", str))
        ws = self.store.add_workspace(path, arg(args, "name", str, None), owner=peer.uid)
        self.on_change()
        return ws.to_dict()

    async def op_workspace_list(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict:
        return {"workspaces": [ws.to_dict() for ws in await self._usable(peer)]}

    async def op_workspace_remove(self, peer: Peer, args: dict[str, Any],
                                  fds: list[int]) -> dict:
        ws = self._workspace(arg(args, "workspace", str))
        force = bool(arg(args, "force", bool, False))
        async with self._lane(ws.name):
            if force:
                self.data.detach([b for b in self.store.branches(ws.name)
                                  if b.status == "active"])
            removed = self.store.remove_workspace(ws.name, force=force)
        self._ended(removed, "discard")
        return {"workspace": ws.name, "discarded": [b.name for b in removed]}

    async def op_create(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        parent_name = arg(args, "parent", str, None)
        if parent_name is not None:
            parent = self._active(self._branch({**args, "name": parent_name}))
            ws = self.store.workspace(parent.workspace)
        else:
            ws = self._workspace(arg(args, "workspace", str))
        async with self._lane(ws.name):  # not over a base that a commit is changing
            return await self._create(peer, ws, args)

    async def _create(self, peer: Peer, ws: branchfs.Workspace, args: dict[str, Any]
                      ) -> dict[str, Any]:
        name = arg(args, "name", str)
        parent_name = arg(args, "parent", str, None)
        meta = arg(args, "meta", dict, None)
        if meta:
            self.meta.check(meta, META_LIMIT)
        policy = arg(args, "on_sibling_commit", str, branchfs.store.REBASE)
        session = None
        if arg(args, "session", bool, False):  # the connection's, discarded if it dies
            session = SESSION.get()
            if session is None:
                raise RequestError("bad-request", "no session on this connection")
        branch = self.store.create_branch(ws.name, name, parent_name,
                                          on_sibling_commit=policy, owner=peer.uid)
        if session is not None:
            session.branches.append((branch.workspace, branch.name, branch.id))
        if meta:
            self.meta.set(branch.id, meta)
        await self.data.serve(branch)
        self.on_change()
        return self.describe(branch)

    async def op_list(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        workspace = arg(args, "workspace", str, None)
        if workspace is not None:
            workspace = self._workspace(workspace).name
            await self._settled(workspace)
        else:
            for w in self.store.workspaces():
                self.store.refresh(w.name)
        ended = bool(arg(args, "all", bool, False))
        branches = self.store.branches(workspace, include_ended=ended)
        if workspace is None and not self.privileged(peer):
            usable = {ws.name for ws in await self._usable(peer)}
            branches = [b for b in branches if b.workspace in usable]
        await self.data.heal(branches)
        return {"branches": [self.describe(b) for b in branches]}

    async def op_info(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        branch = self._branch(args)
        await self._settled(branch.workspace)
        branch = self._branch(args)  # as it is now
        await self.data.heal([branch])
        out = self.describe(branch)
        out["runs"] = [
            r.describe() for r in self.runs.runs.values()
            if r.branch_id == branch.id and self._visible(peer, r)
        ]
        return out

    async def op_set_meta(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict:
        """Merge keys into the branch's metadata (a null value removes the key)."""
        branch = self._active(self._branch(args))
        meta = {**self.meta.get(branch.id), **arg(args, "meta", dict)}
        meta = {k: v for k, v in meta.items() if v is not None}
        self.meta.check(meta, META_LIMIT)
        self.meta.set(branch.id, meta)
        return self.describe(branch)

    async def op_diff(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        branch = self._active(self._branch(args))
        ws = self.store.workspace(branch.workspace)
        paths = arg(args, "paths", list, None)
        if paths is not None and not all(isinstance(p, str) for p in paths):
            raise RequestError("bad-request", "'paths' must be a list of strings")
        async with self._lane(ws.name):  # no commit moves the files while they are read
            return await self._diff(peer, branch, ws, paths, args)

    async def _diff(self, peer: Peer, branch: branchfs.Branch, ws: branchfs.Workspace,
                    paths: list[str] | None, args: dict[str, Any]) -> dict[str, Any]:
        found = await self.lanes.off_loop(
            ws.name, functools.partial(self.store.diff, ws.name, branch.name))
        changes = diffpage.select(found, paths)
        out: dict[str, Any] = {"stat": diffpage.stat(changes), "total": len(changes)}
        if arg(args, "stat", bool, False):
            return out
        page, out["next"] = diffpage.page(changes, arg(args, "offset", int, 0))
        out["changes"] = [c.to_dict() for c in page]
        if arg(args, "patch", bool, False):
            old_root = (ws.base if branch.parent is None
                        else self.path_of(self.store.branch(ws.name, branch.parent)))
            make = functools.partial(patch.patch, page, old_root, self.path_of(branch),
                                     diffpage.PATCH_BYTES)
            # off the event loop (the reads go through our own FUSE mount), with the
            # caller's own permissions: a patch shows only what the caller could read
            out["patch"] = await self._as_caller(peer, make)
        return out

    async def op_commit(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        branch = self._branch(args)
        force = bool(arg(args, "force", bool, False))
        async with self._lane(branch.workspace):
            await self._check_writable(peer, branch)
            if self.runs.kill_branch(branch.id, "commit"):
                log.info("killed the remaining processes of %s before its commit", branch.name)
            # On a worker thread, the workspace quiesced: its FUSE requests wait, and no
            # kernel overlay writes the upper dir while the commit moves it away (one
            # refused is served again).
            result = await self.lanes.off_loop(
                branch.workspace,
                functools.partial(self.store.commit, branch.workspace, branch.name,
                                  force=force),
                moving=[branch])
            await self._after_commit(result)
        return result.to_dict()

    @asynccontextmanager
    async def _lane(self, workspace: str) -> AsyncIterator[None]:
        """Hold *workspace*'s lane (daemon.lanes), a commit of it that failed half way
        finished first."""
        async with self.lanes.hold(workspace):
            await self._settle(workspace)
            yield

    @asynccontextmanager
    async def _quiesced(self, workspace: str) -> AsyncIterator[None]:
        """The data plane holds *workspace* still (a FUSE server process writes
        nothing) while the loop itself changes a branch's upper dir (a merge)."""
        await self.data.quiesce(workspace, [])
        try:
            yield
        finally:
            await self.data.resume(workspace, [])

    async def _settled(self, workspace: str) -> None:
        """For a request that holds no lane: finish a commit of *workspace* that failed
        half way, if there is one (waiting for the lane only then)."""
        if self.store.pending(workspace):
            async with self._lane(workspace):
                pass

    async def _settle(self, workspace: str) -> None:
        """Finish a commit of *workspace* that failed half way before anything else is
        done there (Store.finish_pending raises Busy while it still cannot be); the
        caller holds the lane."""
        if not self.store.pending(workspace):
            return
        result = await self.lanes.off_loop(
            workspace, functools.partial(self.store.finish_pending, workspace), moving=[])
        if result is not None:
            await self._after_commit(result)
            # start-up served none of this workspace's branches while its commit was
            # pending (Overlays.serve_all): the fast path for all of them now
            for b in self.store.branches(workspace):
                if b.status == "active":
                    await self.data.serve(b)

    async def _after_commit(self, result: branchfs.CommitResult) -> None:
        """The backends had the commit's events (the overlays detached the ended
        branches and remount the parent); the runs of the ended branches end."""
        branch = self.store.branch(result.workspace, result.branch)
        invalidated = [self.store.branch(result.workspace, n) for n in result.invalidated]
        await self.data.settle()
        self._ended([branch], "commit")
        self._ended(invalidated, "invalidated")

    async def op_rebase(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        branch = self._active(self._branch(args))
        # Not mounted again on the overlay backend, unlike FUSE's caches: merges are
        # written in place (the kernel reads the file it has), and a new mount would
        # leave its running processes on the old one, blind to what is written later
        async with self._lane(branch.workspace), self._quiesced(branch.workspace):
            merged, conflicts = self.store.rebase(branch.workspace, branch.name)
        return {"branch": branch.name, "merged": merged, "conflicts": conflicts}

    async def op_resolve(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        branch = self._active(self._branch(args))
        how = arg(args, "how", str)
        async with self._lane(branch.workspace), self._quiesced(branch.workspace):
            left = self.store.resolve(branch.workspace, branch.name, arg(args, "path", str),
                                      how)
            if how == "theirs":  # an entry of its upper dir went behind the kernel's back
                await self.data.remount(branch)
        return {"branch": branch.name, "conflicts": left}

    async def op_discard(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        branch = self._branch(args)
        async with self._lane(branch.workspace):  # a branch with a journal is never discarded
            return await self._discard(branch)

    async def _discard(self, branch: branchfs.Branch) -> dict[str, Any]:
        subtree = self._subtree(branch)
        self.data.detach(subtree)
        try:
            removed = self.store.discard(branch.workspace, branch.name)
        except Exception:
            # refused (a full disk): the branches stay, and so does their fast path
            for b in subtree:
                if self.store.status(b.id) == "active":
                    await self.data.serve(b)
            raise
        self._ended(removed, "discard")
        return {"discarded": [b.name for b in removed]}

    async def op_exec(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Run a command for the branch. By default it sees the branch at the workspace's
        own path, in a private mount namespace (``at_branch_path`` opts out, and is where
        runs go when this host gives no namespace); ``cwd`` is the directory relative
        to the workspace's root to start in."""
        branch = self._active(self._branch(args))
        async with self._lane(branch.workspace):  # not into a commit of the workspace
            return await self._exec(peer, args, fds)

    async def _exec(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        branch = self._active(self._branch(args))  # as it is now
        ws = self.store.workspace(branch.workspace)
        await self.data.heal([branch])  # the run should get the fast path
        argv = arg(args, "argv", list)
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise RequestError("bad-request", "argv must be a non-empty list of NUL-free strings")
        env = arg(args, "env", dict, None)
        if env is None:
            env = {"PATH": os.defpath}
        if not all(isinstance(v, str) and "\0" not in k + v and "=" not in k and k
                   for k, v in env.items()):
            raise RequestError("bad-request", "env must map names to strings without NUL or '='")
        rel = _relative(arg(args, "cwd", str, ""))
        try:
            limits = cgroups.Limits.from_dict(arg(args, "limits", dict, None) or {})
        except (TypeError, ValueError) as e:
            raise RequestError("bad-request", f"bad limits: {e}") from None
        if fds and len(fds) != 3:
            raise RequestError("bad-request", "pass three descriptors: stdin, stdout, stderr")
        path = self.path_of(branch)
        at_branch = bool(arg(args, "at_branch_path", bool, False))
        if not at_branch and self.runs.manager.bind_unavailable is not None:
            at_branch = True  # said once, at start and in status: see op_status
        bind = None
        root = path
        if not at_branch:
            bind = Bind(path, ws.base, self.store.base_fd(ws.name))
            root = ws.base
        env.update(BRANCHD_BRANCH=branch.name, BRANCHD_WORKSPACE=ws.name, BRANCHD_PATH=root)
        try:
            record = await self.runs.start(
                branch_id=branch.id, argv=argv, cwd=os.path.join(root, rel),
                env=env, limits=limits, stdio=fds or None, bind=bind, uid=peer.uid,
                gid=peer.gid,
            )
        except cgroups.SpawnError as exc:
            raise RequestError(SPAWN_ERRORS.get(exc.errno or 0, "bad-request"), str(exc)) from None
        return record.describe()

    async def op_wait(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        record = self._run(args)
        await record.done.wait()
        return record.describe()

    async def op_kill(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        record = self._run(args)
        self.runs.kill(record, "kill")
        return {"run": record.id}

    async def op_fsck(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Check the state against the disk and the kernel (daemon.fsck); ``repair``
        puts right what can be without losing anything."""
        check = fsck.Fsck(self.store, self.data.overlays, self.runs,
                          mountpoint=str(self.mountpoint),
                          repair=bool(arg(args, "repair", bool, False)))
        findings = await check.run()
        return {"findings": [f.to_dict() for f in findings],
                "open": sum(1 for f in findings if f.open),
                "cgroup_dirs": self.runs.manager.base_dirs}  # where its runs' cgroups go

    async def op_shutdown(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict:
        self.shutdown()
        return {}

    async def op_session_end(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict:
        session = SESSION.get()
        if session is None:
            raise RequestError("bad-request", "no session on this connection")
        discard = bool(arg(args, "discard", bool, False))
        held, session.branches = session.branches, []
        return {"discarded": await self.end_session(peer, held) if discard else []}

    async def end_session(self, peer: Peer, held: list[tuple[str, str, str]]) -> list[str]:
        """Discard what a session still holds: the branches of it that are still the
        same and active (committed or discarded since, or ended with a parent, they
        are left as they are). Each is tried: one refused does not keep the others."""
        discarded: list[str] = []
        for workspace, name, bid in reversed(held):  # children before their parents
            if self.store.status(bid) != ACTIVE:
                continue
            try:
                reply = await self.op_discard(peer, {"workspace": workspace, "name": name}, [])
            except Exception as e:
                log.warning("could not discard session branch %s of %s: %s", name,
                            workspace, e)
                continue
            discarded.extend(reply["discarded"])
        return discarded


HANDLERS: dict[str, Handler] = {
    name[3:].replace("_", "-"): getattr(Handlers, name)
    for name in dir(Handlers)
    if name.startswith("op_")
}


def _relative(cwd: str) -> str:
    """A directory relative to a workspace's root, as a run's starting point."""
    parts = [p for p in cwd.split("/") if p]
    if cwd.startswith("/") or any(p in (".", "..") or "\0" in p for p in parts):
        raise RequestError("bad-request", f"cwd {cwd!r} must be relative to the workspace, "
                           "without '.', '..' or NUL")
    return "/".join(parts)

