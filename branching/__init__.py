"""branching: what agent code imports to try several things at once.

    from branching import Workspace, Limits
    with Workspace("~/proj") as ws, ws.branch("attempt") as b:
        b.run(["pytest", "-x"], limits=Limits(memory="2G", cpus=1, pids=256))

Names are imported on first use, so that ``branchctl`` (which imports
``branching.cli``) starts without loading the patterns, psutil or asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_HOMES = {
    "Client": "branching.client",
    "EmbeddedDaemon": "branching.embedded",
    "BranchError": "branching.errors",
    "Branch": "branching.workspace",
    "BranchRef": "branching.workspace",
    "RunResult": "branching.workspace",
    "Session": "branching.workspace",
    "AsyncSession": "branching.workspace",
    "AsyncClient": "branching.aclient",
    "Workspace": "branching.workspace",
    "Limits": "cgroups",
    **{name: "branching.patterns" for name in (
        "BeamSearch", "BestOfN", "Call", "CandidateError", "CandidateResult", "Cascaded",
        "Command", "Outcome", "Pattern", "Reflexion", "Speculate", "Tournament",
        "TreeOfThoughts")},
}

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "BeamSearch",
    "BestOfN",
    "Branch",
    "BranchError",
    "BranchRef",
    "Call",
    "CandidateError",
    "CandidateResult",
    "Cascaded",
    "Client",
    "Command",
    "EmbeddedDaemon",
    "Limits",
    "Outcome",
    "Pattern",
    "Reflexion",
    "RunResult",
    "Session",
    "Speculate",
    "Tournament",
    "TreeOfThoughts",
    "Workspace",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'branching' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from branching.aclient import AsyncClient
    from branching.client import Client
    from branching.embedded import EmbeddedDaemon
    from branching.errors import BranchError
    from branching.patterns import (
        BeamSearch,
        BestOfN,
        Call,
        CandidateError,
        CandidateResult,
        Cascaded,
        Command,
        Outcome,
        Pattern,
        Reflexion,
        Speculate,
        Tournament,
        TreeOfThoughts,
    )
    from branching.workspace import (
        AsyncSession,
        Branch,
        BranchRef,
        RunResult,
        Session,
        Workspace,
    )
    from cgroups import Limits
