"""BestOfN and Tournament: every candidate runs to its end, the best one commits."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from pattern_candidates import attempt_score, crash, hog_memory, raises, returns_false, score
from pattern_helpers import files

from branching import Limits, Workspace
from branching.patterns import BestOfN, CandidateResult, Command, Tournament
from branching.patterns import outcome as oc

pytestmark = [pytest.mark.mount, pytest.mark.cgroup]


def test_best_score_commits_failures_of_every_kind_do_not(ws: Workspace, base: Path) -> None:
    outcome = BestOfN([
        functools.partial(score, 2.0),
        functools.partial(raises, "bad"),
        crash,
        hog_memory,
        returns_false,
        Command("echo 7 >&3; touch by-fd3"),  # the highest score: written to fd 3
        Command('echo 5 > "$BRANCHING_SCORE_FILE"'),
    ], resource_limits=Limits(memory="64M"), max_parallel=4)(ws)

    s2, raised, crashed, hog, false, fd3, file_score = outcome.candidates
    assert (s2.status, s2.score) == (oc.PASSED, 2.0)
    assert raised.status == oc.FAILED and isinstance(raised.exception, ValueError)
    assert crashed.status == oc.CRASHED and crashed.signal == 11
    assert hog.status == oc.OOM
    assert false.status == oc.FAILED and false.exit_code == 1
    assert (fd3.score, file_score.score) == (7.0, 5.0)
    assert outcome.winner is fd3 and fd3.committed
    assert files(base) == {"README": "hello\n", "by-fd3": "", "value.txt": "0\n"}


def test_one_task_n_times_sees_its_attempt(ws: Workspace, base: Path) -> None:
    outcome = BestOfN(attempt_score, n=3)(ws)
    assert [r.attempt for r in outcome.candidates] == [1, 2, 3]
    assert outcome.winner is not None and outcome.winner.attempt == 3
    assert (base / "value.txt").read_text() == "3\n"


def test_external_scores_override(ws: Workspace, base: Path) -> None:
    outcome = BestOfN([Command(f"echo {i} > value.txt") for i in range(3)],
                      scores=[-1.5, 0.5, -0.2])(ws)
    assert outcome.winner is not None and outcome.winner.index == 1
    assert (base / "value.txt").read_text() == "1\n"
    with pytest.raises(ValueError, match="2 scores for 3 candidates"):
        BestOfN([Command("true")] * 3, scores=[1, 2])


def test_scorer_reads_the_branch(ws: Workspace, base: Path) -> None:
    def by_length(r: CandidateResult) -> float:
        assert r.path is not None
        return float(len((r.path / "value.txt").read_text()))

    outcome = BestOfN([Command("echo short > value.txt"), Command("echo longest > value.txt"),
                       Command("echo mid > value.txt")], scores=by_length)(ws)
    assert outcome.winner is not None and outcome.winner.index == 1
    assert (base / "value.txt").read_text() == "longest\n"


def test_no_success_commits_nothing(ws: Workspace, base: Path) -> None:
    before = files(base)
    outcome = BestOfN(Command("echo x > value.txt; exit 2"), n=2)(ws)
    assert not outcome.committed and files(base) == before


def test_tournament_judge_picks_pairwise(ws: Workspace, base: Path) -> None:
    matches = []

    def judge(a: CandidateResult, b: CandidateResult) -> CandidateResult:
        matches.append((a.attempt, b.attempt))
        assert a.path is not None and b.path is not None
        # both branches are still there to compare
        return max(a, b, key=lambda r: int((r.path / "value.txt").read_text()))  # type: ignore

    outcome = Tournament(Command("echo $BRANCHING_ATTEMPT > value.txt"), n=5, judge=judge)(ws)
    assert outcome.winner is not None and outcome.winner.attempt == 5
    assert (base / "value.txt").read_text() == "5\n"
    assert len(matches) == 4  # five contenders: 2 matches + a bye, 1 + a bye, the final
