"""The data plane's delivery of Store events (branchfs.backend.DataPlane), without FUSE.

Events the event loop thread makes reach every backend at once, in order; those a
worker thread makes (a commit off the loop) wait until ``flush`` hands them over
on the loop thread, still in the Store's order. And a commit on a worker thread
leaves the Store's views, which are the loop's, alone.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from branchfs import Branch, DataPlane, Event, Store

pytestmark = [pytest.mark.trio, pytest.mark.timeout(60)]


class Recorder:
    """A Backend that records what it is told, and on which thread."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, int]] = []
        self.settled = 0

    def serves(self, bid: str) -> bool:
        return False

    async def serve(self, branch: Branch) -> None:
        pass

    def detach(self, branches: Sequence[Branch]) -> None:
        pass

    async def quiesce(self, workspace: str, moving: Sequence[Branch]) -> None:
        pass

    async def resume(self, workspace: str, moving: Sequence[Branch]) -> None:
        pass

    def invalidate(self, event: Event) -> None:
        name = event.branch.name if event.branch else None
        self.events.append((event.kind, name, threading.get_ident()))

    async def settle(self) -> None:
        self.settled += 1

    def close(self) -> None:
        pass


def kinds(r: Recorder) -> list[tuple[str, str | None]]:
    return [(k, n) for k, n, _ in r.events]


def on_thread(fn: object) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if errors:
        raise errors[0]


async def test_worker_events_wait_for_flush_on_the_loop_thread(store: Store) -> None:
    loop = threading.get_ident()
    first, second = Recorder(), Recorder()
    plane = DataPlane(store, [first, second])
    store.create_branch("ws", "a")
    store.create_branch("ws", "b")
    assert kinds(first) == [("branch-created", "a"), ("branch-created", "b")]
    b = store.branch("ws", "b").id
    view = store.view_by_id(b)  # the loop's
    on_thread(lambda: store.commit("ws", "a"))  # as daemon.lanes runs it
    assert kinds(first) == [("branch-created", "a"), ("branch-created", "b")]  # queued
    assert view in store._retired  # dropped by the worker, not closed there
    assert store.view_by_id(b) is not view and store._retired == []  # closed on the loop
    plane.flush()
    want = [("branch-created", "a"), ("branch-created", "b"), ("committed", "a"),
            ("branch-ended", "a"), ("rebased", "b")]
    assert kinds(first) == want and kinds(second) == want
    assert {t for _, _, t in first.events} == {loop}
    on_thread(lambda: store.diff("ws", "b"))  # reads only: no event
    store.discard("ws", "b")  # on the loop: at once
    assert kinds(first)[-1] == ("branch-ended", "b")
    await plane.settle()
    assert first.settled == second.settled == 1


async def test_a_loop_event_hands_over_what_a_worker_queued_first(store: Store) -> None:
    r = Recorder()
    DataPlane(store, [r])
    store.create_branch("ws", "a")
    on_thread(lambda: store.commit("ws", "a"))
    store.create_branch("ws", "c")  # made on the loop after the commit: delivered after it
    assert kinds(r) == [("branch-created", "a"), ("committed", "a"), ("branch-ended", "a"),
                        ("branch-created", "c")]
