"""The pool of entry processes (``cgroups.spawn.Entries``): which entry a run gets, and
when the pool starts new ones.

Real entry processes; ``prepare`` is the test's own callback (the Manager's puts the
entry in its cgroup), which lets the test hold a start half way and see when it began.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from cgroup_helpers import wait_for

from cgroups.spawn import Entries, Entry

pytestmark = pytest.mark.timeout(90)


def test_take_starts_nothing_beside_the_hand_over_and_replace_fills_the_pool() -> None:
    # A Python start beside a run's hand-over takes the CPU that the run's own start
    # needs: take starts no entry in the background (one held in prepare would be a
    # live thread here); replace does, until the pool is full, and the next run gets
    # the oldest entry, whose Python has long started.
    gate = threading.Event()
    prepared: list[int] = []

    def prepare(pid: int) -> None:
        prepared.append(pid)
        if len(prepared) > 1:  # the first is take's own, started on the spot
            assert gate.wait(30), "the test did not open the gate"

    entries = Entries(prepare, size=3)
    taken: list[Entry] = []
    try:
        taken.append(entries.take())  # the pool is empty: started on the spot
        assert prepared == [taken[0].proc.pid]
        assert not [t for t in threading.enumerate() if t.name == "branchd-entries"]
        entries.replace()
        wait_for(lambda: len(prepared) == 2, "the pool's first new entry")
        gate.set()
        wait_for(lambda: len(entries._idle) == 3, "a full pool")
        assert len(prepared) == 4
        taken.append(entries.take())
        assert taken[1].proc.pid == prepared[1]
    finally:
        gate.set()
        for entry in taken:
            entries.end(entry)
        entries.close()


def test_close_waits_for_the_entry_being_started_and_ends_it() -> None:
    # The Manager removes its cgroup tree right after: an entry started meanwhile would
    # keep its cgroup (and process) there.
    gate = threading.Event()
    prepared: list[int] = []
    released: list[object] = []

    def prepare(pid: int) -> int:
        prepared.append(pid)
        if len(prepared) > 1:
            assert gate.wait(30), "the test did not open the gate"
        return pid

    entries = Entries(prepare, released.append, size=2)
    taken = entries.take()
    try:
        entries.replace()
        wait_for(lambda: len(prepared) == 2, "the pool's new entry")
        closer = threading.Thread(target=entries.close)
        closer.start()
        wait_for(lambda: entries._closed, "close to begin")
        gate.set()
        closer.join(30)
        assert not [t for t in threading.enumerate() if t.name == "branchd-entries"]
        assert released == [prepared[1]]
    finally:
        gate.set()
        entries.end(taken)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_entries_are_our_children_cloned_by_one_fork_server() -> None:
    # CLONE_PARENT: the daemon reaps a run's process and reads its exit status itself,
    # though the fork server made it (and no interpreter starts per entry)
    entries = Entries(size=0)
    taken = [entries.take() for _ in range(3)]
    try:
        server = entries._server._proc
        assert server is not None
        assert [_parent(e.proc.pid) for e in taken] == [os.getpid()] * 3
        assert len({e.proc.pid for e in taken} | {server.pid}) == 4
        os.kill(taken[0].proc.pid, signal.SIGTERM)
        assert taken[0].proc.wait(10) == -signal.SIGTERM  # Popen's code for a signal
        taken[0].proc.kill()  # reaped: never signalled again (its pid may be reused)
    finally:
        for entry in taken:
            entries.end(entry)
        entries.close()
    assert server.poll() is not None  # close ends the fork server


def test_a_fork_server_that_died_is_started_again() -> None:
    entries = Entries(size=0)
    taken = [entries.take()]
    try:
        first = entries._server._proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        taken.append(entries.take())  # the next clone finds it gone and starts one
        second = entries._server._proc
        assert second is not None and second.pid != first.pid
        assert _parent(taken[1].proc.pid) == os.getpid()
    finally:
        for entry in taken:
            entries.end(entry)
        entries.close()
