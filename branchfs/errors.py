"""Domain errors of the branch store.

Each error carries the stable protocol error code (``code``) and an errno
(``errno``) for the FUSE adapter, and its ``str()`` is one line meant for a
user: the daemon passes it through unchanged.
"""

from __future__ import annotations

import errno as _errno


class BranchFSError(Exception):
    """Base of every error the store raises on purpose."""

    code: str = "internal"
    errno: int = _errno.EIO

    def __str__(self) -> str:
        return " ".join(str(a) for a in self.args).replace("\n", " ")


class BadName(BranchFSError):
    code = "bad-name"
    errno = _errno.EINVAL


class NotFound(BranchFSError):
    code = "not-found"
    errno = _errno.ENOENT


class Exists(BranchFSError):
    code = "exists"
    errno = _errno.EEXIST


class Conflict(BranchFSError):
    """Ambiguous name, or an operation that conflicts with the branch tree."""

    code = "conflict"
    errno = _errno.EBUSY


class HasChildren(Conflict):
    """Commit refused: the branch has active child branches."""


class OutsideChange(Conflict):
    """Commit refused: the parent changed, outside the branch, paths the commit
    would overwrite or delete. ``paths`` lists them all, in plan order."""

    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


class Stale(BranchFSError):
    """The branch was invalidated by a sibling's commit (first commit wins)."""

    code = "stale"
    errno = _errno.ESTALE


class Busy(BranchFSError):
    """The workspace has a commit that failed half way and is not finished yet: nothing
    else may happen in it until it is (each request tries to finish it again)."""

    code = "busy"
    errno = _errno.EBUSY


class BaseReplaced(BranchFSError):
    """The branch was made from a directory that is no longer at its workspace's
    path (removed and made again): its changes never go into the new one."""

    code = "base-replaced"
    errno = _errno.ESTALE


class Corrupt(BranchFSError):
    """A state file the daemon wrote is damaged (not a torn last append, which is
    expected after a crash and ignored): nothing is guessed; a person must look."""


class NoSpace(BranchFSError):
    code = "no-space"
    errno = _errno.ENOSPC


class PermissionDenied(BranchFSError):
    code = "permission"
    errno = _errno.EACCES
