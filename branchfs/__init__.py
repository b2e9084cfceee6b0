"""branchfs: the copy-on-write branching filesystem of branchd.

A pure core (``Store`` over ``View``s of layered directories, commit with a
redo journal) tested without FUSE, and a thin pyfuse3 adapter (``serve``).
"""

from .errors import (
    BadName,
    BranchFSError,
    Conflict,
    Exists,
    HasChildren,
    NoSpace,
    NotFound,
    PermissionDenied,
    Stale,
)
from .model import Branch, Change, CommitResult, Workspace
from .store import Event, Store

__all__ = [
    "BadName", "Branch", "BranchFSError", "Change", "CommitResult", "Conflict", "Event",
    "Exists", "HasChildren", "NoSpace", "NotFound", "PermissionDenied", "Stale", "Store",
    "Workspace", "serve",
]


def __getattr__(name: str) -> object:
    # serve() pulls in pyfuse3; the core stays importable without it
    if name == "serve":
        from .mount import serve

        return serve
    raise AttributeError(name)
