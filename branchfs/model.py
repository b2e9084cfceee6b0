"""The value types of the branch store and the name rules.

These are what the daemon sends over the control protocol (``to_dict``); they
are immutable snapshots, the store keeps its own records.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from dataclasses import dataclass
from typing import Any

from .errors import BadName

ACTIVE = "active"
COMMITTED = "committed"
DISCARDED = "discarded"
INVALIDATED = "invalidated"
ENDED = frozenset({COMMITTED, DISCARDED})

MAX_NAME_BYTES = 255
# control and format characters (NUL, newline, tab, ESC, an RTL override, a
# zero-width space) and line separators: names are printed in logs, lists, shells
INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def check_name(name: object, what: str) -> str:
    """Return *name* if it can name a workspace or branch (one path component)."""
    if not isinstance(name, str) or not name:
        raise BadName(f"{what} name must be a non-empty string")
    if name in (".", "..") or "/" in name:
        raise BadName(f"{what} name {name!r} may not be '.', '..' or contain '/'")
    if any(unicodedata.category(c) in INVISIBLE for c in name):
        raise BadName(f"{what} name {name!r} may not contain NUL or another control "
                      "or format character")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadName(f"{what} name {name!r} is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise BadName(f"{what} name is {size} bytes long, at most {MAX_NAME_BYTES} are allowed")
    return name


class _Dict:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class Workspace(_Dict):
    name: str
    base: str  # absolute real path of the directory the branches fork
    owner: int  # uid
    created: float
    # which directory that is (backing.identity): one removed and made again at
    # the same path (rm -rf; git clone) is another directory (Store.refresh)
    ident: str = ""


@dataclass(frozen=True)
class Branch(_Dict):
    name: str
    workspace: str
    parent: str | None  # None: forked from the workspace directory itself
    status: str  # active | committed | discarded | invalidated
    created: float
    id: str
    # forked from a directory that is no longer at the workspace's path: it can be
    # diffed and discarded, never committed into the new one
    base_replaced: bool = False
    # what a sibling's commit does to it: "rebase" (carry on over the new state of
    # the parent, merging where both changed a path) or "invalidate" (it ends)
    on_sibling_commit: str = "rebase"
    # paths where its changes and its parent's (a sibling's commit, or a change
    # made outside) could not be merged: its commit is refused until resolved
    conflicts: tuple[str, ...] = ()
    owner: int | None = None  # uid of who made it (None: a record from before owners)


@dataclass(frozen=True)
class Change(_Dict):
    kind: str  # added | modified | deleted
    path: str  # relative to the workspace root, "/"-separated
    type: str  # file | dir | symlink | other
    old_path: str | None = None


@dataclass(frozen=True)
class CommitResult(_Dict):
    branch: str
    workspace: str
    into: str | None  # parent branch, None for the workspace directory
    changes: int
    invalidated: list[str]
    seconds: float
    # siblings that carried on over the commit (on_sibling_commit "rebase"), and
    # those of them left with conflicts
    rebased: list[str] = dataclasses.field(default_factory=list)
    conflicted: list[str] = dataclasses.field(default_factory=list)
