"""fsck: the daemon's state checked against what is on disk and in the kernel.

One finding per thing found wrong, each with a stable ``kind``, a ``level`` and
one line of text; with *repair*, what can be put right without losing anything
of the user's is, and the finding says what was done. Levels:

- ``error``: the daemon's own state is damaged or left over (an orphan delta, a
  leftover journal, an unreadable log, an overlay or cgroup nobody owns);
- ``warning``: something the user did that needs their hand (a workspace
  directory gone, a live branch whose delta is gone): reported, never repaired;
- ``info``: worth knowing, nothing to do (a kept journal, a branch of a replaced
  directory).

``branchctl fsck`` exits 1 while an error or warning remains unrepaired. The
checks read through the Store, the Overlays and the cgroups Manager (their
public methods); docs/format.md lists them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import trio

from branchfs import overlay
from branchfs.durable import TMP_SUFFIX, read_log
from branchfs.errors import Corrupt
from branchfs.model import ACTIVE, ENDED
from branchfs.store import KEPT, STATE_FILE

if TYPE_CHECKING:
    import branchfs
    from daemon.overlays import Overlays
    from daemon.runs import RunTable

log = logging.getLogger(__name__)

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass
class Finding:
    kind: str
    level: str
    message: str
    path: str | None = None
    repaired: str | None = None  # what --repair did about it

    @property
    def open(self) -> bool:
        """Still to be dealt with: an error or warning that was not repaired."""
        return self.level != INFO and self.repaired is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        done = f" [repaired: {self.repaired}]" if self.repaired else ""
        return f"{self.level}: {self.kind}: {self.message}{done}"


class Fsck:
    """One check (and, with *repair*, repair) of a running daemon's state."""

    def __init__(self, store: branchfs.Store, overlays: Overlays, runs: RunTable, *,
                 mountpoint: str, repair: bool) -> None:
        self.store = store
        self.overlays = overlays
        self.runs = runs
        self.mountpoint = mountpoint
        self.repair = repair
        self.findings: list[Finding] = []

    def add(self, kind: str, level: str, message: str, path: str | None = None) -> Finding:
        f = Finding(kind, level, message, path)
        self.findings.append(f)
        return f

    async def run(self) -> list[Finding]:
        self.state_files()
        self.deltas()
        self.journals()
        self.workspaces()
        await self.overlay_mounts()
        self.cgroups()
        self.trash()
        for f in self.findings:
            (log.warning if f.open else log.info)("fsck: %s", f.line())
        return self.findings

    def _state(self, *parts: str) -> str:
        return os.path.join(self.store.state_dir, *parts)

    # -- the state directory -----------------------------------------------------

    def state_files(self) -> None:
        try:
            with open(self._state(STATE_FILE), "rb") as f:
                json.load(f)
        except (OSError, ValueError) as exc:
            self.add("state-file", ERROR, f"{STATE_FILE} cannot be read back: {exc}",
                     self._state(STATE_FILE))
        self._log("state-log", self.store.log_path())
        for b in self.store.branches():
            path = self._state("branches", b.id, "origins")
            if os.path.exists(path):
                self._log("origins", path, f" (branch {b.workspace}/{b.name})")

    def _log(self, kind: str, path: str, whose: str = "") -> None:
        try:
            read_log(path)
        except (OSError, Corrupt) as exc:
            self.add(kind, ERROR, f"{exc}{whose}", path)

    def deltas(self) -> None:
        """Every live branch has its delta; every delta directory a live branch."""
        live = {b.id: b for b in self.store.branches()}
        for bid, b in live.items():
            missing = [d for d in ("upper", "work")
                       if not os.path.isdir(self._state("branches", bid, d))]
            if missing:
                self.add("missing-delta", WARNING,
                         f"branch {b.workspace}/{b.name} has no {' or '.join(missing)} "
                         f"directory: what it held is lost; discard it",
                         self._state("branches", bid))
        for bid in sorted(os.listdir(self._state("branches"))):
            if bid in live:
                continue
            path = self._state("branches", bid)
            record = self.store.branch_by_id(bid)
            why = "no branch" if record is None else f"branch {record.name}, {record.status},"
            f = self.add("orphan-delta", ERROR, f"{path}: {why} owns this delta directory",
                         path)
            if self.repair and self.store.trash_orphan(bid):
                f.repaired = "moved to the trash"

    def journals(self) -> None:
        jdir = self._state("journal")
        pending = self.store.pending_journals()
        for name in sorted(os.listdir(jdir)):
            path = os.path.join(jdir, name)
            if name.startswith(KEPT):
                self.add("kept-journal", INFO, f"{path}: a commit not replayed, its workspace "
                         "directory having been replaced (kept for reference)", path)
                continue
            if path in pending:
                continue  # a commit that failed half way: each request tries to finish it
            f = self.add("journal", ERROR, self._journal_text(path, name), path)
            if self.repair and not name.endswith(TMP_SUFFIX):
                try:
                    if self.store.remove_done_journal(path):
                        f.repaired = "removed: its commit is done"
                except (OSError, ValueError) as exc:
                    f.message += f" (unreadable: {exc})"

    def _journal_text(self, path: str, name: str) -> str:
        try:
            with open(path, "rb") as f:
                journal = json.load(f)
            record = self.store.branch_by_id(journal["branch"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{path}: a leftover journal that cannot be read: {exc}"
        state = "forgotten" if record is None else record.status
        return (f"{path}: a leftover journal of the commit of {journal.get('workspace')}/"
                f"{journal.get('name')} (branch {state}) while no commit is pending")

    def workspaces(self) -> None:
        for ws in self.store.workspaces():
            self.store.refresh(ws.name)
            if not self.store.has_directory(ws.name):
                self.add("workspace-gone", WARNING, f"workspace {ws.name}: {ws.base} is gone "
                         "or no directory: new branches are refused until one is there",
                         ws.base)
        for b in self.store.branches():
            if b.base_replaced:
                self.add("base-replaced", INFO, f"branch {b.workspace}/{b.name} forks a "
                         "directory no longer at its workspace's path: diff or discard it")

    def trash(self) -> None:
        waiting = self.store.trash_waiting()
        # the graveyard of a commit that failed half way is emptied once it is finished
        waiting |= {os.path.basename(p).removesuffix(".json")
                    for p in self.store.pending_journals()}
        stuck = [n for n in sorted(os.listdir(self._state("trash"))) if n not in waiting]
        if not stuck:
            return
        f = self.add("trash", ERROR, f"{len(stuck)} entries of trash/ are not being deleted: "
                     f"{', '.join(stuck[:5])}{' ...' if len(stuck) > 5 else ''}",
                     self._state("trash"))
        if self.repair:
            self.store.empty_trash()
            f.repaired = "queued for deletion again"

    # -- the kernel: overlays, cgroups ------------------------------------------

    async def overlay_mounts(self) -> None:
        served = self.overlays.served()
        attached = overlay.overlay_mounts()
        ids = {mid for mid, _ in attached}
        for bid in list(served):
            b = self.store.branch_by_id(bid)
            if b is None or b.status in ENDED:
                name = bid if b is None else f"{b.workspace}/{b.name} ({b.status})"
                f = self.add("overlay-ended", ERROR, f"an overlay is mounted for ended "
                             f"branch {name}")
                if self.repair and b is not None:
                    self.overlays.detach([b])
                    f.repaired = "detached"
        if self.overlays.backend == "overlay":
            for b in self.store.branches():
                if (b.status != ACTIVE or self.store.pending(b.workspace)
                        or served.get(b.id) in ids):
                    continue
                f = self.add("overlay-missing", ERROR, f"active branch {b.workspace}/{b.name} "
                             "has no overlay mounted: FUSE serves it, slower",
                             self.overlays.path_of(b))
                if self.repair:
                    await self.overlays.heal([b])
                    await self.overlays.serve(b)
                    if self.overlays.serves(b.id):
                        f.repaired = "mounted again"
        ours = set(self.overlays.served().values())
        below = self.mountpoint.rstrip("/") + "/"
        for mid, point in attached:
            if mid in ours or not point.startswith(below):
                continue
            f = self.add("overlay-stray", ERROR, f"an overlay at {point} that the daemon "
                         "did not mount (or lost track of)", point)
            if self.repair and await trio.to_thread.run_sync(_detach_top, point, mid):
                f.repaired = "detached"

    def cgroups(self) -> None:
        manager = self.runs.manager
        for path in manager.leftovers():
            self.add("cgroup-leftover", ERROR, f"{path}: the cgroup of an ended run could "
                     "not be removed", path)
        if self.repair and manager.leftovers():
            removed = set(manager.remove_leftovers())
            for f in self.findings:
                if f.kind == "cgroup-leftover" and f.path in removed:
                    f.repaired = "removed"
        for path in manager.strays():
            f = self.add("cgroup-stray", ERROR, f"{path}: a cgroup no run of this daemon "
                         "owns", path)
            if self.repair:
                try:
                    os.rmdir(path)  # refused by the kernel while processes are in it
                    f.repaired = "removed (it was empty)"
                except OSError as exc:
                    f.message += f" (kept: {exc.strerror})"


def _detach_top(point: str, mid: int) -> bool:
    """On a worker thread (the path resolves through our own FUSE mount): lazily
    unmount the overlay at *point* if it is the one on top there (id *mid*)."""
    try:
        fd = os.open(point, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if overlay.mount_id(fd) != mid:
            return False  # under another mount: not reachable by its path
        return overlay.detach(overlay.fd_path(fd), follow=True)
    finally:
        os.close(fd)
