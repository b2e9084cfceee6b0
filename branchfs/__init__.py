"""branchfs: the copy-on-write branching filesystem of branchd.

A pure core (``Store`` over ``View``s of layered directories, commit with a
redo journal; modules ``store``, ``view``, ``commit``, ``diff``, ``backing``,
``durable``) that never imports pyfuse3, the data plane's interface
(``backend.Backend``, ``backend.DataPlane``), and a thin pyfuse3 adapter (``fs``,
``mount.FuseBackend``, ``mount.serve``).
"""

from .backend import Backend, DataPlane
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
from .mount import FuseBackend, serve
from .store import Event, Store

__all__ = [
    "Backend", "BadName", "BaseReplaced", "Branch", "BranchFSError", "Busy", "Change",
    "CommitResult", "Conflict", "DataPlane", "Event", "Exists", "FuseBackend",
    "HasChildren", "NoSpace", "NotFound", "OutsideChange", "PermissionDenied", "Stale",
    "Store", "Workspace", "serve",
]
