"""Reflexion: retry with the critique of the failed attempt."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from pattern_candidates import needs_feedback
from pattern_helpers import files

from branching import Workspace
from branching.patterns import CandidateResult, Command, Reflexion
from branching.patterns import outcome as oc

pytestmark = [pytest.mark.mount, pytest.mark.cgroup]


def test_default_critique_is_the_failure_report(ws: Workspace, base: Path) -> None:
    outcome = Reflexion(functools.partial(needs_feedback, "token"), max_retries=2)(ws)
    first, second = outcome.candidates
    assert first.status == oc.FAILED and first.feedback is None
    assert "missing: token" in (second.feedback or "")
    assert outcome.winner is second and second.attempt == 2
    assert (base / "value.txt").read_text() == "fixed with token\n"


def test_critique_function_sees_the_failed_branch(ws: Workspace, base: Path) -> None:
    seen = []

    def critique(r: CandidateResult) -> str:
        assert r.path is not None
        seen.append((r.path / "value.txt").read_text())
        return "try magic"

    task = Command('echo "$BRANCHING_FEEDBACK" > value.txt; '
                   'case "$BRANCHING_FEEDBACK" in *magic*) exit 0;; esac; exit 1')
    outcome = Reflexion(task, max_retries=1, critique=critique)(ws)
    assert seen == ["\n"] and outcome.committed
    assert (base / "value.txt").read_text() == "try magic\n"


def test_critique_command_runs_in_the_failed_branch(ws: Workspace, base: Path) -> None:
    task = Command('test -n "$BRANCHING_FEEDBACK" && echo "$BRANCHING_FEEDBACK" > value.txt')
    critique = Command('echo "it said: $(cat README)"; echo "$BRANCHING_FAILURE" | head -1')
    outcome = Reflexion(task, max_retries=1, critique=critique)(ws)
    assert outcome.committed
    assert (base / "value.txt").read_text().startswith("it said: hello\nattempt 1")


def test_gives_up_after_max_retries(ws: Workspace, base: Path) -> None:
    before = files(base)
    outcome = Reflexion(Command("echo $BRANCHING_ATTEMPT > value.txt; exit 1"),
                        max_retries=2)(ws)
    assert not outcome.committed and [r.attempt for r in outcome.candidates] == [1, 2, 3]
    assert files(base) == before


def test_binary_output_still_becomes_feedback(ws: Workspace, base: Path) -> None:
    # a NUL cannot go into an environment variable: it is dropped, the rest passes
    task = Command("""printf 'bin\\000ary\\n'; test -n "$BRANCHING_FEEDBACK" || exit 1; """
                   """echo "$BRANCHING_FEEDBACK" | grep -c binary > value.txt""")
    outcome = Reflexion(task, max_retries=1)(ws)
    assert [r.status for r in outcome.candidates] == [oc.FAILED, oc.PASSED]
    assert (base / "value.txt").read_text() == "1\n"
