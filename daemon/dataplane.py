"""The daemon's data plane: kernel overlays (when chosen) over the FUSE mount.

``branchfs.backend`` holds the interface every backend implements and the
generic ``DataPlane``; this adds what the daemon's control plane asks of its
two backends beyond it: where a branch is served (the same path with both),
which backend was chosen and why, and the overlays' healing of mounts the
kernel detached on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import branchfs
from daemon.fuseprocs import FuseProcs
from daemon.overlays import Overlays


class Plane(branchfs.DataPlane):
    """``overlays`` over ``procs`` (FUSE server processes, where there are) over
    ``fuse``: a branch's path reaches its overlay mount if it has one, else its
    server process's mount, else the daemon's FUSE mount."""

    def __init__(self, store: branchfs.Store, mountpoint: Path, fuse: branchfs.FuseBackend,
                 overlays: Overlays, procs: FuseProcs | None = None) -> None:
        super().__init__(store, [overlays, *([procs] if procs else []), fuse])
        self.mountpoint = mountpoint
        self.fuse = fuse
        self.overlays = overlays
        self.procs = procs

    def server_pid(self, bid: str) -> int | None:
        """The FUSE server process serving *bid*, None where the daemon serves it."""
        return self.procs.server_pid(bid) if self.procs is not None else None

    @property
    def backend(self) -> str:
        """The backend chosen at start-up (``daemon.overlays.choose``)."""
        return self.overlays.backend

    @property
    def reason(self) -> str:
        return self.overlays.reason

    def path_of(self, branch: branchfs.Branch) -> str:
        return str(self.mountpoint / branch.workspace / branch.name)

    async def heal(self, branches: Iterable[branchfs.Branch]) -> None:
        """Mount again the overlays the kernel detached behind our back."""
        await self.overlays.heal(branches)
