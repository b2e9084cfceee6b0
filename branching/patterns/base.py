"""The base of every pattern: its run options, the sync call and the async ``arun``.

A pattern is configured once and called with a workspace::

    outcome = Speculate(candidates, timeout=60)(ws)           # blocking
    outcome = await Speculate(candidates, timeout=60).arun(ws)  # trio or asyncio

``arun`` runs the same blocking code in a worker thread; cancelling the
awaiting task stops the pattern, which discards its branches (killing their
processes) before the cancellation propagates.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING

from branching.patterns.outcome import CandidateResult, Outcome
from branching.patterns.runner import EventHook, RunOptions, Session

if TYPE_CHECKING:
    from branching.workspace import Workspace
    from cgroups import Limits

log = logging.getLogger(__name__)

Scorer = Callable[[CandidateResult], "float | None"]


class Pattern:
    """A configured way of running candidates in branches and committing at most one.

    Options common to all patterns: ``resource_limits`` (a ``Limits`` for every
    candidate's cgroup), ``timeout`` (wall-clock seconds per candidate run),
    ``max_parallel`` (candidates running at once; default one per CPU, the
    rest queue), ``env`` (added to every candidate's environment) and
    ``on_event`` (called from worker threads as ``on_event(kind, result)`` with
    kind "start", "finish" or "commit") and ``at_branch_path`` (candidates see
    their branch at its own path instead of at the workspace's, see
    ``Branch.run``).
    """

    kind = "pattern"

    def __init__(self, *, resource_limits: Limits | None = None, timeout: float | None = None,
                 max_parallel: int | None = None, env: Mapping[str, str] | None = None,
                 on_event: EventHook | None = None, at_branch_path: bool = False) -> None:
        if max_parallel is not None and max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        self.options = RunOptions(limits=resource_limits, timeout=timeout,
                                  max_parallel=max_parallel or 0, env=dict(env or {}),
                                  on_event=on_event, at_branch_path=at_branch_path)

    def __call__(self, ws: Workspace) -> Outcome:
        """Run the pattern; returns when its winner is committed or every candidate failed."""
        return self._execute(ws, Future())

    def _execute(self, ws: Workspace, cancel: Future[None]) -> Outcome:
        started = time.monotonic()
        with Session(ws, self.options, self.kind, cancel) as session:
            winner = self._search(session)
            commit = session.commit(winner) if winner is not None else None
        outcome = Outcome(self.kind, session.results, winner, commit,
                          time.monotonic() - started)
        log.info("%s: %s after %.2fs", self.kind,
                 f"committed {winner.branch}" if winner else "nothing committed",
                 outcome.duration)
        return outcome

    def _search(self, session: Session) -> CandidateResult | None:
        """Run candidates through ``session``; return the successful result to commit."""
        raise NotImplementedError

    async def arun(self, ws: Workspace) -> Outcome:
        """The pattern from async code under trio or asyncio, in a worker thread."""
        cancel: Future[None] = Future()
        if _running_asyncio():
            return await _asyncio_run(self._execute, ws, cancel)
        return await _trio_run(self._execute, ws, cancel)


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _asyncio_run(fn: Callable[[Workspace, Future[None]], Outcome], ws: Workspace,
                       cancel: Future[None]) -> Outcome:
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, fn, ws, cancel)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set_result(None)
        # The cleanup (discarding branches) must finish before the cancellation goes on.
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        if not fut.cancelled():
            fut.exception()  # retrieved: it is the Interrupted this cancellation caused
        raise


async def _trio_run(fn: Callable[[Workspace, Future[None]], Outcome], ws: Workspace,
                    cancel: Future[None]) -> Outcome:
    if "trio" not in sys.modules:
        raise RuntimeError("arun() needs a running trio or asyncio event loop")
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise RuntimeError("arun() needs a running trio or asyncio event loop") from None
    done = threading.Event()

    def work() -> Outcome:
        try:
            return fn(ws, cancel)
        finally:
            done.set()

    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        cancel.set_result(None)
        # The abandoned thread is discarding the branches: wait for it, then cancel on.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(done.wait)
        raise
