"""``Speculate`` (a race of candidates) and ``Cascaded`` (a race that widens on failure)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from branching.patterns.base import Pattern
from branching.patterns.candidate import CandidateLike, as_candidate, as_candidates
from branching.patterns.outcome import CandidateResult, failure_report
from branching.patterns.runner import Session


def race(session: Session, futures: list[Future[CandidateResult]],
         first_wins: bool = True) -> CandidateResult | None:
    """Wait for a winner among ``futures``; stops the session's other candidates on one.

    ``first_wins``: the first candidate to succeed wins.  Otherwise the list is a
    preference order: a success wins once every candidate before it has failed.
    """
    pending = set(futures)
    while pending:
        done = session.wait_any(pending)
        pending -= done
        if first_wins:
            won = sorted((f.result() for f in done if f.result().success),
                         key=lambda r: r.index)
            if won:
                session.stop()
                return won[0]
            continue
        for f in futures:
            if not f.done():
                break
            if f.result().success:
                session.stop()
                return f.result()
    return None


class Speculate(Pattern):
    """Run all candidates at once; the first success commits, the others are killed.

    ``first_wins=False`` makes ``candidates`` a preference order instead: the
    earliest candidate in the list that succeeds commits.
    """

    kind = "speculate"

    def __init__(self, candidates: Sequence[CandidateLike], *, first_wins: bool = True,
                 **options: Any) -> None:
        super().__init__(**options)
        self.candidates = as_candidates(candidates)
        if not self.candidates:
            raise ValueError("Speculate needs at least one candidate")
        self.first_wins = first_wins

    def _search(self, session: Session) -> CandidateResult | None:
        return race(session, [session.submit(c) for c in self.candidates], self.first_wins)


class Cascaded(Pattern):
    """Race ``task`` in widening stages (``fan_out``, e.g. 1, then 2, then 4 at once).

    A stage's first success commits; when a whole stage fails, its failures
    (exit status, output tails, tracebacks) reach the next stage's attempts in
    ``BRANCHING_FEEDBACK``.  ``BRANCHING_ATTEMPT`` numbers attempts across stages.
    """

    kind = "cascaded"

    def __init__(self, task: CandidateLike, *, fan_out: Sequence[int] = (1, 2, 4),
                 **options: Any) -> None:
        super().__init__(**options)
        if not fan_out or any(w < 1 for w in fan_out):
            raise ValueError("fan_out must be a non-empty list of positive widths")
        self.task = as_candidate(task)
        self.fan_out = tuple(fan_out)

    def _search(self, session: Session) -> CandidateResult | None:
        attempt, feedback = 1, None
        for width in self.fan_out:
            futures = [session.submit(self.task, attempt=attempt + i, feedback=feedback)
                       for i in range(width)]
            attempt += width
            winner = race(session, futures)
            if winner is not None:
                return winner
            failed = [f.result() for f in futures]
            feedback = failure_report(failed)
            for r in failed:
                session.discard(r)
        return None
