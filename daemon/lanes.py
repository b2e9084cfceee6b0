"""Lanes: one long operation per workspace at a time, off the event loop.

A commit, a diff or the finish of a pending commit runs on a worker thread
(``trio.to_thread``) while the event loop answers everything else: list, info,
status, requests about other workspaces, the FUSE requests of other
workspaces. A workspace's lane is held by every request that changes the
workspace or reads its files through the Store (create, commit, discard,
rebase, resolve, exec, diff): they go one after another; requests that read
only records (list, info, status) never wait for it.

The Store's in-memory state is guarded by its own lock (``branchfs.Store``):
a worker thread holds it only while it reads or changes records, fds and
views, so the loop never reads them half changed and never waits for a
commit's walk. While a commit moves a workspace's files, that workspace's
FUSE requests wait at the data plane's gate (``quiesce``), so none sees a
half-applied base.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

import branchfs

T = TypeVar("T")


class Lanes:
    """The lanes of the workspaces: a trio.Lock each, made when first held (one
    per workspace name ever used: a few bytes each)."""

    def __init__(self, data: branchfs.DataPlane) -> None:
        self.data = data
        self._locks: dict[str, trio.Lock] = {}

    def busy(self, workspace: str) -> bool:
        """Whether an operation holds the lane of *workspace* now."""
        lock = self._locks.get(workspace)
        return lock is not None and lock.locked()

    @asynccontextmanager
    async def hold(self, workspace: str) -> AsyncIterator[None]:
        async with self._locks.setdefault(workspace, trio.Lock()):
            yield

    async def off_loop(self, workspace: str, fn: Callable[[], T], *,
                       moving: Sequence[branchfs.Branch] | None = None) -> T:
        """``fn()`` on a worker thread; the caller holds the workspace's lane. With
        *moving* (the branches whose deltas it moves: a commit's), the workspace's
        files change: its backends are quiesced meanwhile, and resumed after the
        Store's events reached them."""
        if moving is None:
            return await trio.to_thread.run_sync(fn)
        await self.data.quiesce(workspace, moving)
        try:
            return await trio.to_thread.run_sync(fn)
        finally:
            self.data.flush()  # before requests go on: e.g. FUSE's map of descendants
            await self.data.resume(workspace, moving)
