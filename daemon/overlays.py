"""Which backend serves each branch: the daemon's FUSE mount, or a kernel overlay.

With the overlay backend (chosen at start-up by a probe mount, see ``choose``),
every active branch gets a kernel overlayfs mount of its delta, mounted on the
branch's own directory inside the FUSE mount, ``<mountpoint>/<ws>/<branch>``:
the path users were given stays the same, and everything below it is served
by the kernel at native speed. The FUSE mount still serves the directories
above it, ended branches (ESTALE) and any branch whose overlay could not be
mounted.

Mounting resolves the target path through our own FUSE mount, so it runs on a
worker thread (the trio thread answers those lookups). Every other operation
goes through an ``O_PATH`` descriptor of the overlay's root, kept from the
mount on: ``umount2("/proc/self/fd/N")`` reaches the overlay without a FUSE
lookup, so detaching is safe from the trio thread, during shutdown included.

``Overlays`` is a data-plane backend (``branchfs.backend.Backend``): the daemon's
``DataPlane`` calls it on the event loop thread and hands it the Store's events.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import select
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import trio

import branchfs
from branchfs import overlay
from daemon.handlers import RequestError

log = logging.getLogger(__name__)

FUSE = "fuse"
OVERLAY = "overlay"
CHOICES = ("auto", FUSE, OVERLAY)
PROBE_DIR = "overlay-probe"
MOUNT_TRIES = 20


def choose(wanted: str, state_dir: Path) -> tuple[str, str]:
    """The backend for *wanted* (auto, fuse or overlay) and why, in words for the log.
    ``overlay`` where no overlay can be mounted raises RequestError("unavailable")."""
    if wanted == FUSE:
        return FUSE, "--backend fuse was asked for"
    scratch = state_dir / PROBE_DIR
    shutil.rmtree(scratch, ignore_errors=True)  # a probe interrupted by a crash
    why_not = overlay.probe(str(scratch))
    if why_not is None:
        return OVERLAY, f"a probe overlay mount in {state_dir} succeeded"
    if wanted == OVERLAY:
        raise RequestError("unavailable", f"the overlay backend cannot work here: {why_not}")
    return FUSE, f"no kernel overlay here ({why_not})"


class Overlays:
    """The overlay mounts of the active branches (a ``branchfs.backend.Backend``).

    Invariant: ``_roots[bid]`` is an O_PATH fd on the root of the overlay mounted
    for branch *bid* at its path; a branch without an entry is served by FUSE.
    A branch is detached before anything changes its upper dir behind the
    kernel's back (commit, discard) and mounted again when it stays active.
    ``backend`` is the daemon's choice: with ``fuse`` nothing is ever mounted.
    """

    name = OVERLAY

    def __init__(self, store: branchfs.Store, mountpoint: Path, backend: str,
                 reason: str = "") -> None:
        self.store = store
        self.mountpoint = mountpoint
        self.backend = backend
        self.reason = reason
        self._roots: dict[str, int] = {}
        self._due: set[str] = set()  # detached by invalidate, to be mounted by settle
        self._limiter = trio.CapacityLimiter(4)
        store.served = self._roots.get

    # -- the Backend interface (see branchfs.backend) --------------------------------

    def serves(self, bid: str) -> bool:
        return bid in self._roots

    async def quiesce(self, workspace: str, moving: Sequence[branchfs.Branch]) -> None:
        # The kernel must not write an upper dir while the commit moves it away; the
        # other branches of the workspace stay mounted (the kernel has no gate).
        self.detach(moving)

    async def resume(self, workspace: str, moving: Sequence[branchfs.Branch]) -> None:
        for b in moving:  # refused: still the user's (but not a half-moved delta)
            if self.store.status(b.id) == "active" and not self.store.pending(workspace):
                await self.serve(b)

    def invalidate(self, event: branchfs.Event) -> None:
        if event.kind == "branch-ended" and event.branch is not None:
            self.detach([event.branch])
        elif event.kind == "committed" and event.target in self._roots:
            # the parent's upper dir changed behind the kernel's back: a new mount
            parent = self.store.branch_by_id(event.target)
            if parent is not None:
                self.detach([parent])
                self._due.add(parent.id)

    async def settle(self) -> None:
        due, self._due = self._due, set()
        for bid in due:
            b = self.store.branch_by_id(bid)
            if b is not None and b.status == "active":
                await self.serve(b)

    def served(self) -> dict[str, int]:
        """The branches this thinks are served by an overlay, with the id of each
        one's mount (fsck compares them with the mount table)."""
        return {bid: overlay.mount_id(root) for bid, root in self._roots.items()}

    async def heal(self, branches: Iterable[branchfs.Branch]) -> None:
        """Mount again the overlays of *branches* that were detached behind our
        back (an invalidation of the name one sits on in the FUSE mount, an
        administrator's umount). Meanwhile FUSE served the branch, over the same
        delta. ``watch`` calls it whenever the mount table changes; list, info
        and exec call it too, so that their answer does not wait for that."""
        if not self._roots:
            return
        attached = overlay.mount_ids()
        for b in branches:
            root = self._roots.get(b.id)
            if root is None or overlay.mount_id(root) in attached:
                continue
            log.info("the overlay of %s/%s was detached by the kernel; mounting it again",
                     b.workspace, b.name)
            del self._roots[b.id]
            os.close(root)
            await self.serve(b)

    def path_of(self, branch: branchfs.Branch) -> str:
        return str(self.mountpoint / branch.workspace / branch.name)

    async def serve(self, branch: branchfs.Branch) -> None:
        """Mount the overlay of an active branch (the overlay backend only). A
        branch the kernel refuses stays on FUSE, with a warning."""
        if self.backend != OVERLAY or branch.id in self._roots:
            return
        view = self.store.view(branch.workspace, branch.name)
        assert view.work is not None
        # Our own duplicates: the store may close its fds while the thread mounts.
        fds = [os.dup(fd) for fd in (*view.layers, view.work)]
        target = self.path_of(branch)
        try:
            root = await trio.to_thread.run_sync(
                _mount, target, fds[0], fds[-1], fds[1:-1], limiter=self._limiter)
        except OSError as exc:
            log.warning("branch %s/%s stays on FUSE: %s", branch.workspace, branch.name, exc)
            return
        finally:
            for fd in fds:
                os.close(fd)
        if self.store.status(branch.id) != "active" or branch.id in self._roots:
            _detach(root, target)  # ended, or mounted by another task, while we mounted
            return
        self._roots[branch.id] = root
        log.debug("branch %s/%s served by overlay at %s", branch.workspace, branch.name, target)

    def detach(self, branches: Iterable[branchfs.Branch]) -> None:
        """Detach the overlays of *branches* (processes still in them keep what they
        hold open; new path lookups reach the FUSE directory again)."""
        for b in branches:
            root = self._roots.pop(b.id, None)
            if root is not None:
                _detach(root, self.path_of(b))

    async def serve_all(self) -> None:
        """At start-up: an overlay for every active branch."""
        for b in self.store.branches():
            # not over a delta that a commit still has to move (Store.pending)
            if b.status == "active" and not self.store.pending(b.workspace):
                await self.serve(b)
        if self.backend == OVERLAY:
            log.info("%d branches served by overlay", len(self._roots))

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Mount again, whenever the mount table changes, the overlays the kernel
        detached on its own (see ``heal``): between requests too."""
        if self.backend != OVERLAY:
            task_status.started()
            return
        changed, changes = trio.open_memory_channel[None](1)
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        token = trio.lowlevel.current_trio_token()

        def note() -> None:
            try:
                changed.send_nowait(None)
            except trio.WouldBlock:
                pass  # a heal is due already

        thread = threading.Thread(target=_watch_mounts, args=(wake_r, note, token),
                                  name="branchd-mounts", daemon=True)
        thread.start()
        try:
            task_status.started()
            async for _ in changes:
                await self.heal(self.store.branches())
        finally:
            os.write(wake_w, b"x")
            thread.join()
            os.close(wake_r)
            os.close(wake_w)

    def close(self) -> None:
        """Detach every overlay: before the FUSE mount they sit on goes."""
        for bid, root in list(self._roots.items()):
            _detach(root, bid)
        self._roots.clear()


def _mount(target: str, upper: int, work: int, lowers: list[int]) -> int:
    """On a worker thread: mount, then hold the new mount's root.

    Each mount gets a workdir of its own inside the branch's ``work/``: a mount
    empties its workdir, and an earlier overlay of the same branch, detached
    but still the working directory of some process, may be copying up there.

    An invalidation of the name in the FUSE mount that lands while we mount
    (the adapter sends none for a new branch, but one for an ended branch of
    the same name may still be in flight when its wait timed out) makes the
    kernel refuse the mount (ENOENT) or detach it at once. A few tries
    suffice; each is checked by comparing what the path reaches with the
    mount's root."""
    name = f"overlay.{secrets.token_hex(4)}"
    os.mkdir(name, 0o700, dir_fd=work)
    own = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                  dir_fd=work)
    try:
        return _mount_tries(target, upper, own, lowers)
    finally:
        os.close(own)


