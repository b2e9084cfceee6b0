"""Candidates: a command line or a Python callable, run in a branch by the daemon.

A candidate is given to a pattern as

- a ``str`` (run by ``/bin/sh -c``) or a list of strings (an argv): success is
  exit status 0; a score, if any, is the last line the command wrote to the
  file named by ``$BRANCHING_SCORE_FILE`` or to its file descriptor 3;
- a Python callable taking the branch's path (the workspace's path, where the
  run sees its branch): it is pickled with cloudpickle, so lambdas, closures
  and functions defined in ``__main__`` (a script, a REPL, a notebook,
  ``python - <<EOF``) travel by value and the child never imports or re-runs
  the caller's script; functions of importable modules travel by reference.
  It runs in ``python .../branching/patterns/_child.py`` in the daemon's
  cgroup-limited child.  Returning None or True succeeds, False fails, a
  number succeeds with that score; raising fails and the exception comes back
  to the caller;
- a ``Command`` or ``Call`` built here, to give it a label.

Patterns that take several candidates take a list of these: a list of strings
is a list of shell commands; an argv in that list is itself a list.

Every candidate sees ``BRANCHING_ATTEMPT`` (1, 2, ...), ``BRANCHING_SCORE_FILE``
and, when a pattern passes context forward, ``BRANCHING_FEEDBACK``.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# fd 3 is opened onto the score file by this shell prelude: the daemon passes
# only fds 0-2 to a run, so the candidate's own fd 3 cannot be handed through.
_FD3 = 'exec 3>>"$BRANCHING_SCORE_FILE" || exit 125; '
FEEDBACK_LIMIT = 64 * 1024  # bytes of feedback passed in the environment
_CHILD = Path(__file__).with_name("_child.py")


@dataclass(frozen=True)
class Command:
    """A command line: ``argv`` a shell string or a list of arguments."""

    argv: str | Sequence[str]
    label: str | None = None

    def __post_init__(self) -> None:
        if not self.argv or not isinstance(self.argv, str) and not all(
                isinstance(a, str) for a in self.argv):
            raise TypeError(f"a command is a shell string or a non-empty argv list: {self.argv!r}")

    def name(self) -> str:
        if self.label:
            return self.label
        text = self.argv if isinstance(self.argv, str) else " ".join(self.argv)
        return text if len(text) <= 60 else text[:57] + "..."

    def command(self, scratch: Path) -> list[str]:
        if isinstance(self.argv, str):
            return ["/bin/sh", "-c", _FD3 + self.argv]
        return ["/bin/sh", "-c", _FD3 + 'exec "$@"', "sh", *self.argv]


@dataclass(frozen=True)
class Call:
    """A Python callable run in the branch's child process as ``fn(path)``."""

    fn: Callable[[Path], Any]
    label: str | None = None

    def __post_init__(self) -> None:
        self.pickled()

    def pickled(self) -> bytes:
        import cloudpickle  # only for callables: a command-line pattern does not load it

        try:
            return bytes(cloudpickle.dumps(self.fn))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(
                f"candidate {self.fn!r} cannot be pickled ({e}): it holds something that "
                "cannot cross to another process (a lock, an open file, a connection)"
            ) from None

    def name(self) -> str:
        if self.label:
            return self.label
        fn = self.fn
        inner = getattr(fn, "func", fn)  # functools.partial
        text = getattr(inner, "__qualname__", None) or type(inner).__name__
        args = getattr(fn, "args", ())
        if args:
            text += "(" + ", ".join(_short(a) for a in args) + ")"
        return text

    def command(self, scratch: Path) -> list[str]:
        # the caller's sys.path: for the functions pickled by reference, and for cloudpickle
        payload = {"sys_path": [p for p in sys.path if p], "fn": self.pickled()}
        call = scratch / "call.pickle"
        call.write_bytes(pickle.dumps(payload))
        # by path, not -m: the child then imports nothing of branching but what the
        # callable itself needs (the package's __init__ alone costs a few 100 ms)
        return [sys.executable, str(_CHILD), str(call), str(scratch / "result.pickle")]


Candidate = Command | Call
CandidateLike = str | Sequence[str] | Callable[[Path], Any] | Command | Call


def as_candidate(obj: CandidateLike) -> Candidate:
    """Normalize what a caller passed; a TypeError here is the caller's mistake."""
    if isinstance(obj, Command | Call):
        return obj
    if isinstance(obj, str):
        return Command(obj)
    if callable(obj):
        return Call(obj)
    if isinstance(obj, Sequence) and obj and all(isinstance(a, str) for a in obj):
        return Command(list(obj))
    raise TypeError(f"not a candidate: {obj!r} (a command line, an argv list or a callable)")


def as_candidates(objs: CandidateLike | Sequence[CandidateLike]) -> list[Candidate]:
    """A list of candidates; a single str or callable is one candidate, a list is one
    candidate per item (so a list of strings is a list of shell commands)."""
    if isinstance(objs, str | Command | Call) or callable(objs):
        return [as_candidate(objs)]  # type: ignore[arg-type]
    # a list of strings is that many shell commands (the README's Speculate(["git apply
    # a.diff && pytest -q", ...])); one argv as the only candidate is [argv] or Command(argv)
    return [as_candidate(o) for o in objs]  # type: ignore[union-attr]


def env_text(text: str) -> str:
    """``text`` fit for an environment variable: no NUL, at most FEEDBACK_LIMIT (its tail)."""
    return text.replace("\0", "")[-FEEDBACK_LIMIT:]


def read_score(path: Path) -> float | None:
    """The last number a candidate wrote to its score file, or None."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        if line.strip():
            try:
                return float(line.strip())
            except ValueError:
                return None
    return None


def _short(value: Any) -> str:
    text = os.path.basename(value) if isinstance(value, str | Path) else repr(value)
    return text if len(text) <= 30 else text[:27] + "..."
