"""``BestOfN`` (all run, the best score commits) and ``Tournament`` (pairwise judging)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from branching.patterns.base import Pattern, Scorer
from branching.patterns.candidate import (
    Call,
    Candidate,
    CandidateLike,
    Command,
    as_candidate,
    as_candidates,
)
from branching.patterns.outcome import CandidateResult, ranked
from branching.patterns.runner import Session

log = logging.getLogger(__name__)

Judge = Callable[[CandidateResult, CandidateResult], "CandidateResult | int"]


def task_list(task: CandidateLike | Sequence[CandidateLike], n: int | None,
              default_n: int) -> list[Candidate]:
    """``n`` runs of one task, or the given list of candidates (then ``n`` is left out)."""
    if n is not None:
        if n < 1:
            raise ValueError("n must be at least 1")
        return [as_candidate(task)] * n  # type: ignore[arg-type]
    if isinstance(task, str | Command | Call) or callable(task):
        return [as_candidate(task)] * default_n
    return as_candidates(task)


class BestOfN(Pattern):
    """Run every candidate to its end; the best-scoring success commits.

    ``task`` is one candidate run ``n`` times (each sees its own
    ``BRANCHING_ATTEMPT``) or a list of candidates.  ``scores`` is either a list
    of externally given scores, one per candidate (e.g. a model's logprobs), or a
    function of a finished ``CandidateResult`` (its branch is still there to
    read), or None: then each candidate's own score counts (a callable's
    returned number, or what a command wrote to ``$BRANCHING_SCORE_FILE`` or
    fd 3).  Unscored successes rank below scored ones; ties go to the earlier.
    """

    kind = "best-of-n"

    def __init__(self, task: CandidateLike | Sequence[CandidateLike], *, n: int | None = None,
                 scores: Sequence[float | None] | Scorer | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        self.candidates = task_list(task, n, default_n=3)
        if scores is not None and not callable(scores) and len(scores) != len(self.candidates):
            raise ValueError(f"{len(scores)} scores for {len(self.candidates)} candidates")
        self.scores = scores

    def _search(self, session: Session) -> CandidateResult | None:
        results = session.wait_all([session.submit(c) for c in self.candidates])
        for r in results:
            if not r.success or self.scores is None:
                continue
            if callable(self.scores):
                r.score = self.scores(r)
            else:
                r.score = self.scores[r.index]
        best = ranked(results)
        return best[0] if best else None


class Tournament(Pattern):
    """Run every candidate, then eliminate successes pairwise with ``judge``.

    ``judge(a, b)`` returns the winner (``a`` or ``b``, or 0 or 1); both
    branches are still there to inspect.  The default judge keeps the higher
    score (``a`` on a tie).  An odd one out gets a bye to the next round.
    """

    kind = "tournament"

    def __init__(self, task: CandidateLike | Sequence[CandidateLike], *, n: int | None = None,
                 judge: Judge | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.candidates = task_list(task, n, default_n=4)
        self.judge = judge or _by_score

    def _search(self, session: Session) -> CandidateResult | None:
        results = session.wait_all([session.submit(c) for c in self.candidates])
        field = [r for r in results if r.success]
        while len(field) > 1:
            session.check()
            advancing = []
            for a, b in zip(field[0::2], field[1::2], strict=False):
                winner = self._match(a, b)
                loser = b if winner is a else a
                log.info("tournament: %s beats %s", winner.label, loser.label)
                session.discard(loser)
                advancing.append(winner)
            if len(field) % 2:
                advancing.append(field[-1])
            field = advancing
        return field[0] if field else None

    def _match(self, a: CandidateResult, b: CandidateResult) -> CandidateResult:
        verdict = self.judge(a, b)
        if verdict is a or verdict == 0:
            return a
        if verdict is b or verdict == 1:
            return b
        raise ValueError(f"judge returned {verdict!r}: expected one of its two arguments, 0 or 1")


def _by_score(a: CandidateResult, b: CandidateResult) -> CandidateResult:
    return b if (b.score or 0.0) > (a.score or 0.0) else a
