"""branchfs: the copy-on-write branching filesystem of branchd.

A pure core (``Store`` over ``View``s of layered directories, commit with a
redo journal; modules ``store``, ``view``, ``commit``, ``diff``, ``backing``,
``durable``) that never imports pyfuse3, and a thin pyfuse3 adapter (``fs``,
``mount.serve``).
"""

from .errors import (
    BadName,
    BaseReplaced,
    BranchFSError,
    Busy,
    Conflict,
    Exists,
    HasChildren,
    NoSpace,
    NotFound,
    OutsideChange,
    PermissionDenied,
    Stale,
)
from .model import Branch, Change, CommitResult, Workspace
from .mount import serve
from .store import Event, Store

__all__ = [
    "BadName", "BaseReplaced", "Branch", "BranchFSError", "Busy", "Change", "CommitResult",
    "Conflict", "Event", "Exists", "HasChildren", "NoSpace", "NotFound", "OutsideChange",
    "PermissionDenied", "Stale", "Store", "Workspace", "serve",
]
