"""Commit: planning a branch's delta onto its parent, and applying the plan.

The plan is a list of idempotent steps computed from the branch's upper dir
against the target (the workspace base, or the parent branch's view whose
upper dir receives the changes). Each step can be applied again after a crash
with the same result, so a journaled plan rolls forward:

- ``["move", R, strip, opaque]``: if the source entry R still exists, remove
  what the target has at R and rename the source there (a whole subtree for a
  new or opaque directory). Across filesystems: copy into a temp name in the
  target directory, rename it into place, then remove the source. *strip*
  removes whiteouts and opaque marks inside the moved tree (the base gets no
  overlay artefacts); *opaque* marks the moved directory opaque in a parent's
  upper dir where a lower layer still has that name. Whatever else a kernel
  overlay wrote (``user.overlay.origin``, ``impure``...: it names the layers of
  one mount) is removed from every moved entry, into the base or a parent.
- ``["delete", R]``: remove R from the target (a directory with its content).
- ``["whiteout", R]``: in a parent's upper dir, replace R by a whiteout.
- ``["dir", R, meta]``: give the existing target directory R the branch's
  mode, owner, xattrs and times (after its children are applied).

Symlinks are moved as they are, never followed: every path is resolved from a
directory fd, one component at a time with O_NOFOLLOW (see ``backing``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import stat
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import backing, overlay
from .backing import DIR_FLAGS, at, is_whiteout, lstat_at
from .view import Entry, Parts, View

if TYPE_CHECKING:
    from .origins import Check

log = logging.getLogger(__name__)

CRASH_ENV = "BRANCHFS_CRASH_AT"

Step = list[Any]


def crash_point(name: str, n: int | None = None) -> None:
    """Fault injection for the recovery tests: ``BRANCHFS_CRASH_AT=name`` or
    ``name:n`` kills this process with SIGKILL at that point of a commit."""
    spec = os.environ.get(CRASH_ENV)
    if spec and (spec == name or (n is not None and spec == f"{name}:{n}")):
        os.kill(os.getpid(), signal.SIGKILL)


def plan(src_root: int, target: View, into_base: bool,
         check: Check | None = None) -> list[Step]:
    """The steps that apply the delta under *src_root* to *target*. *check*
    (if given) is shown every target entry a step replaces or deletes."""
    steps: list[Step] = []
    _plan_dir(src_root, (), target, into_base, steps, check)
    return steps


def _plan_dir(src_root: int, parts: Parts, target: View, into_base: bool,
              steps: list[Step], check: Check | None) -> None:
    fd = backing.open_dir(src_root, parts)
    try:
        with contextlib.ExitStack() as stack:
            find: Callable[[str], Entry | None] = _nothing
            try:  # the target's directory, resolved once for all the names in it
                find = stack.enter_context(target.dirs(parts)).find
            except (FileNotFoundError, NotADirectoryError):
                pass
            for name in sorted(os.listdir(fd)):
                _plan_entry(src_root, fd, (*parts, name), find, target, into_base, steps, check)
    finally:
        os.close(fd)


def _nothing(name: str) -> None:
    return None


def _plan_entry(src_root: int, fd: int, rel: Parts, find: Callable[[str], Entry | None],
                target: View,
                into_base: bool, steps: list[Step], check: Check | None) -> None:
    name = rel[-1]
    st = lstat_at(fd, name)
    if st is None:
        return
    path = "/".join(rel)
    te = find(name)
    if is_whiteout(st):
        if check is not None:
            check.removed(rel, te)
        if into_base:
            if te is not None:
                steps.append(["delete", path])
        elif _target_lower_has(target, rel):
            steps.append(["whiteout", path])
        else:
            steps.append(["delete", path])
        return
    if not stat.S_ISDIR(st.st_mode):
        if check is not None:
            check.replaced(rel, te)
        steps.append(["move", path, False, False])
        return
    opaque_here = backing.is_opaque_at(fd, name)
    if te is not None and te.is_dir and not opaque_here:
        # merged: only the entries below are replaced, the directory stays
        _plan_dir(src_root, rel, target, into_base, steps, check)
        steps.append(["dir", path, _dir_meta(fd, name, st)])
        return
    if check is not None:
        check.replaced(rel, te)
    steps.append(["move", path, into_base,
                  (not into_base) and _target_lower_has(target, rel)])


def bytes_to_copy(src_root: int, steps: Sequence[Step]) -> int:
    """What the moves of *steps* would write if they had to copy (another
    filesystem): the sizes of the regular files they move."""
    total = 0
    for step in steps:
        if step[0] != "move":
            continue
        rel = tuple(step[1].split("/"))
        try:
            pfd = backing.open_dir(src_root, rel[:-1])
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            total += _tree_size(pfd, rel[-1])
        finally:
            os.close(pfd)
    return total


def _tree_size(dirfd: int, name: str) -> int:
    st = lstat_at(dirfd, name)
    if st is None:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
    try:
        return sum(_tree_size(fd, child) for child in os.listdir(fd))
    finally:
        os.close(fd)


def _target_lower_has(target: View, rel: Parts) -> bool:
    """Whether a layer below the parent's upper dir has *rel* (ignoring the
    parent's own whiteouts, which the commit replaces)."""
    lower = View(target.layers[1:])
    return lower.lookup(rel) is not None


