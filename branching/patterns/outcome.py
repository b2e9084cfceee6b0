"""What a pattern returns: one ``Outcome`` holding a ``CandidateResult`` per candidate.

Both are plain data, safe to keep after the workspace is closed, and render to
JSON (``to_dict``) for ``branchctl ... --json``.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A candidate's status moves forward only:
#   queued -> running -> passed | failed | timed-out | oom | crashed | cancelled | error
# and a passed candidate may end as "committed" (the winner) or "discarded".
QUEUED = "queued"
RUNNING = "running"
PASSED = "passed"
FAILED = "failed"
TIMED_OUT = "timed-out"
OOM = "oom"
CRASHED = "crashed"
CANCELLED = "cancelled"
ERROR = "error"  # the daemon refused to create the branch or start the run


@dataclass
class CandidateResult:
    """One candidate's run in its own branch.

    ``success`` is true only when the run ended on its own with status 0 (and,
    for a Python callable, without raising or returning False); a timed-out,
    OOM-killed, crashed or cancelled candidate never succeeds.  ``branch`` stays
    set after the branch is discarded: it names where the candidate ran.  The
    output files are the daemon's run records: they outlive the branch, but an
    embedded daemon removes them when its workspace is closed.
    """

    index: int
    label: str
    attempt: int = 1
    depth: int = 1
    parent: str | None = None  # the branch this one was created in (None: the workspace)
    branch: str | None = None
    path: Path | None = None
    status: str = QUEUED
    success: bool = False
    score: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    ended_by: str | None = None  # why its run ended (RunResult.ended_by); None: no run
    duration: float | None = None
    cpu_time: float | None = None
    peak_memory: int | None = None
    stdout_path: Path | None = None
    stderr_path: Path | None = None
    exception: BaseException | None = None
    error: str | None = None  # one line, or the child's traceback text
    feedback: str | None = None  # what the candidate was told about earlier failures
    committed: bool = False  # the winner, or an ancestor of a nested winner

    @property
    def log_path(self) -> Path | None:
        """The candidate's error output (its traceback, test failures), if it was captured."""
        return self.stderr_path

    def output_tail(self, limit: int = 4000) -> str:
        """The last ``limit`` characters of stdout and stderr, for feedback and reports."""
        parts = []
        for name, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    f.seek(max(0, size - limit))
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {name} ---\n{text.rstrip()}")
        return "\n".join(parts)[-limit:]

    def describe(self) -> str:
        """One line for humans: what happened to this candidate."""
        what = self.status
        if self.status == CANCELLED and self.branch is None:
            what = "cancelled before it started"
        elif self.status == FAILED and self.exit_code is not None:
            what = f"failed (exit {self.exit_code})"
        elif self.status == CRASHED and self.signal is not None:
            what = f"crashed (signal {self.signal})"
        if self.score is not None:
            what += f", score {self.score:g}"
        if self.duration is not None:
            what += f", {self.duration:.2f}s"
        if self.error and self.status in (ERROR, FAILED) and "\n" not in self.error:
            what += f": {self.error}"
        return what

    def to_dict(self) -> dict[str, Any]:
        exc = None
        if self.exception is not None:
            exc = {
                "type": type(self.exception).__name__,
                "message": str(self.exception),
                "traceback": self.error
                or "".join(traceback.format_exception(self.exception)),
            }
        return {
            "index": self.index,
            "label": self.label,
            "attempt": self.attempt,
            "depth": self.depth,
            "parent": self.parent,
            "branch": self.branch,
            "path": str(self.path) if self.path else None,
            "status": self.status,
            "success": self.success,
            "committed": self.committed,
            "score": self.score,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "ended_by": self.ended_by,
            "duration": self.duration,
            "cpu_time": self.cpu_time,
            "peak_memory": self.peak_memory,
            "stdout_path": str(self.stdout_path) if self.stdout_path else None,
            "stderr_path": str(self.stderr_path) if self.stderr_path else None,
            "error": self.error,
            "exception": exc,
        }


@dataclass
class Outcome:
    """The result of one pattern run.

    Invariant: ``committed`` is true exactly when ``winner`` is set, and then
    the winner's branch (with, for nested patterns, its ancestors) was committed
    into the workspace; every other branch the pattern created is discarded.
    """

    pattern: str
    candidates: list[CandidateResult] = field(default_factory=list)
    winner: CandidateResult | None = None
    commit: dict[str, Any] | None = None  # the daemon's CommitResult of the top-level commit
    duration: float = 0.0

    @property
    def committed(self) -> bool:
        return self.winner is not None

    def __bool__(self) -> bool:
        return self.committed

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "committed": self.committed,
            "winner": self.winner.index if self.winner else None,
            "winner_branch": self.winner.branch if self.winner else None,
            "commit": self.commit,
            "duration": self.duration,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def failure_report(results: list[CandidateResult], limit: int = 8000) -> str:
    """What went wrong in ``results``, as feedback for the next attempt (newest last)."""
    parts = []
    per = max(500, limit // max(1, len(results)))
    for r in results:
        head = f"attempt {r.attempt} ({r.label}): {r.describe()}"
        body = r.output_tail(per)
        if r.error and r.error not in body:
            body = (body + "\n" + r.error).strip()
        parts.append(head + ("\n" + body if body else ""))
    return "\n\n".join(parts)[-limit:]


def ranked(results: list[CandidateResult]) -> list[CandidateResult]:
    """Successful results, best first: highest score, unscored last, ties by index."""
    ok = [r for r in results if r.success]
    return sorted(ok, key=lambda r: (r.score is None, -(r.score or 0.0), r.index))
