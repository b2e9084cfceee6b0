"""Agent patterns: ways to run candidates in workspace branches and commit at most one.

Every pattern is configured, then called with a ``Workspace`` (or awaited with
``arun``) and returns an ``Outcome``.  See ``base.Pattern`` for the options all
of them take and ``candidate`` for what a candidate may be.
"""

from branching.patterns.base import Pattern
from branching.patterns.best_of_n import BestOfN, Tournament
from branching.patterns.candidate import Call, Command
from branching.patterns.outcome import CandidateResult, Outcome
from branching.patterns.reflexion import Reflexion
from branching.patterns.runner import CandidateError
from branching.patterns.search import BeamSearch, TreeOfThoughts
from branching.patterns.speculate import Cascaded, Speculate

__all__ = [
    "BeamSearch", "BestOfN", "Call", "CandidateError", "CandidateResult", "Cascaded", "Command",
    "Outcome", "Pattern", "Reflexion", "Speculate", "Tournament",
    "TreeOfThoughts",
]
