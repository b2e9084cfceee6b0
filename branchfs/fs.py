"""The pyfuse3 adapter: FUSE requests onto the Store's branch views.

Mount layout: ``/`` lists workspaces, ``/<ws>/`` the active branches of a
workspace (nested ones flat), ``/<ws>/<branch>/`` is the branch's merged view.

Every handler runs inside one error boundary (``_boundary``): OSError becomes
its errno, a domain error its own errno, anything else is logged with its
traceback, answered with EIO and puts only that branch into failsafe mode
(reads EIO, writes EPERM) so the mount itself never dies of one bad request.
Handlers await nothing but the gate of a quiesced workspace (``quiesce``,
while a commit changes its files off the loop): each otherwise runs to
completion on the trio thread, the thread the daemon answers requests on.
The daemon reaches this adapter as a data-plane backend (``mount.FuseBackend``):
Store events come through ``on_event``, never a subscription of its own.

Inodes are ours, not the backing files': a node is a name in a view
(parent node + name, so renaming a directory renames its subtree for free),
and keeps its number while the name lives, across copy-up and rename (git's
index relies on st_ino). Kernel caches (entry/attr timeouts, negative
entries for names missing in a top-level branch, page cache kept across opens)
are invalidated from a separate thread (``Notifier``) for exactly what commit,
discard and writes through a parent branch change; a branch whose upper dir
a run's own kernel overlay writes (``Store.shared``) is cached by nothing
while it does. The writeback cache stays
off: with it the kernel trusts its own size of a cached file over ours, so a
file changed behind it (a parent branch's write seen by a child, a commit into
the branch, the base edited outside) would keep its old size.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .backing import PRIVATE_XATTR_PREFIX
from .errors import BranchFSError
from .model import ACTIVE, INVALIDATED
from .store import Event, Store
from .view import Entry, View

if TYPE_CHECKING:
    from .replica import Replica

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
ENTRY_TIMEOUT = 10.0  # seconds the kernel may trust a name; commit/discard invalidate
ATTR_TIMEOUT = 10.0
DRAIN_TIMEOUT = 1.0  # longest wait for the kernel after a Store change (see settle)
CAP_FSETID = 4  # linux/capability.h


@dataclass
class Node:
    """An inode known to the kernel. View nodes have a branch id; the branch's
    root node has ``parent`` None. ``links`` are all (parent ino, name) pairs
    naming it (more than one after link())."""

    ino: int
    kind: str  # "root" | "ws" | "view"
    ws: str | None = None
    bid: str | None = None
    parent: int | None = None
    name: str = ""
    is_dir: bool = True
    lookups: int = 0
    links: set[tuple[int, str]] = field(default_factory=set)
    handles: set[int] = field(default_factory=set)
    # xattr names of the entry and when they were read: the kernel asks for
    # security.capability before every write(2), and mostly the answer is "none"
    xattrs: tuple[frozenset[str], float] | None = None


@dataclass
class Handle:
    ino: int
    fd: int
    upper: bool  # opened on the branch's own copy (else a lower layer's, read-only)
    # (uid, gid, pid) of a caller other than root that opened it for writing:
    # its writes may clear set-id bits (see Operations._kill_privs)
    writer: tuple[int, int, int] | None = None


def _writer(ctx: pyfuse3.RequestContext) -> tuple[int, int, int] | None:
    """Who may have set-id bits cleared by its writes; None for root (taken to
    hold CAP_FSETID, as it does unless it dropped it)."""
    return None if ctx.uid == 0 else (ctx.uid, ctx.gid, ctx.pid)


def _killed_bits(st: os.stat_result, writer: tuple[int, int, int]) -> int:
    """The set-id bits the kernel clears when *writer* writes to or truncates a
    regular file without CAP_FSETID: S_ISUID, and S_ISGID when the file is
    group-executable or the writer is not in its group. The FUSE client sends
    a chmod for less (fuse_setattr knows nothing of the caller's groups): a
    writer outside the group left a setgid file setgid. The writer's
    capabilities and groups are read from its /proc entry, only for a set-id
    file; one gone already counts as having neither."""
    mode = st.st_mode
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return 0
    _, gid, pid = writer
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "CapEff" and int(value, 16) & (1 << CAP_FSETID):
                    return 0
                if key == "Groups":
                    groups.update(int(g) for g in value.split())
    except (OSError, ValueError):
        pass
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or st.st_gid not in groups):
        kill |= stat.S_ISGID
    return kill


class Notifier:
    """Runs kernel cache invalidations in order on its own thread: calling them
    from a request handler for the same inode could deadlock."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, int, bytes] | threading.Event | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="branchfs-notify", daemon=True)
        self._thread.start()

    def inode(self, ino: int) -> None:
        self._queue.put(("inode", ino, b""))

    def entry(self, parent: int, name: str) -> None:
        self._queue.put(("entry", parent, os.fsencode(name)))

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued so far reached the kernel; False if that
        took longer than *timeout* (a request in flight holds what the kernel
        needs; it is answered once the caller returns to the event loop)."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            kind, ino, name = item
            try:
                if kind == "inode":
                    pyfuse3.invalidate_inode(ino)
                else:
                    pyfuse3.invalidate_entry(ino, name)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF):
                    log.warning("cache invalidation of inode %d failed: %s", ino, exc)
            except Exception:
                log.exception("cache invalidation of inode %d failed", ino)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)


