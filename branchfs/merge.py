"""Three-way merges of a branch's files with what a sibling's commit put in their parent.

When a sibling commits, a branch that chose ``rebase`` (the default) carries on
over the new state of its parent: where it changed nothing, the parent's new
files simply show through its layers. Where both changed the same path, the
commit's check of that branch (``origins.Check``) names the path; this module
tries a text merge of the three versions, as ``git merge-file`` does:

- *base*: the parent's file just before the sibling's commit, copied into
  ``branches/<id>/merge/<key>.base`` by ``capture`` (only for the paths both
  changed; a path the parent did not have merges against an empty base);
- *theirs*: the parent's file now;
- *ours*: the branch's own file, in its upper dir.

A clean result is written to ``<key>.result`` and the store applies it (in
place, so that a process holding the file open reads the merged text): see
``Store._rebase``. Anything else (binary, symlinks, directories, a delete
against a change, a conflicting hunk) is a conflict: the branch keeps its own
version, and ``resolve`` settles it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence

from . import backing
from .view import View

DIR = "merge"
MAX_BYTES = 8 << 20  # larger files are not merged: a conflict
# git merge-file, found and run without anything from a user's environment
_GIT_PATH = "/usr/bin:/bin"


def key(path: str) -> str:
    """The file name stem of the merge files of *path*."""
    return hashlib.sha1(path.encode(), usedforsecurity=False).hexdigest()


def _regular(view: View, parts: Sequence[str], layer0: bool = False) -> bool:
    e = view.lookup(parts)
    return (e is not None and stat.S_ISREG(e.st.st_mode) and e.st.st_size <= MAX_BYTES
            and (not layer0 or e.layer == 0))


def _copy_out(view: View, parts: Sequence[str], dest: str) -> None:
    fd = view.open_read(parts, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600)
        try:
            backing.copy_data(fd, out)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def capture(mdir: str, paths: Sequence[str], parent: View, branch: View) -> None:
    """Before a sibling's commit changes *paths* of *parent*: keep the parent's
    version of each one that is a file in *branch*'s own delta too (the base of a
    later three-way merge). Other paths need none."""
    for path in paths:
        parts = path.split("/")
        if not (_regular(branch, parts, layer0=True) and _regular(parent, parts)):
            continue
        os.makedirs(mdir, mode=0o700, exist_ok=True)
        _copy_out(parent, parts, os.path.join(mdir, key(path) + ".base"))


def overlaps(upper: int, steps: Sequence[Sequence[object]], parent: View) -> list[str]:
    """The paths where a sibling's commit (its *steps*, now applied to *parent*)
    and the branch whose delta is *upper* both changed something: an entry of the
    branch at a path the commit replaced or deleted (or in a directory it moved
    in), or one that hides such a path (a deleted or replaced ancestor). Known
    from the steps themselves, so a change no origin record tells of (a kernel
    overlay's copy-up) is found too."""
    found: list[str] = []
    for step in steps:
        kind, path = step[0], str(step[1])
        if kind == "dir":  # only the directory's metadata
            continue
        parts = path.split("/")
        hit = _hidden_at(upper, parts)
        if hit is not None:
            found.append(hit)
            continue
        st = _upper_lstat(upper, parts)
        if st is None:
            continue
        if backing.is_whiteout(st) and parent.lookup(parts) is None:
            continue  # both deleted it
        if stat.S_ISDIR(st.st_mode) and not _opaque(upper, parts):
            found.extend(p for p in _files_below(upper, parts) if parent.lookup(p.split("/")))
            continue
        found.append(path)
    return list(dict.fromkeys(found))


def _upper_lstat(upper: int, parts: Sequence[str]) -> os.stat_result | None:
    try:
        fd = backing.open_dir(upper, parts[:-1])
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return backing.lstat_at(fd, parts[-1])
    finally:
        os.close(fd)


def _opaque(upper: int, parts: Sequence[str]) -> bool:
    fd = backing.open_dir(upper, parts[:-1])
    try:
        return backing.is_opaque_at(fd, parts[-1])
    finally:
        os.close(fd)


def _hidden_at(upper: int, parts: Sequence[str]) -> str | None:
    """The ancestor of *parts* the branch deleted or replaced by a non-directory."""
    for i in range(1, len(parts)):
        st = _upper_lstat(upper, parts[:i])
        if st is None:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return "/".join(parts[:i])
    return None


def _files_below(upper: int, parts: Sequence[str]) -> list[str]:
    """The non-directory entries of the branch's delta below directory *parts*."""
    out: list[str] = []
    fd = backing.open_dir(upper, parts)
    try:
        for name in sorted(os.listdir(fd)):
            st = backing.lstat_at(fd, name)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                out.extend(_files_below(upper, [*parts, name]))
            else:
                out.append("/".join([*parts, name]))
    finally:
        os.close(fd)
    return out


def attempt(mdir: str, path: str, parent: View, branch: View, *,
            markers: bool = False) -> str | None:
    """Merge the branch's file at *path* with the parent's: the result file's path,
    or None for a conflict (not regular files on both sides, binary, or a hunk
    that does not merge). *markers*: a result even with conflicting hunks, which
    then carry git's conflict markers (``resolve --markers``)."""
    parts = path.split("/")
    if not (_regular(branch, parts, layer0=True) and _regular(parent, parts)):
        return None
    os.makedirs(mdir, mode=0o700, exist_ok=True)
    stem = os.path.join(mdir, key(path))
    base = stem + ".base"
    if not os.path.exists(base):  # the parent had no such file: both added it
        with open(base, "wb"):
            pass
    _copy_out(parent, parts, stem + ".theirs")
    _copy_out(branch, parts, stem + ".ours")
    git = shutil.which("git", path=_GIT_PATH)
    if git is None:
        return None
    proc = subprocess.run(
        [git, "merge-file", "-p", "-L", "branch", "-L", "base", "-L", "parent",
         stem + ".ours", base, stem + ".theirs"],
        capture_output=True, env={"PATH": _GIT_PATH, "HOME": "/nonexistent",
                                  "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"},
        stdin=subprocess.DEVNULL, timeout=60, check=False)
    # exit status: the number of conflicting hunks; negative (255) on an error,
    # which is what a binary file gives
    if proc.returncode < 0 or proc.returncode > 127 or (proc.returncode and not markers):
        return None
    result = stem + ".result"
    fd = os.open(result, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, proc.stdout)
        os.fsync(fd)
    finally:
        os.close(fd)
    return result


def write_in_place(branch: View, path: str, result: str, served: int | None = None) -> None:
    """The branch's own file at *path* gets the content of *result*, in place (same
    inode: what holds it open reads the new text). *served*: the root of a kernel
    overlay serving the branch, written through (it keeps the file's size and cached
    pages; a write to its upper dir behind its back would not change them).
    Idempotent, for a replay."""
    parts = path.split("/")
    if not _regular(branch, parts, layer0=True):  # never open another layer for writing
        return
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if served is not None:
        dfd = backing.open_dir(served, parts[:-1])
        try:
            fd = os.open(parts[-1], flags, dir_fd=dfd)
        finally:
            os.close(dfd)
    else:
        fd, e = branch.open_top(parts, flags)
        if e.layer != 0:
            os.close(fd)
            return
    try:
        with open(result, "rb") as f:
            data = f.read()
        os.ftruncate(fd, 0)
        view = memoryview(data)
        off = 0
        while off < len(data):
            off += os.pwrite(fd, view[off:], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def forget(mdir: str, path: str) -> None:
    """Drop the merge files of *path* (resolved)."""
    stem = os.path.join(mdir, key(path))
    for suffix in (".base", ".theirs", ".ours", ".result"):
        try:
            os.unlink(stem + suffix)
        except FileNotFoundError:
            pass
