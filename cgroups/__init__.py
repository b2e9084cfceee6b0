"""Resource limits and process placement for candidates: cgroup v2 first, v1 on hybrid hosts.

See README.md in this folder for the layouts supported and their caveats.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CgroupError, SpawnError
from .layout import Layout, detect
from .limits import Limits, parse_size
from .mounts import detach, mounted, release_mountpoint, share_mountpoint

# The process machinery (psutil, threads) loads on first use: clients that only
# need Limits, such as branchctl, start without it.
_LAZY = {"Manager": ".manager", "Run": ".run", "RunResult": ".run"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cgroups' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .manager import Manager
    from .run import Run, RunResult

__all__ = [
    "CgroupError",
    "Layout",
    "Limits",
    "Manager",
    "Run",
    "RunResult",
    "SpawnError",
    "detach",
    "detect",
    "mounted",
    "parse_size",
    "release_mountpoint",
    "share_mountpoint",
]