class Operations(pyfuse3.Operations):
    """FUSE request handlers over a Store.

    Invariants: ``dentries`` maps (parent ino, name) to the node named so, for
    every name in ``node.links``; a node leaves ``nodes`` only when the kernel
    forgot it and no name or open handle refers to it; a view node whose
    branch is no longer active answers ESTALE.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False  # see docs/format.md: commit must see every write
    enable_acl = False

    def __init__(self, store: Store | Replica, branch: tuple[str, str] | None = None) -> None:
        """Serve every workspace and branch of *store*, or with *branch* (workspace,
        branch id) only that branch, at the mount's root (a FUSE server process's
        mount on the branch's own directory, ``branchfs.child``)."""
        super().__init__()
        self.store = store
        self.dentries: dict[tuple[int, str], int] = {}
        self.roots: dict[str, int] = {}  # branch id -> root node
        if branch is None:
            self.nodes: dict[int, Node] = {ROOT: Node(ROOT, "root", lookups=1)}
        else:
            ws, bid = branch
            self.nodes = {ROOT: Node(ROOT, "view", ws=ws, bid=bid, lookups=1)}
            self.roots[bid] = ROOT
        # called with (branch id, parts, name changed) after a write in a branch
        # with live descendants: where some of them are served by other processes
        self.relay: Callable[[str, tuple[str, ...], bool], None] | None = None
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, list[tuple[str, int, pyfuse3.EntryAttributes]]] = {}
        self.failsafe: set[str] = set()
        self.notifier: Notifier | None = None
        self._inos = itertools.count(ROOT + 1)
        self._fhs = itertools.count(1)
        self._current: str | None = None  # branch of the request being handled
        self._descendants: dict[str, list[str]] = {}
        self._started = time.time_ns()
        # workspace -> the gate its requests wait at while a long operation (a commit)
        # changes its files off the event loop (quiesce/resume; see _wait)
        self.quiesced: dict[str, trio.Event] = {}
        self._undrained = False  # invalidations queued since the last settle()
        self._rebuild_descendants()

    # -- plumbing -----------------------------------------------------------

    def start(self) -> None:
        self.notifier = Notifier()

    def stop(self) -> None:
        for gate in self.quiesced.values():  # nothing waits for a commit that will not end
            gate.set()
        self.quiesced.clear()
        if self.notifier is not None:
            self.notifier.close()
            self.notifier = None

    @contextmanager
    def _boundary(self) -> Iterator[None]:
        """The one place where errors become errnos."""
        self._current = None
        try:
            yield
        except FUSEError:
            raise
        except BranchFSError as exc:
            raise FUSEError(exc.errno) from None
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            bid = self._current
            log.exception("internal error in a request%s", f" (branch {bid} now failsafe)"
                          if bid else "")
            if bid is not None:
                self.failsafe.add(bid)
            raise FUSEError(errno.EIO) from None

    def _node(self, ino: int) -> Node:
        try:
            node = self.nodes[ino]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None
        self._current = node.bid
        return node

    def _view(self, node: Node, write: bool = False) -> View:
        if node.kind != "view":
            raise FUSEError(errno.EPERM if write else errno.EISDIR)
        assert node.bid is not None
        if self.store.status(node.bid) != ACTIVE:
            raise FUSEError(errno.ESTALE)
        if node.bid in self.failsafe:
            raise FUSEError(errno.EPERM if write else errno.EIO)
        return self.store.view_by_id(node.bid)

    def _parts(self, node: Node) -> tuple[str, ...]:
        out: list[str] = []
        while node.parent is not None:
            out.append(node.name)
            node = self.nodes[node.parent]
        out.reverse()
        return tuple(out)

    def _child_parts(self, parent: Node, name: str) -> tuple[str, ...]:
        if not name or name in (".", "..") or "/" in name:
            raise FUSEError(errno.EINVAL)
        return (*self._parts(parent), name)

    def _attr(self, node: Node, st: os.stat_result | None = None,
              volatile: bool = False) -> pyfuse3.EntryAttributes:
        """Attributes for the kernel. *volatile* ones (seen through a parent
        branch's upper dir, which writes in that branch change) are not cached."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = 0 if volatile else ENTRY_TIMEOUT
        a.attr_timeout = 0 if volatile else ATTR_TIMEOUT
        if st is None:  # a virtual directory
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_uid = self.store.workspace(node.ws).owner if node.ws else 0
            a.st_gid = 0
            a.st_size = 0
            a.st_blksize = 4096
            a.st_blocks = 0
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started
            return a
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _volatile(self, node: Node, view: View, e: Entry) -> bool:
        """Whether what *e* says may change behind the daemon: an entry of a parent
        branch's upper dir, or anything of a branch a run's own overlay writes."""
        return 0 < e.layer < len(view.layers) - 1 or self.store.shared(node.bid or "")

    def _node_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.kind != "view":
            return self._attr(node)
        view = self._view(node)
        if not node.links and node.parent is not None:  # unlinked, still open
            for fh in node.handles:
                return self._attr(node, os.fstat(self.handles[fh].fd))
            raise FUSEError(errno.ENOENT)
        e = view.need(self._parts(node))
        return self._attr(node, e.st, self._volatile(node, view, e))

    def _new_node(self, **kw: object) -> Node:
        node = Node(next(self._inos), **kw)  # type: ignore[arg-type]
        self.nodes[node.ino] = node
        return node

    def _bind(self, parent: Node, name: str, e: Entry) -> Node:
        """The node for *name* in *parent* (a view dir), made if new or if the
        name now holds a different kind of entry."""
        ino = self.dentries.get((parent.ino, name))
        if ino is not None:
            node = self.nodes[ino]
            if node.is_dir == e.is_dir:
                return node
            self._unname(parent.ino, name)
        node = self._new_node(kind="view", ws=parent.ws, bid=parent.bid, parent=parent.ino,
                              name=name, is_dir=e.is_dir)
        node.links.add((parent.ino, name))
        self.dentries[(parent.ino, name)] = node.ino
        return node

    def _unname(self, parent: int, name: str) -> None:
        ino = self.dentries.pop((parent, name), None)
        if ino is None:
            return
        node = self.nodes[ino]
        node.links.discard((parent, name))
        if (node.parent, node.name) == (parent, name) and node.links:
            node.parent, node.name = next(iter(node.links))
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        gone = not node.links or (node.bid is not None and self.store.status(node.bid) != ACTIVE)
        if node.kind == "view" and node.lookups <= 0 and not node.handles and gone:
            del self.nodes[node.ino]
            for link in node.links:
                if self.dentries.get(link) == node.ino:
                    del self.dentries[link]
            if node.parent is None and node.bid is not None:
                self.roots.pop(node.bid, None)

    def _branch_root(self, ws: str, bid: str) -> Node:
        ino = self.roots.get(bid)
        if ino is not None:
            return self.nodes[ino]
        node = self._new_node(kind="view", ws=ws, bid=bid, parent=None, name="", is_dir=True)
        self.roots[bid] = node.ino
        return node

    def _ws_node(self, ws: str) -> Node:
        ino = self.dentries.get((ROOT, ws))
        if ino is not None:
            return self.nodes[ino]
        node = self._new_node(kind="ws", ws=ws, parent=ROOT, name=ws)
        node.links.add((ROOT, ws))
        self.dentries[(ROOT, ws)] = node.ino
        return node

    # -- tree-change notifications ----------------------------------------

    def _rebuild_descendants(self) -> None:
        kids: dict[str, list[str]] = {}
        for b in self.store.branches():
            if b.parent is not None and b.status == ACTIVE:
                parent = self.store.branch(b.workspace, b.parent)
                kids.setdefault(parent.id, []).append(b.id)
        out: dict[str, list[str]] = {}
        for top in kids:
            todo, seen = [top], []
            while todo:
                for k in kids.get(todo.pop(), []):
                    seen.append(k)
                    todo.append(k)
            out[top] = seen
        self._descendants = out

    def quiesce(self, ws: str) -> None:
        """Hold every request of workspace *ws* (its branches' files, its list of
        branches) at a gate until ``resume``: a long operation changes them."""
        self.quiesced.setdefault(ws, trio.Event())

    def resume(self, ws: str) -> None:
        gate = self.quiesced.pop(ws, None)
        if gate is not None:
            gate.set()

    async def _wait(self, ino: int) -> None:
        """Hold a request of a quiesced workspace until it resumes. The event loop
        goes on (control requests are answered); the mount's one pyfuse3 worker
        task waits (see mount.serve), and with it the FUSE requests behind this one."""
        node = self.nodes.get(ino)
        while node is not None and node.ws is not None:
            gate = self.quiesced.get(node.ws)
            if gate is None:
                return
            await gate.wait()
            node = self.nodes.get(ino)

    def _fh_ino(self, fh: int) -> int:
        h = self.handles.get(fh)
        return h.ino if h is not None else ROOT

    async def settle(self) -> None:
        """Wait, off the event loop (the kernel may need a request answered first),
        until the invalidations queued by ``on_event`` reached the kernel."""
        n = self.notifier
        if n is None or not self._undrained:
            return
        self._undrained = False
        if not await trio.to_thread.run_sync(n.drain, DRAIN_TIMEOUT):
            log.warning("kernel cache invalidation after a Store change is still pending")

    def on_event(self, ev: Event) -> None:
        """A Store change (made by the daemon, never inside a FUSE request, on the
        event loop thread): queue the invalidation of what it changed; ``settle``
        waits for the kernel to have dropped it, so the change is visible through
        the mount when the daemon answers."""
        if ev.kind in ("branch-created", "branch-ended"):
            self._rebuild_descendants()
        n = self.notifier
        if n is None:
            return
        if ev.kind == "branch-created":
            # Nothing to invalidate: a branch name that failed to resolve is never
            # cached (ENOENT, no negative entry) and an ended branch's name was
            # invalidated when it ended, so the new name resolves at once. An
            # invalidation here would even harm: it can reach the kernel after the
            # daemon mounted the branch's kernel overlay on this name, and the
            # kernel detaches mounts from a dentry it invalidates.
            return
        self._invalidate_for(n, ev)
        self._undrained = True

    def _invalidate_for(self, n: Notifier, ev: Event) -> None:
        if ev.kind in ("workspace-added", "workspace-removed"):
            n.entry(ROOT, ev.workspace)
            return
        b = ev.branch
        assert b is not None
        wsino = self.dentries.get((ROOT, ev.workspace))
        if ev.kind in ("branch-ended", "branch-shared"):
            shared = ev.kind == "branch-shared"
            if not shared:
                self.failsafe.discard(b.id)
            if wsino is not None and not shared:
                n.entry(wsino, b.name)
            # That name's invalidation drops the kernel's unused entries below it.
            # What is still held needs its own: open files and directories (a cwd)
            # of a committed or discarded branch, everything of an invalidated one
            # (a file mapped after its fd was closed must not keep the old parent's
            # pages), and of a shared one (a run's overlay writes its files from now
            # on). One per file of a 10k-file branch took 100 ms. A shared branch keeps
            # the names of its directories, its own included: another run of it may be
            # binding it this instant, or stand in one, and the kernel refuses to bind
            # an invalidated directory (ENOENT), as getcwd() fails in one; the names of
            # its files go one by one instead.
            everything = b.status == INVALIDATED or shared
            for node in list(self.nodes.values()):
                if node.bid == b.id and (everything or node.handles or node.is_dir):
                    n.inode(node.ino)
                    if shared and not node.is_dir:
                        for parent, name in node.links:
                            n.entry(parent, name)
        elif ev.kind in ("committed", "rebased") and ev.target is not None:
            self._invalidate_paths(ev.target, ev.paths)

    def _invalidate_paths(self, bid: str, paths: Sequence[str]) -> None:
        """Drop the kernel's view of *paths* (and everything below them) in one branch."""
        n = self.notifier
        root = self.roots.get(bid)
        if n is None or root is None:
            return
        for p in paths:
            parts = p.split("/")
            parent = self._walk(root, parts[:-1])
            if parent is not None:
                n.entry(parent, parts[-1])
        changed = [p.split("/") for p in paths]
        for node in list(self.nodes.values()):
            if node.bid != bid or node.kind != "view":
                continue
            try:
                at: list[str] | None = list(self._parts(node))
            except KeyError:  # an ancestor already forgotten (seen once after a rebase, in
                at = None  # the unprivileged pass; how, not found): its path is unknown
            if at is None or any(at[: len(c)] == c for c in changed):
                node.xattrs = None
                n.inode(node.ino)

    def _walk(self, ino: int, parts: Sequence[str]) -> int | None:
        for name in parts:
            nxt = self.dentries.get((ino, name))
            if nxt is None:
                return None
            ino = nxt
        return ino

    def _changed(self, node: Node, parts: Sequence[str], name_changed: bool) -> None:
        """A write through *node*'s branch changed *parts*: branches below it that
        still see that entry through it must not keep a cached copy."""
        assert node.bid is not None
        kids = self._descendants.get(node.bid, ())
        for kid in kids:
            self.changed_in(kid, parts, name_changed)
        if kids and self.relay is not None:
            self.relay(node.bid, tuple(parts), name_changed)

    def changed_in(self, kid: str, parts: Sequence[str], name_changed: bool) -> None:
        """A write through an ancestor of *kid* changed *parts*: drop what the kernel
        holds of them in *kid* (nothing if *kid* is not served here)."""
        n = self.notifier
        root = self.roots.get(kid)
        if root is None:
            return
        if name_changed and parts and n is not None:
            parent = self._walk(root, parts[:-1])
            if parent is not None:
                n.entry(parent, parts[-1])
        target = self._walk(root, parts)
        if target is not None:
            self.nodes[target].xattrs = None
            if n is not None:
                n.inode(target)

    def forget_all(self, bid: str) -> None:
        """Drop everything the kernel holds of branch *bid* (a change too large to
        list path by path); ``settle`` waits for it."""
        n = self.notifier
        if n is None:
            return
        for node in list(self.nodes.values()):
            if node.bid == bid:
                node.xattrs = None
                n.inode(node.ino)
        self._undrained = True

    # -- lookups and attributes ----------------------------------------------

    def _lookup(self, pino: int, name: str) -> pyfuse3.EntryAttributes:
        parent = self._node(pino)
        if name == ".":
            node = parent
        elif name == "..":
            node = self.nodes[parent.parent] if parent.parent is not None else parent
            if parent.kind == "view" and parent.parent is None and parent.ino != ROOT:
                node = self._ws_node(parent.ws or "")
        elif parent.kind == "root":
            self.store.workspace(name)
            node = self._ws_node(name)
        elif parent.kind == "ws":
            assert parent.ws is not None
            b = self.store.branch(parent.ws, name)
            if b.status != ACTIVE:
                raise FUSEError(errno.ENOENT)
            node = self._branch_root(parent.ws, b.id)
        else:
            view = self._view(parent)
            e = view.lookup(self._child_parts(parent, name))
            if e is None:
                # a parent branch's writes, or a run's overlay, may make the name
                if len(view.layers) > 2 or self.store.shared(parent.bid or ""):
                    raise FUSEError(errno.ENOENT)
                return self._negative()
            node = self._bind(parent, name, e)
            node.lookups += 1
            return self._attr(node, e.st, self._volatile(node, view, e))
        node.lookups += 1
        return self._node_attr(node)

    @staticmethod
    def _negative() -> pyfuse3.EntryAttributes:
        """A missing name the kernel may remember for ENTRY_TIMEOUT (its own creates
        replace it; commits and a parent's writes invalidate it like a name)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = ENTRY_TIMEOUT
        return a

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.quiesced:
            await self._wait(parent_inode)
        with self._boundary():
            return self._lookup(parent_inode, os.fsdecode(name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None or node.kind != "view":
                continue
            node.lookups -= n
            try:
                self._maybe_drop(node)
            except Exception:  # forget must never raise
                log.exception("forget of inode %d failed", ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            return self._node_attr(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            view = self._view(node, write=True)
            if not node.links and node.parent is not None:
                return self._setattr_open(node, attr, fields)
            parts = self._parts(node)
            size = attr.st_size if fields.update_size else None
            if size is not None and fh is not None and self.handles[fh].upper:
                os.ftruncate(self.handles[fh].fd, size)
                size = None
            owner = times = None
            if fields.update_uid or fields.update_gid:
                owner = (attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                times = (attr.st_atime_ns if fields.update_atime else None,
                         attr.st_mtime_ns if fields.update_mtime else None)
            mode = attr.st_mode if fields.update_mode else None
            if fields.update_size and (writer := _writer(ctx)) is not None:
                cur = view.stat(parts)  # a truncate clears set-id bits as a write does
                kill = _killed_bits(cur, writer)
                if kill:
                    mode = (cur.st_mode if mode is None else mode) & ~kill
            if size is None and mode is None and owner is None and times is None:
                st = view.stat(parts)  # nothing to copy up for
            else:
                st = view.set_attrs(parts, size=size, mode=mode, owner=owner, times=times)
                self._refresh_handles(node, view)
            self._changed(node, parts, name_changed=False)
            return self._attr(node, st)

    def _setattr_open(self, node: Node, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields) -> pyfuse3.EntryAttributes:
        """setattr on a file that is unlinked but still open: through its fd."""
        fd = next(self.handles[fh].fd for fh in node.handles)
        if fields.update_size:
            os.ftruncate(fd, attr.st_size)
        if fields.update_mode:
            os.fchmod(fd, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(fd, attr.st_uid if fields.update_uid else -1,
                      attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(fd)
            os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                             attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attr(node, os.fstat(fd))

    def _refresh_handles(self, node: Node, view: View) -> None:
        """After a copy-up, point read-only handles at the new copy, so every
        reader sees the writer's data (one page cache per inode in the kernel)."""
        stale = [self.handles[fh] for fh in node.handles if not self.handles[fh].upper]
        if not stale or not node.links:
            return
        parts = self._parts(node)
        if view.lookup(parts) is None or view.need(parts).layer != 0:
            return
        for h in stale:
            fd = view.open_read(parts, os.O_RDONLY)
            os.dup2(fd, h.fd)
            os.close(fd)
            h.upper = True

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            return os.fsencode(self._view(node).readlink(self._parts(node)))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with self._boundary():
            sv = os.statvfs(self.store.state_dir)
            out = pyfuse3.StatvfsData()
            for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
                setattr(out, f, getattr(sv, f))
            return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if self.quiesced:
            await self._wait(inode)
        return True  # default_permissions: the kernel checks

    # -- namespace -----------------------------------------------------------

    def _owner(self, view: View, parts: Sequence[str], ctx: pyfuse3.RequestContext,
               mode: int) -> tuple[int, int, int]:
        """(uid, gid, mode) for a new entry: the caller's, or a setgid dir's group."""
        gid = ctx.gid
        pst = view.stat(parts[:-1])
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return ctx.uid, gid, mode

    def _made(self, parent: Node, name: str, view: View, parts: tuple[str, ...]
              ) -> pyfuse3.EntryAttributes:
        e = view.need(parts)
        node = self._bind(parent, name, e)
        node.lookups += 1
        self._changed(parent, parts, name_changed=True)
        return self._attr(node, e.st)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.quiesced:
            await self._wait(parent_inode)
        with self._boundary():
            parent = self._node(parent_inode)
            view = self._view(parent, write=True)
            parts = self._child_parts(parent, os.fsdecode(name))
            uid, gid, mode = self._owner(view, parts, ctx, mode)
            view.mknod(parts, mode, rdev, uid, gid)
            return self._made(parent, parts[-1], view, parts)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.quiesced:
            await self._wait(parent_inode)
        with self._boundary():
            parent = self._node(parent_inode)
            view = self._view(parent, write=True)
            parts = self._child_parts(parent, os.fsdecode(name))
            uid, gid, mode = self._owner(view, parts, ctx, stat.S_IFDIR | mode)
            view.mkdir(parts, mode, uid, gid)
            return self._made(parent, parts[-1], view, parts)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.quiesced:
            await self._wait(parent_inode)
        with self._boundary():
            parent = self._node(parent_inode)
            view = self._view(parent, write=True)
            parts = self._child_parts(parent, os.fsdecode(name))
            uid, gid, _ = self._owner(view, parts, ctx, stat.S_IFLNK)
            view.symlink(parts, os.fsdecode(target), uid, gid)
            return self._made(parent, parts[-1], view, parts)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self.quiesced:
            await self._wait(parent_inode)
        with self._boundary():
            parent = self._node(parent_inode)
            view = self._view(parent, write=True)
            parts = self._child_parts(parent, os.fsdecode(name))
            uid, gid, mode = self._owner(view, parts, ctx, mode)
            fd = view.create(parts, flags, mode, uid, gid)
            attr = self._made(parent, parts[-1], view, parts)
            writer = _writer(ctx) if flags & os.O_ACCMODE != os.O_RDONLY else None
            return self._handle(self.nodes[attr.st_ino], fd, upper=True, writer=writer), attr

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            parent = self._node(new_parent_inode)
            if node.bid != parent.bid:
                raise FUSEError(errno.EXDEV)
            view = self._view(parent, write=True)
            if not node.links:
                raise FUSEError(errno.ENOENT)
            name = os.fsdecode(new_name)
            parts = self._child_parts(parent, name)
            view.link(self._parts(node), parts)
            self._refresh_handles(node, view)
            node.links.add((parent.ino, name))
            self.dentries[(parent.ino, name)] = node.ino
            node.lookups += 1
            self._changed(parent, parts, name_changed=True)
            return self._attr(node, view.stat(parts))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.quiesced:
            await self._wait(parent_inode)
        with self._boundary():
            self._remove(parent_inode, os.fsdecode(name), want_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.quiesced:
            await self._wait(parent_inode)
        with self._boundary():
            self._remove(parent_inode, os.fsdecode(name), want_dir=True)

    def _remove(self, pino: int, name: str, want_dir: bool) -> None:
        parent = self._node(pino)
        view = self._view(parent, write=True)
        parts = self._child_parts(parent, name)
        if want_dir:
            view.rmdir(parts)
        else:
            view.unlink(parts)
        self._unname(parent.ino, name)
        self._changed(parent, parts, name_changed=True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if self.quiesced:
            await self._wait(parent_inode_old)
        with self._boundary():
            sp = self._node(parent_inode_old)
            dp = self._node(parent_inode_new)
            if sp.bid != dp.bid:
                raise FUSEError(errno.EXDEV)
            view = self._view(sp, write=True)
            old, new = os.fsdecode(name_old), os.fsdecode(name_new)
            src = self._child_parts(sp, old)
            dst = self._child_parts(dp, new)
            if not view.rename(src, dst, flags):
                return
            sino = self.dentries.get((sp.ino, old))
            dino = self.dentries.get((dp.ino, new))
            if flags & pyfuse3.RENAME_EXCHANGE:
                self._move_name(sino, (sp.ino, old), (dp.ino, new))
                self._move_name(dino, (dp.ino, new), (sp.ino, old))
                for k, v in (((dp.ino, new), sino), ((sp.ino, old), dino)):
                    if v is None:
                        self.dentries.pop(k, None)
                    else:
                        self.dentries[k] = v
            elif src != dst:
                self._unname(dp.ino, new)
                self.dentries.pop((sp.ino, old), None)
                self._move_name(sino, (sp.ino, old), (dp.ino, new))
                if sino is not None:
                    self.dentries[(dp.ino, new)] = sino
            self._changed(sp, src, name_changed=True)
            self._changed(dp, dst, name_changed=True)

    def _move_name(self, ino: int | None, old: tuple[int, str], new: tuple[int, str]) -> None:
        if ino is None:
            return
        node = self.nodes[ino]
        node.links.discard(old)
        node.links.add(new)
        if (node.parent, node.name) == old:
            node.parent, node.name = new

    # -- files -------------------------------------------------------------

    def _handle(self, node: Node, fd: int, upper: bool, keep_cache: bool = True,
                writer: tuple[int, int, int] | None = None) -> pyfuse3.FileInfo:
        fh = next(self._fhs)
        self.handles[fh] = Handle(node.ino, fd, upper, writer)
        node.handles.add(fh)
        if upper and node.xattrs is None:
            # The kernel asks for security.capability before the first write:
            # the branch's own copy is at hand, so no resolution is needed then.
            try:
                names = os.listxattr(fd)
            except OSError:
                pass
            else:
                node.xattrs = (frozenset(n for n in names
                                         if not n.startswith(PRIVATE_XATTR_PREFIX)),
                               time.monotonic())
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
            view = self._view(node, write=write)
            flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
            if not node.links and node.handles:  # unlinked, still open: share its file
                fd = os.open(f"/proc/self/fd/{self.handles[next(iter(node.handles))].fd}",
                             flags | os.O_CLOEXEC)
                return self._handle(node, fd, upper=True,
                                    writer=_writer(ctx) if write else None)
            parts = self._parts(node)
            if write:
                fd = view.open_write(parts, flags)
                self._refresh_handles(node, view)
                fi = self._handle(node, fd, upper=True, writer=_writer(ctx))
                if flags & os.O_TRUNC:
                    h = self.handles[fi.fh]
                    if h.writer is not None:
                        self._kill_privs(h, node)  # a truncating open is a write
                    self._changed(node, parts, name_changed=False)
                return fi
            fd, e = view.open_top(parts, flags & ~os.O_TRUNC)
            return self._handle(node, fd, upper=e.layer == 0,
                                keep_cache=not self._volatile(node, view, e))

    def _fh(self, fh: int, write: bool) -> tuple[Handle, Node]:
        h = self.handles[fh]
        node = self._node(h.ino)
        self._view(node, write=write)
        return h, node

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.quiesced:
            await self._wait(self._fh_ino(fh))
        with self._boundary():
            h, _ = self._fh(fh, write=False)
            return os.pread(h.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.quiesced:
            await self._wait(self._fh_ino(fh))
        with self._boundary():
            h, node = self._fh(fh, write=True)
            if h.writer is not None:
                self._kill_privs(h, node)
            n = os.pwrite(h.fd, buf, off)
            if node.links and node.bid in self._descendants:
                self._changed(node, self._parts(node), name_changed=False)
            return n

    def _kill_privs(self, h: Handle, node: Node) -> None:
        """Clear the set-id bits the kernel clears when *h*'s writer writes or
        truncates (see _killed_bits)."""
        assert h.writer is not None
        st = os.fstat(h.fd)
        kill = _killed_bits(st, h.writer)
        if kill:
            os.fchmod(h.fd, stat.S_IMODE(st.st_mode) & ~kill)
            node.xattrs = None
            if self.notifier is not None:
                self.notifier.inode(node.ino)  # the kernel's cached mode is stale now

    # flush is not implemented: every write already reached the upper file, and
    # the ENOSYS (pyfuse3's default) makes the kernel stop sending one per close.

    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.quiesced:
            await self._wait(self._fh_ino(fh))
        with self._boundary():
            h, _ = self._fh(fh, write=False)
            if datasync:
                os.fdatasync(h.fd)
            else:
                os.fsync(h.fd)

    async def release(self, fh: int) -> None:
        with self._boundary():
            h = self.handles.pop(fh)
            os.close(h.fd)
            node = self.nodes.get(h.ino)
            if node is not None:
                node.handles.discard(fh)
                self._maybe_drop(node)

    # -- directories ---------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            entries: list[tuple[str, int, pyfuse3.EntryAttributes]] = []
            if node.kind == "root":
                for w in self.store.workspaces():
                    wn = self._ws_node(w.name)
                    entries.append((w.name, wn.ino, self._attr(wn)))
            elif node.kind == "ws":
                assert node.ws is not None
                for b in self.store.branches(node.ws):
                    if b.status == ACTIVE:
                        rn = self._branch_root(node.ws, b.id)
                        entries.append((b.name, rn.ino, self._node_attr(rn)))
            else:
                view = self._view(node)
                for name, e in view.listdir(self._parts(node)).items():
                    child = self._bind(node, name, e)
                    entries.append((name, child.ino,
                                    self._attr(child, e.st, self._volatile(child, view, e))))
            fh = next(self._fhs)
            self.dirs[fh] = entries
            return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        with self._boundary():
            entries = self.dirs[fh]
            for i in range(start_id, len(entries)):
                name, ino, attr = entries[i]
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                    break
                node = self.nodes.get(ino)
                if node is not None:
                    node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # directory changes are renames/creates in the upper dir; commit syncs the fs

    # -- xattrs --------------------------------------------------------------

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            view = self._view(node, write=True)
            parts = self._parts(node)
            node.xattrs = None
            view.setxattr(parts, os.fsdecode(name), value)
            self._refresh_handles(node, view)
            self._changed(node, parts, name_changed=False)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            if node.kind != "view":
                raise FUSEError(pyfuse3.ENOATTR)
            view = self._view(node)
            xname = os.fsdecode(name)
            if node.links and xname not in self._xattr_names(node, view):
                raise FUSEError(pyfuse3.ENOATTR)
            return view.getxattr(self._parts(node), xname)

    def _xattr_names(self, node: Node, view: View) -> frozenset[str]:
        """The entry's xattr names, cached for ATTR_TIMEOUT unless it is seen
        through a parent branch (volatile); dropped whenever they may change."""
        now = time.monotonic()
        if node.xattrs is not None and now - node.xattrs[1] < ATTR_TIMEOUT:
            return node.xattrs[0]
        parts = self._parts(node)
        names = frozenset(view.listxattr(parts))
        if not self._volatile(node, view, view.need(parts)):
            node.xattrs = (names, now)
        return names

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            if node.kind != "view":
                return []
            return [os.fsencode(n) for n in self._view(node).listxattr(self._parts(node))]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.quiesced:
            await self._wait(inode)
        with self._boundary():
            node = self._node(inode)
            view = self._view(node, write=True)
            parts = self._parts(node)
            node.xattrs = None
            view.removexattr(parts, os.fsdecode(name))
            self._refresh_handles(node, view)
            self._changed(node, parts, name_changed=False)
