"""``Reflexion``: retry a task in a fresh branch, telling it what went wrong last time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from branching.patterns.base import Pattern
from branching.patterns.candidate import CandidateLike, Command, as_candidate
from branching.patterns.outcome import CandidateResult, failure_report
from branching.patterns.runner import Session

log = logging.getLogger(__name__)

Critique = Callable[[CandidateResult], str]


class Reflexion(Pattern):
    """Run ``task``; on failure, critique the attempt and run it again, ``max_retries`` times.

    Each attempt runs in a fresh branch of the workspace (the failed one is
    discarded once critiqued) and finds the critique of the previous attempt in
    ``BRANCHING_FEEDBACK``.  ``critique`` is

    - None: the failure report (status, output tails, traceback) is the feedback;
    - a Python function of the failed ``CandidateResult`` returning the feedback,
      called in this process while the failed branch is still there;
    - a command line (``str``, argv list or ``Command``), run in the failed
      branch with the failure report in ``BRANCHING_FAILURE``: its stdout is the
      feedback.
    """

    kind = "reflexion"

    def __init__(self, task: CandidateLike, *, max_retries: int = 3,
                 critique: Critique | str | Sequence[str] | Command | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.task = as_candidate(task)
        self.max_retries = max_retries
        self.critique = critique

    def _search(self, session: Session) -> CandidateResult | None:
        feedback = None
        for attempt in range(1, self.max_retries + 2):
            session.check()
            [result] = session.wait_all(
                [session.submit(self.task, attempt=attempt, feedback=feedback)])
            if result.success:
                return result
            feedback = self._feedback(session, result)
            session.discard(result)
        return None

    def _feedback(self, session: Session, failed: CandidateResult) -> str:
        report = failure_report([failed])
        critique = self.critique
        if critique is None:
            return report
        if isinstance(critique, str | Command) or not callable(critique):
            command = as_candidate(critique)
            assert isinstance(command, Command)
            text = session.run_command(failed, command, {"BRANCHING_FAILURE": report})
            if text is None:
                return report
            return text
        return critique(failed)
