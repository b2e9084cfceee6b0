"""``diff --patch``: a unified diff of a branch's changed text files.

Files are read through the paths clients see (the branch's path, and its
parent's: the workspace directory or the parent branch's path), so that with
``daemon.ascaller`` a client reads only what it could read itself. Only
regular files are read, after an lstat, opened without following a symlink and
without blocking (a FIFO must not stall the daemon).
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import stat

from branchfs import Change

LIMIT = 256 * 1024  # bytes of each side read


class Unreadable(Exception):
    """The caller may not read this side of a change."""


def patch(changes: list[Change], old_root: str, new_root: str, limit: int) -> str:
    """The patch of *changes*, whole files only, at most *limit* bytes once in JSON;
    a last line says which files did not fit."""
    out: list[str] = []
    size = 0
    for i, c in enumerate(changes):
        one = _one(c, old_root, new_root)
        size += len(json.dumps(one))
        if size > limit:
            rest = len(changes) - i
            out.append(f"# {rest} more file{'s' if rest > 1 else ''} not shown, from "
                       f"{c.path} on: the patch is cut at {limit} bytes; ask for fewer "
                       "paths (diff --patch NAME PATH...)\n")
            break
        out.append(one)
    return "".join(out)


def _one(change: Change, old_root: str, new_root: str) -> str:
    if change.type != "file":
        return ""
    old_name = change.old_path or change.path
    try:
        old = _read(old_root, old_name) if change.kind != "added" else None
        new = _read(new_root, change.path) if change.kind != "deleted" else None
    except Unreadable:
        return f"# {change.path}: not shown (you may not read it)\n"
    if b"\0" in (old or b"") + (new or b""):
        return _binary(change, old, new)
    sides = [[] if d is None else d.decode("utf-8", "replace").splitlines(keepends=True)
             for d in (old, new)]
    lines = difflib.unified_diff(sides[0], sides[1],
                                 "/dev/null" if old is None else f"a/{old_name}",
                                 "/dev/null" if new is None else f"b/{change.path}")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in lines)


def _binary(change: Change, old: bytes | None, new: bytes | None) -> str:
    if old is None:
        what = f"binary file added, {len(new or b'')} bytes"
    elif new is None:
        what = f"binary file deleted, {len(old)} bytes"
    else:
        what = f"binary file changed, {len(old)} -> {len(new)} bytes"
    return f"# {change.path}: {what}\n"


def _read(root: str, rel: str) -> bytes | None:
    """The start of the regular file *rel* below *root*, None if it is not one there."""
    path = os.path.join(root, rel)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except PermissionError:
        raise Unreadable(rel) from None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.pread(fd, LIMIT, 0)
    finally:
        os.close(fd)

