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
        return _root_is_empty(path)
    for root in (Path(base), Path(branch_path)):
        if path == root or root in path.parents:
            return _root_is_empty(path.relative_to(root))
    return ""


def _root_is_empty(relative: Path) -> str:
    text = relative.as_posix()  # "." for the root; ".venv" stays ".venv"
    return "" if text == "." else text
