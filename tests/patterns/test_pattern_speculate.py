"""Speculate and Cascaded with real branches, real processes and real limits."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import pytest
from pattern_candidates import hang, hog_memory, needs_feedback, raises, write
from pattern_helpers import alive, files, wait_for

from branching import Limits, Workspace
from branching.patterns import Call, Cascaded, Command, Speculate
from branching.patterns import outcome as oc

pytestmark = [pytest.mark.mount, pytest.mark.cgroup]


def test_first_success_commits_and_the_rest_leave_no_trace(ws: Workspace, base: Path,
                                                           pids: Path) -> None:
    outcome = Speculate([
        Command("echo broken > value.txt; exit 1", label="fails"),
        functools.partial(hang, str(pids)),
        functools.partial(write, "value.txt", "42\n"),
    ], timeout=120, max_parallel=3)(ws)

    assert outcome.committed and outcome.winner is not None
    assert outcome.winner.label.startswith("write")
    assert files(base) == {"README": "hello\n", "value.txt": "42\n"}
    fails, hung, won = outcome.candidates
    assert fails.status == oc.FAILED and fails.exit_code == 1 and not fails.success
    assert hung.status == oc.CANCELLED and not hung.success  # killed at once, not timed out
    assert (fails.ended_by, hung.ended_by, won.ended_by) == ("exit", "discard", "exit")
    assert outcome.to_dict()["candidates"][1]["ended_by"] == "discard"
    assert won.status == oc.PASSED and won.committed and won.exit_code == 0
    assert won.duration is not None and won.stderr_path is not None
    wait_for(lambda: not alive(pids), "the losing candidate's process to die")
    assert outcome.commit is not None and outcome.commit["changes"] == 1


def test_in_order_prefers_the_earlier_success(ws: Workspace, base: Path) -> None:
    outcome = Speculate([
        Command("sleep 1; echo first > value.txt"),
        Command("echo second > value.txt"),
    ], first_wins=False)(ws)
    assert outcome.winner is not None and outcome.winner.index == 0
    assert (base / "value.txt").read_text() == "first\n"


def test_nothing_succeeds_leaves_the_workspace_untouched(ws: Workspace, base: Path) -> None:
    before = files(base)
    outcome = Speculate([
        Command("echo a > value.txt; exit 3"),
        functools.partial(raises, "no luck"),
        Command("rm README; kill -SEGV $$"),
    ])(ws)
    assert not outcome.committed and outcome.commit is None
    assert files(base) == before
    exit3, raised, crashed = outcome.candidates
    assert exit3.exit_code == 3 and exit3.status == oc.FAILED
    assert isinstance(raised.exception, ValueError) and str(raised.exception) == "no luck"
    assert "ValueError: no luck" in (raised.error or "")
    assert "ValueError: no luck" in raised.log_path.read_text()  # type: ignore[union-attr]
    assert crashed.status == oc.CRASHED and crashed.signal == 11
    assert crashed.ended_by == "signal"


def test_hanging_candidate_times_out(ws: Workspace, base: Path, pids: Path) -> None:
    outcome = Speculate([functools.partial(hang, str(pids))], timeout=1)(ws)
    [hung] = outcome.candidates
    assert hung.status == oc.TIMED_OUT and hung.ended_by == "timeout" and not outcome.committed
    assert not (base / "hanging.txt").exists()
    wait_for(lambda: not alive(pids), "the timed-out candidate's process to die")


def test_memory_hungry_candidate_is_oom_killed(ws: Workspace, base: Path) -> None:
    outcome = Speculate(
        [Call(hog_memory, label="hog"), Command("sleep 0.5; echo ok > value.txt")],
        first_wins=False, resource_limits=Limits(memory="64M"),
    )(ws)
    hog, ok = outcome.candidates
    assert hog.status == oc.OOM and hog.ended_by == "oom" and not hog.success
    assert ok.committed and (base / "value.txt").read_text() == "ok\n"


def test_max_parallel_queues_candidates(ws: Workspace, tmp_path: Path) -> None:
    running, seen = tmp_path / "running", tmp_path / "seen"
    running.mkdir()
    script = (f"touch {running}/$BRANCHING_ATTEMPT; ls {running} | wc -l >> {seen}; "
              f"sleep 0.3; rm {running}/$BRANCHING_ATTEMPT; exit 1")
    outcome = Speculate([Command(script)] * 6, max_parallel=2)(ws)
    assert not outcome.committed and len(outcome.candidates) == 6
    counts = [int(line) for line in seen.read_text().split()]
    assert len(counts) == 6 and max(counts) <= 2


def test_cascaded_widens_and_passes_the_failures_forward(ws: Workspace, base: Path) -> None:
    # attempt 1 fails saying "missing: token"; stage 2 sees that in BRANCHING_FEEDBACK
    outcome = Cascaded(functools.partial(needs_feedback, "token"), fan_out=(1, 2))(ws)
    assert outcome.committed and outcome.winner is not None
    assert outcome.winner.attempt in (2, 3)
    assert "missing: token" in (outcome.winner.feedback or "")
    assert (base / "value.txt").read_text() == "fixed with token\n"
    assert outcome.candidates[0].status == oc.FAILED


def test_repeated_patterns_do_not_leak_connections(ws: Workspace) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    Speculate([Command("exit 1"), Command("exit 2")], max_parallel=2)(ws)
    before = open_fds()
    for _ in range(3):
        Speculate([Command("exit 1"), Command("exit 2")], max_parallel=2)(ws)
    assert open_fds() == before


def test_a_candidate_that_cannot_run_in_a_child_is_refused_at_once() -> None:
    lock = threading.Lock()  # a lambda travels by value; what it holds may not

    with pytest.raises(TypeError, match="cannot be pickled"):
        Speculate([lambda path: lock.locked()])
    with pytest.raises(TypeError, match="cannot be pickled"):
        Call(lambda path: lock.locked(), label="built by hand")
    # a list of strings is that many shell commands (the README's own example)
    assert [c.argv for c in Speculate(["git apply a.diff && pytest -q", "true"]).candidates] \
        == ["git apply a.diff && pytest -q", "true"]
    with pytest.raises(TypeError, match="non-empty argv"):
        Command([])
    with pytest.raises(ValueError, match="at least one"):
        Speculate([])


def test_a_client_used_from_many_threads_keeps_few_connections(ws: Workspace) -> None:
    # a graph framework calls Branch.run from its own pool threads, a new one each time
    from concurrent.futures import ThreadPoolExecutor

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    b = ws.create("threads")
    b.run(["true"])
    before = open_fds()
    for _ in range(4):
        with ThreadPoolExecutor(8) as pool:
            assert all(r.ok for r in pool.map(lambda _: b.run(["true"]), range(8)))
    b.abort()
    assert open_fds() <= before + ws.client.IDLE_KEPT
