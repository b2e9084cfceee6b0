"""Where a caller stands in a workspace: the directory a run starts in."""

from __future__ import annotations

import os
from pathlib import Path


def relative_cwd(where: str | os.PathLike[str] | None, base: str | os.PathLike[str],
                 branch_path: str | os.PathLike[str]) -> str:
    """*where* (default: this process's directory) relative to the workspace's root
    when it lies in the workspace *base* or in the branch at *branch_path*; "" (the
    root) elsewhere. A relative *where* is taken as relative to the root already."""
    path = Path(os.getcwd() if where is None else where)
    if not path.is_absolute():
        return path.as_posix().strip(".").strip("/")
    for root in (Path(base), Path(branch_path)):
        if path == root or root in path.parents:
            return path.relative_to(root).as_posix().strip(".")
    return ""
