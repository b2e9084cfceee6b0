"""TreeOfThoughts and BeamSearch over nested branches."""

from __future__ import annotations

from pathlib import Path

import pytest
from pattern_helpers import files

from branching import Workspace
from branching.patterns import BeamSearch, CandidateResult, Command, TreeOfThoughts
from branching.patterns import outcome as oc

pytestmark = [pytest.mark.mount, pytest.mark.cgroup]


def step(name: str, score: int, ok: bool = True) -> Command:
    """A node: records itself in trail.txt (inherited from its parent branch) and scores."""
    return Command(f"echo {name} >> trail.txt; echo {score} >&3; {'true' if ok else 'false'}",
                   label=name)


def test_tree_of_thoughts_commits_a_nested_chain(ws: Workspace, base: Path) -> None:
    def expand(node: CandidateResult) -> list[Command]:
        return [step(f"{node.label}.x", 1), step(f"{node.label}.y", 2)]

    outcome = TreeOfThoughts([step("a", 1), step("b", 3), step("c", 0, ok=False)],
                             max_depth=2, expand=expand)(ws)
    assert outcome.winner is not None and outcome.winner.depth == 2
    assert (base / "trail.txt").read_text() == "b\nb.y\n"  # best first at both levels
    assert outcome.winner.parent == outcome.candidates[1].branch
    assert [r.label for r in outcome.candidates if r.committed] == ["b", "b.y"]


def test_tree_of_thoughts_backtracks(ws: Workspace, base: Path) -> None:
    def expand(node: CandidateResult) -> list[Command]:
        # the best first-level node leads nowhere: its children all fail
        return [step(f"{node.label}.x", 1, ok=node.label != "best")]

    outcome = TreeOfThoughts([step("best", 9), step("next", 5)], max_depth=2,
                             expand=expand)(ws)
    assert outcome.winner is not None and outcome.winner.label == "next.x"
    assert (base / "trail.txt").read_text() == "next\nnext.x\n"
    by_label = {r.label: r for r in outcome.candidates}
    assert by_label["best.x"].status == oc.FAILED


def test_tree_of_thoughts_goal_and_dead_end(ws: Workspace, base: Path) -> None:
    before = files(base)
    outcome = TreeOfThoughts([step("a", 1)], max_depth=3,
                             goal=lambda node: False)(ws)  # nothing is ever good enough
    assert not outcome.committed and files(base) == before
    assert max(r.depth for r in outcome.candidates) == 3


def test_beam_search_keeps_the_best_per_level(ws: Workspace, base: Path) -> None:
    def expand(node: CandidateResult) -> list[Command]:
        return [step(f"{node.label}{i}", (node.score or 0) * 10 + i) for i in (1, 2)]

    outcome = BeamSearch([step("p", 1), step("q", 2), step("r", 3)], expand=expand,
                         beam_width=2, max_depth=2)(ws)
    assert outcome.winner is not None and outcome.winner.label == "r2"
    assert (base / "trail.txt").read_text() == "r\nr2\n"
    level2 = [r.label for r in outcome.candidates if r.depth == 2]
    assert sorted(level2) == ["q1", "q2", "r1", "r2"]  # p fell out of the beam


def test_beam_search_stops_at_a_failing_level(ws: Workspace, base: Path) -> None:
    outcome = BeamSearch([step("p", 1)], expand=lambda n: [step("dead", 5, ok=False)],
                         max_depth=3)(ws)
    assert outcome.winner is not None and outcome.winner.label == "p"
    assert (base / "trail.txt").read_text() == "p\n"