def _dir_meta(fd: int, name: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
        "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns,
        "xattrs": {k: v.hex() for k, v in backing.user_xattrs(at(fd, name))},
    }


def count_changes(steps: Sequence[Step]) -> int:
    """Changes a user would count: directory metadata refreshes are not."""
    return sum(1 for s in steps if s[0] != "dir")


class Graveyard:
    """Where replaced and deleted target entries go during a commit: a dir of
    the state's trash on the target's filesystem, emptied in the background
    later. Freeing a file's blocks can cost milliseconds (ext4 with discard);
    a rename or hard link into the graveyard costs microseconds and keeps each
    replacement a single atomic rename. ``fd`` None: other filesystem, entries
    are removed in place."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._names = (f"{os.getpid()}-{i}" for i in itertools.count())

    def bury(self, dirfd: int, name: str) -> None:
        """Remove *name* (anything, a whole tree) from *dirfd*."""
        if self.fd is not None and lstat_at(dirfd, name) is not None:
            try:
                os.rename(name, next(self._names), src_dir_fd=dirfd, dst_dir_fd=self.fd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES):
                    raise
        backing.remove_at(dirfd, name)

    def keep(self, dirfd: int, name: str) -> None:
        """Hold an extra link to the file about to be renamed over."""
        if self.fd is not None:
            try:
                os.link(name, next(self._names), src_dir_fd=dirfd, dst_dir_fd=self.fd,
                        follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK):
                    raise


class _Opened:
    """The directory the previous step used, kept open for the next steps in
    it (a plan lists a directory's entries together: one open, not one each)."""

    def __init__(self, opener: Callable[[Parts], int]) -> None:
        self._opener = opener
        self._parts: Parts | None = None
        self._fd = -1

    def get(self, parts: Parts) -> int:
        if parts != self._parts:
            self.close()
            self._fd = self._opener(parts)
            self._parts = parts
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._parts = -1, None


def apply_steps(steps: Sequence[Step], src_root: int, target: View, grave: Graveyard) -> None:
    """Apply *steps* in order (a crash point after each)."""
    tdirs = _Opened(target.upper_dir)
    sdirs = _Opened(lambda parts: backing.open_dir(src_root, parts))
    try:
        for i, step in enumerate(steps, 1):
            _apply_step(step, tdirs, sdirs, target, grave)
            crash_point("step", i)
    finally:
        tdirs.close()
        sdirs.close()


def _apply_step(step: Step, tdirs: _Opened, sdirs: _Opened, target: View,
                grave: Graveyard) -> None:
    kind, path = step[0], step[1]
    rel = tuple(path.split("/"))
    parent, name = rel[:-1], rel[-1]
    tdir = tdirs.get(parent)
    if kind == "delete":
        grave.bury(tdir, name)
    elif kind == "whiteout":
        st = lstat_at(tdir, name)
        if st is None or not is_whiteout(st):
            grave.bury(tdir, name)
            backing.make_whiteout(tdir, name)
    elif kind == "dir":
        os.close(target.upper_dir(rel))  # a parent's upper may not have it yet
        _apply_dir_meta(tdir, name, step[2])
    elif kind == "move":
        try:
            sdir = sdirs.get(parent)
        except (FileNotFoundError, NotADirectoryError):
            return  # applied before a crash, source parent already gone
        _move(sdir, name, tdir, grave, strip=step[2], opaque=step[3])
    else:
        raise ValueError(f"unknown commit step {kind!r}")


def _move(sdir: int, name: str, tdir: int, grave: Graveyard, *, strip: bool,
          opaque: bool) -> None:
    st = lstat_at(sdir, name)
    if st is None:
        return  # applied before a crash
    _prepare(sdir, name, st, strip=strip, opaque=opaque)
    tst = lstat_at(tdir, name)
    if tst is not None:
        if stat.S_ISDIR(tst.st_mode) or stat.S_ISDIR(st.st_mode):
            grave.bury(tdir, name)
        elif stat.S_ISREG(tst.st_mode):
            grave.keep(tdir, name)
    try:
        os.rename(name, name, src_dir_fd=sdir, dst_dir_fd=tdir)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(sdir, name, st, tdir)


def _prepare(sdir: int, name: str, st: os.stat_result, *, strip: bool, opaque: bool) -> None:
    """Make the source entry ready to land in the target: drop a kernel overlay's
    xattrs everywhere in it; for the base also every whiteout and opaque mark;
    for a parent's upper dir set the opaque mark where asked. Done on the source
    side, before the rename, so a replay repeats it."""
    if is_whiteout(st):
        return
    overlay.drop_kernel_xattrs(sdir, name)
    if not stat.S_ISDIR(st.st_mode):
        return
    if opaque:
        backing.set_opaque_at(sdir, name)
    elif strip:
        backing.clear_opaque_at(sdir, name)
    fd = os.open(name, DIR_FLAGS, dir_fd=sdir)
    try:
        for child in os.listdir(fd):
            cst = lstat_at(fd, child)
            if cst is None:
                continue
            if strip and is_whiteout(cst):
                os.unlink(child, dir_fd=fd)
            else:
                _prepare(fd, child, cst, strip=strip, opaque=False)
    finally:
        os.close(fd)


def _copy_across(sdir: int, name: str, st: os.stat_result, tdir: int) -> None:
    """rename(2) across filesystems: copy to a temp name in the target dir,
    rename it over the target, then remove the source (so a replay redoes it)."""
    tmp = f".branchfs-commit.{name}"[:250]
    backing.remove_at(tdir, tmp)
    if stat.S_ISDIR(st.st_mode):
        _copy_tree(sdir, name, st, tdir, tmp)
    else:
        backing.copy_entry(sdir, name, st, tdir, tmp, tmpdir=tdir)
    tst = lstat_at(tdir, name)
    if tst is not None and stat.S_ISDIR(tst.st_mode):
        backing.remove_at(tdir, name)
    os.rename(tmp, name, src_dir_fd=tdir, dst_dir_fd=tdir)
    backing.remove_at(sdir, name)


def _copy_tree(sdir: int, name: str, st: os.stat_result, tdir: int, tname: str) -> None:
    os.mkdir(tname, 0o700, dir_fd=tdir)
    sfd = os.open(name, DIR_FLAGS, dir_fd=sdir)
    try:
        dfd = os.open(tname, DIR_FLAGS, dir_fd=tdir)  # O_NOFOLLOW: never a symlink swapped in
        try:
            for child in os.listdir(sfd):
                cst = lstat_at(sfd, child)
                if cst is None:
                    continue
                if stat.S_ISDIR(cst.st_mode):
                    _copy_tree(sfd, child, cst, dfd, child)
                else:
                    backing.copy_entry(sfd, child, cst, dfd, child, tmpdir=dfd)
            # through the directory's own fd, not its name (users write the target)
            backing.set_meta(dfd, st, at(sdir, name))
            if backing.is_opaque_at(sdir, name):
                os.setxattr(dfd, backing.OPAQUE_XATTR, b"y")
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _apply_dir_meta(tdir: int, name: str, meta: dict[str, Any]) -> None:
    """The branch's mode, owner, xattrs and times onto the target directory *name*,
    through a descriptor opened with O_NOFOLLOW: the target is a directory users may
    write, and a symlink swapped in for *name* must not get a setuid mode."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=tdir)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
            raise
        log.warning("commit: %s is no longer a directory (changed during the commit); "
                    "its metadata is not applied", name)
        return
    try:
        if os.geteuid() == 0:
            os.chown(fd, meta["uid"], meta["gid"])
        os.chmod(fd, meta["mode"])
        want = {k: bytes.fromhex(v) for k, v in meta["xattrs"].items()}
        have = dict(backing.user_xattrs(at(fd, ".")))
        for k in have.keys() - want.keys():
            os.removexattr(fd, k)
        for k, v in want.items():
            if have.get(k) != v:
                os.setxattr(fd, k, v)
        os.utime(fd, ns=(meta["atime_ns"], meta["mtime_ns"]))
    finally:
        os.close(fd)
