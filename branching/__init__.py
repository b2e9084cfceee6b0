"""branching: what agent code imports to try several things at once.

    from branching import Workspace, Limits
    with Workspace("~/proj") as ws, ws.branch("attempt") as b:
        b.run(["pytest", "-x"], limits=Limits(memory="2G", cpus=1, pids=256))
"""

from branching.client import Client
from branching.embedded import EmbeddedDaemon
from branching.errors import BranchError
from branching.patterns import (
    BeamSearch,
    BestOfN,
    Call,
    CandidateResult,
    Cascaded,
    Command,
    Outcome,
    Reflexion,
    Speculate,
    Tournament,
    TreeOfThoughts,
)
from branching.workspace import Branch, RunResult, Workspace
from cgroups import Limits

__all__ = [
    "BeamSearch",
    "BestOfN",
    "Branch",
    "BranchError",
    "Call",
    "CandidateResult",
    "Cascaded",
    "Client",
    "Command",
    "EmbeddedDaemon",
    "Limits",
    "Outcome",
    "Reflexion",
    "RunResult",
    "Speculate",
    "Tournament",
    "TreeOfThoughts",
    "Workspace",
]
