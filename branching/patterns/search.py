"""Multi-level search over nested branches: ``TreeOfThoughts`` and ``BeamSearch``.

A node is a candidate's result; its children run in branches nested in its
branch, so each level builds on the work of the one above.  When a node wins,
its branch is committed into its parent's, and so on up into the workspace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from branching.patterns.base import Pattern, Scorer
from branching.patterns.candidate import Candidate, CandidateLike, as_candidates
from branching.patterns.outcome import CandidateResult, ranked
from branching.patterns.runner import Session

Expand = Callable[[CandidateResult], Sequence[CandidateLike]]


class _Search(Pattern):
    def __init__(self, strategies: Sequence[CandidateLike], *, max_depth: int,
                 expand: Expand | None, score: Scorer | None, **options: Any) -> None:
        super().__init__(**options)
        if max_depth < 1:
            raise ValueError("max_depth must be at least 1")
        self.strategies = as_candidates(strategies)
        if not self.strategies:
            raise ValueError(f"{type(self).__name__} needs at least one strategy")
        self.max_depth = max_depth
        self.expand = expand
        self.score = score

    def _children(self, node: CandidateResult) -> list[Candidate]:
        if self.expand is None:
            return self.strategies
        more = self.expand(node)
        return as_candidates(more) if more else []

    def _level(self, session: Session, jobs: list[tuple[CandidateResult | None, Candidate]]
               ) -> list[CandidateResult]:
        """Run one level; return its successes best first, discarding its failures."""
        results = session.wait_all([session.submit(c, parent=p) for p, c in jobs])
        for r in results:
            if r.success and self.score is not None:
                r.score = self.score(r)
            if not r.success:
                session.discard(r)
        return ranked(results)


class TreeOfThoughts(_Search):
    """Depth-first search, best child first, with backtracking.

    Level 1 runs ``strategies`` in parallel, each in its own branch.  The best
    successful node is expanded: ``expand(node)`` gives the candidates to run in
    branches nested in the node's (default: ``strategies`` again), and so on.
    The first node that is a goal commits, with its ancestors.  A goal is a
    successful node for which ``goal(node)`` is true; without ``goal``, a
    successful node at ``max_depth`` or one that ``expand`` gives nothing to do.
    A subtree without a goal is discarded and the next-best sibling is tried.
    """

    kind = "tree-of-thoughts"

    def __init__(self, strategies: Sequence[CandidateLike], *, max_depth: int = 2,
                 expand: Expand | None = None, score: Scorer | None = None,
                 goal: Callable[[CandidateResult], bool] | None = None,
                 **options: Any) -> None:
        super().__init__(strategies, max_depth=max_depth, expand=expand, score=score,
                         **options)
        self.goal = goal

    def _search(self, session: Session) -> CandidateResult | None:
        return self._descend(session, None, self.strategies)

    def _descend(self, session: Session, parent: CandidateResult | None,
                 candidates: list[Candidate]) -> CandidateResult | None:
        for node in self._level(session, [(parent, c) for c in candidates]):
            session.check()
            if self.goal is not None and self.goal(node):
                return node
            children = self._children(node) if node.depth < self.max_depth else []
            if not children and self.goal is None:
                return node
            found = self._descend(session, node, children) if children else None
            if found is not None:
                return found
            session.discard(node)
        return None


class BeamSearch(_Search):
    """Breadth-first search keeping the ``beam_width`` best nodes of each level.

    Level 1 runs ``strategies``; each next level runs ``expand(node)`` (default:
    ``strategies`` again) in branches nested in every node of the beam, all at
    once.  After ``max_depth`` levels, or when a level yields no success, the
    best node of the deepest successful level commits, with its ancestors.
    """

    kind = "beam-search"

    def __init__(self, strategies: Sequence[CandidateLike], *, expand: Expand | None = None,
                 beam_width: int = 2, max_depth: int = 2, score: Scorer | None = None,
                 **options: Any) -> None:
        super().__init__(strategies, max_depth=max_depth, expand=expand, score=score,
                         **options)
        if beam_width < 1:
            raise ValueError("beam_width must be at least 1")
        self.beam_width = beam_width

    def _search(self, session: Session) -> CandidateResult | None:
        beam: list[CandidateResult] = []
        jobs: list[tuple[CandidateResult | None, Candidate]] = [
            (None, c) for c in self.strategies]
        for _depth in range(self.max_depth):
            session.check()
            level = self._level(session, jobs)
            if not level:
                break
            keep, drop = level[:self.beam_width], level[self.beam_width:]
            for r in drop:
                session.discard(r)
            for node in beam:  # a node none of whose children made the beam is a dead end
                if not any(k.parent == node.branch for k in keep):
                    session.discard(node)
            beam = keep
            jobs = [(node, c) for node in beam for c in self._children(node)]
            if not jobs:
                break
        return beam[0] if beam else None
