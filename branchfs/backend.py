"""The data plane's one interface: what serves a branch's files, as the control plane sees it.

The control plane (the Store, commits, runs, the protocol) owns the state; a
backend serves the files of active branches from their delta directories, in
the on-disk format of ``docs/format.md`` (the only thing the two planes share
on disk). Two implementations: the daemon's FUSE mount (``branchfs.mount.
FuseBackend``) and kernel overlay mounts (``daemon.overlays.Overlays``); the
daemon's ``DataPlane`` holds them, is the Store's one subscriber and hands
every Store event to each of them.

Who calls what: every method is called on the daemon's event loop thread (the
trio thread), never from a worker thread, and never from inside one of the
backend's own requests. Async methods may await (a mount, a message to
another process); sync ones must return without waiting on a client of the
mount. Store events made on a worker thread (a commit running off the loop)
reach ``invalidate`` on the loop thread once that work is over, in the order
the Store made them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from .model import Branch
from .store import Event, Store

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Serves active branches' files; told what the control plane changes.

    Contract, method by method:

    - ``serves(bid)``: whether this backend serves branch *bid* at its path now.
    - ``serve(branch)``: start serving an active branch (after its creation, a
      refused commit, a start-up, or a mount lost behind our back). Idempotent;
      a backend that cannot serve it logs why and returns (another one, FUSE in
      the end, serves it): it never raises for that.
    - ``detach(branches)``: stop serving them. When it returns the backend
      writes nothing more into their upper dirs (processes keep what they hold
      open); a branch not served is ignored.
    - ``quiesce(workspace, moving)``: before a long operation (a commit, the
      finish of a pending one) changes, off the loop, the files under the
      workspace's branches and base. When it returns, until ``resume``, no
      request this backend answers reads or writes them (they wait; those of
      other workspaces should be answered meanwhile: the in-process FUSE
      mount, with one pyfuse3 worker, holds them back behind a waiting one),
      and *moving* (the branches whose
      upper dirs the operation moves away) are not served by a kernel mount
      that would write them. Calls for one workspace never nest (one long
      operation per workspace at a time: ``daemon.lanes``).
    - ``resume(workspace, moving)``: the operation is over (done or refused):
      requests go on, over the new state; a branch of *moving* still active
      (a refused commit) is served again.
    - ``invalidate(event)``: a Store change (``branchfs.store.Event``), after
      it was made and after ``resume``; before the control request that made
      it is answered, what the backend cached of it is dropped (a kernel
      mount whose upper dir changed behind the kernel is detached here and
      served again by ``settle``).
    - ``settle()``: serve again what ``invalidate`` detached to be served anew;
      awaited after each batch of events, before the answer.
    - ``close()``: stop serving everything (shutdown); sync, and safe to call
      twice.
    """

    name: str  # what ``info`` says serves a branch: "fuse", "overlay"

    def serves(self, bid: str) -> bool: ...

    async def serve(self, branch: Branch) -> None: ...

    def detach(self, branches: Sequence[Branch]) -> None: ...

    async def quiesce(self, workspace: str, moving: Sequence[Branch]) -> None: ...

    async def resume(self, workspace: str, moving: Sequence[Branch]) -> None: ...

    def invalidate(self, event: Event) -> None: ...

    async def settle(self) -> None: ...

    def close(self) -> None: ...


class DataPlane:
    """The backends serving branches, top first (a kernel overlay sits on the FUSE
    mount at a branch's path): the Store's one subscriber, and the one way the
    control plane reaches them.

    Store events made on the event loop thread go to every backend's
    ``invalidate`` at once; those a worker thread makes (a commit off the loop)
    are queued and handed over by ``flush``, on the loop, when that work is
    over. ``settle`` is awaited before a control request is answered.
    """

    def __init__(self, store: Store, backends: Sequence[Backend]) -> None:
        self.store = store
        self.backends = list(backends)
        self._loop = threading.get_ident()  # made on the event loop thread
        self._lock = threading.Lock()
        self._queued: list[Event] = []
        store.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if threading.get_ident() != self._loop:
            with self._lock:
                self._queued.append(event)
            return
        self.flush()  # anything a worker queued came first
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
        for b in self.backends:
            try:
                b.invalidate(event)
            except Exception:  # one backend's failure must not keep the others stale
                log.exception("backend %s failed on %s", b.name, event.kind)

    def flush(self) -> None:
        """On the loop thread: hand the events worker threads queued to the backends."""
        with self._lock:
            queued, self._queued = self._queued, []
        for event in queued:
            self._deliver(event)

    def backend_of(self, bid: str) -> str | None:
        """The name of the backend serving branch *bid* at its path (the top one)."""
        for b in self.backends:
            if b.serves(bid):
                return b.name
        return None

    async def serve(self, branch: Branch) -> None:
        for b in self.backends:
            await b.serve(branch)

    def detach(self, branches: Sequence[Branch]) -> None:
        for b in self.backends:
            b.detach(branches)

    async def remount(self, branch: Branch) -> None:
        """Serve *branch* afresh: its upper dir changed behind the backends' backs."""
        for b in self.backends:
            if b.serves(branch.id):
                b.detach([branch])
                await b.serve(branch)

    async def quiesce(self, workspace: str, moving: Sequence[Branch]) -> None:
        for b in self.backends:
            await b.quiesce(workspace, moving)

    async def resume(self, workspace: str, moving: Sequence[Branch]) -> None:
        for b in reversed(self.backends):  # FUSE first: an overlay mount looks up through it
            await b.resume(workspace, moving)

    async def settle(self) -> None:
        self.flush()
        for b in self.backends:
            await b.settle()

    def close(self) -> None:
        for b in self.backends:
            b.close()