def _mount_tries(target: str, upper: int, work: int, lowers: list[int]) -> int:
    for attempt in range(1, MOUNT_TRIES + 1):
        try:
            overlay.mount(target, upper, work, lowers)
        except OSError as exc:
            if exc.errno != errno.ENOENT or attempt == MOUNT_TRIES:
                raise
            continue
        root = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        # an attached overlay's root, still what the path reaches (a detached mount
        # is gone from the table; the path then reaches the FUSE directory)
        if (overlay.mount_id(root) in overlay.mount_ids()
                and os.fstat(root).st_dev == os.stat(target).st_dev):
            return root
        os.close(root)
        log.debug("overlay on %s went with a stale name; mounting again", target)
    raise overlay.OverlayError(errno.ESTALE, f"the overlay on {target} kept being detached")


def _watch_mounts(wake: int, note: Callable[[], None], token: trio.lowlevel.TrioToken) -> None:
    """On its own thread: call *note* in trio whenever this mount namespace's table
    changes (poll(2) says POLLPRI on /proc/self/mountinfo), until *wake* is readable."""
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        poller.register(wake, select.POLLIN)
        while True:
            if wake in dict(poller.poll()):  # (the poll itself marks the news as seen)
                return
            try:
                token.run_sync_soon(note)  # never waits: trio may be joining this thread
            except trio.RunFinishedError:
                return
    finally:
        os.close(fd)


def _detach(root: int, what: str) -> None:
    try:
        if not overlay.detach(overlay.fd_path(root), follow=True):
            log.debug("overlay of %s was already detached", what)
    except OSError as exc:
        log.error("cannot detach the overlay of %s: %s", what, exc)
    finally:
        os.close(root)
