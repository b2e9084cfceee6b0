"""Helpers shared by the branchfs tests (a unique module name: the test dirs
are not packages)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from branchfs.view import View


def w(view: View, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_TRUNC) -> None:
    parts = tuple(path.split("/"))
    if view.lookup(parts) is None:
        fd = view.create(parts, os.O_WRONLY, 0o644)
    else:
        fd = view.open_write(parts, flags)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def r(view: View, path: str) -> bytes:
    fd = view.open_read(tuple(path.split("/")))
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def tree(root: Path) -> dict[str, object]:
    """Everything observable about a directory tree, for comparisons."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
            else:
                out[rel] = ("other", st.st_mode, st.st_rdev)
    return out
