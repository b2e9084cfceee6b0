"""What a FUSE server process knows of the Store: one branch's view, and the records
of its workspace's branches as the daemon last told them.

The daemon owns the state; a server process (``branchfs.child``) never reads
``state.json`` or a journal. It gets, once, descriptors of its branch's layers
(the same directories the Store holds open) and the records of the workspace,
and then every Store event that concerns the workspace, in order
(``apply``). The delta on disk is the only data both sides touch: the process
writes the branch's upper dir and its origins log, the daemon moves them only
while the process is quiesced (``docs/format.md``, "FUSE server processes").
It offers the part of the Store's interface ``Operations`` uses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from .errors import NotFound
from .model import ACTIVE, Branch, Workspace
from .origins import Origins
from .store import Event
from .view import View

log = logging.getLogger(__name__)


class Replica:
    """Invariant: ``view`` is the view of branch ``bid`` over ``fds`` (owned here);
    ``_branches`` holds the workspace's records by id."""

    def __init__(self, msg: dict[str, Any], fds: Sequence[int]) -> None:
        self.state_dir: str = msg["state_dir"]
        self.workspace_name: str = msg["ws"]
        self.bid: str = msg["bid"]
        self._owner: int = msg.get("owner", 0)
        self._fds = list(fds)
        self._origins_path: str = msg["origins"]
        self._shared = bool(msg.get("shared", False))
        self._branches = {b["id"]: _branch(b) for b in msg["branches"]}
        self.view = View(self._fds[:-1], work=self._fds[-1], origins=self._open_origins())

    def _open_origins(self) -> Origins:
        return Origins(self._origins_path)

    # -- the Store's interface, as far as Operations uses it ---------------------

    def status(self, bid: str) -> str | None:
        b = self._branches.get(bid)
        return b.status if b is not None else None

    def view_by_id(self, bid: str) -> View:
        if bid != self.bid:
            raise NotFound(f"branch {bid} is not served here")
        return self.view

    def branches(self, workspace: str | None = None) -> list[Branch]:
        return list(self._branches.values())

    def branch(self, workspace: str, name: str) -> Branch:
        for b in self._branches.values():
            if b.name == name and b.status == ACTIVE:
                return b
        for b in self._branches.values():
            if b.name == name:
                return b
        raise NotFound(f"no branch {name} in {workspace}")

    def shared(self, bid: str) -> bool:
        return bid == self.bid and self._shared

    def workspace(self, name: str) -> Workspace:
        return Workspace(name, "", self._owner, 0.0)

    def workspaces(self) -> list[Workspace]:
        return [self.workspace(self.workspace_name)]

    # -- what the daemon tells ---------------------------------------------------

    def apply(self, msg: dict[str, Any]) -> Event:
        """Take in one Store event (as ``event_message`` wrote it), for ``Operations``."""
        b = _branch(msg["branch"]) if msg.get("branch") else None
        if b is not None:
            self._branches[b.id] = b
        if msg["kind"] == "branch-shared" and b is not None and b.id == self.bid:
            self._shared = True
        if msg["kind"] in ("committed", "rebased") and msg.get("target") == self.bid:
            # the daemon wrote this branch's origins log (merges, adopted records)
            old, self.view.origins = self.view.origins, self._open_origins()
            if old is not None:
                old.close()
        paths = msg.get("paths")
        return Event(msg["kind"], msg["workspace"], b, msg.get("target"),
                     tuple(paths) if paths is not None else ())

    def close(self) -> None:
        self.view.close()
        if self.view.origins is not None:
            self.view.origins.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _branch(d: dict[str, Any]) -> Branch:
    return Branch(**{**d, "conflicts": tuple(d.get("conflicts", ()))})


def event_message(ev: Event, max_paths: int) -> dict[str, Any]:
    """A Store event as the daemon sends it; more than *max_paths* paths are sent as
    ``"paths": null``, "everything of the target may have changed"."""
    paths: list[str] | None = list(ev.paths)
    if paths is not None and len(paths) > max_paths:
        paths = None
    return {"op": "event", "kind": ev.kind, "workspace": ev.workspace,
            "branch": ev.branch.to_dict() if ev.branch is not None else None,
            "target": ev.target, "paths": paths}
