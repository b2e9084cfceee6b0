"""Resource limits and process placement for candidates: cgroup v2 first, v1 on hybrid hosts.

See README.md in this folder for the layouts supported and their caveats.
"""

from .errors import CgroupError, SpawnError
from .layout import Layout, detect
from .limits import Limits, parse_size
from .manager import Manager
from .mounts import detach, mounted, release_mountpoint, share_mountpoint
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
