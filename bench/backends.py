"""The ways a workspace is branched, behind one interface: plain copies (native), kernel
overlayfs, and branchd through its Python API and its CLI (bench/branchd_backend.py).

A backend gives workspaces; a workspace creates, commits and discards named branches. Only
the operation itself is timed by the scenarios; what a backend may do later (removing the old
tree after a native swap) waits in ``settle()``, called outside the timed region.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from bench import agent

log = logging.getLogger(__name__)

class BenchWorkspace(ABC):
    """A base tree and its branches. Invariant: every name passed to ``commit``, ``discard``
    and ``path`` was returned by ``create`` and not yet committed or discarded."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.live: set[str] = set()  # branches created and not yet committed or discarded
        self.checks: list[str] = []  # what this workspace checked on its own, for the rows

    def create(self, name: str) -> Path:
        """Make branch ``name`` of the base; return the directory it is seen at."""
        path = self._create(name)
        self.live.add(name)
        return path

    def create_verified(self, name: str) -> Path:
        """``create`` and then ``verify``: for branches whose creation is not timed."""
        path = self.create(name)
        self.verify(name)
        return path

    def commit(self, name: str) -> None:
        """Make the branch's changes the base's; the branch is gone afterwards."""
        self.live.discard(name)
        self._commit(name)

    def discard(self, name: str) -> None:
        """Drop the branch and its changes."""
        self.live.discard(name)
        self._discard(name)

    @abstractmethod
    def _create(self, name: str) -> Path: ...

    @abstractmethod
    def _commit(self, name: str) -> None: ...

    @abstractmethod
    def _discard(self, name: str) -> None: ...

    @abstractmethod
    def path(self, name: str) -> Path:
        """Where branch ``name`` is seen."""

    def verify(self, name: str) -> None:  # noqa: B027 (a hook: only branchd has a choice)
        """Check, untimed, that branch ``name`` is served the way the column says."""

    def run(self, name: str, argv: list[str]) -> int:
        """Run ``argv`` in the branch the way this backend runs a candidate; its exit status."""
        return subprocess.run(argv, cwd=self.path(name), check=False).returncode

    def agent(self, name: str, tarball: Path, modules: int, edits: int,
              home: Path) -> dict[str, float]:
        """The agent workload in branch ``name``, run where this backend runs it (here,
        in this process); seconds per step."""
        return agent.run(self.path(name), tarball, modules, edits, home)

    def settle(self) -> None:  # noqa: B027 (a hook: most backends defer nothing)
        """Finish deferred work (untimed)."""

    def probes(self) -> dict[str, Callable[[], object]]:
        """The control requests whose latency the ``control`` scenario measures, by row
        name (only a daemon has any)."""
        return {}

    def close(self) -> None:
        """Discard the branches a failed scenario left, then release what the workspace holds."""
        for name in list(self.live):
            self.discard(name)


class Backend(ABC):
    """One column of the table."""

    name: str
    scenarios: frozenset[str] | None = None  # the scenarios it takes part in; None: all

    @property
    def group(self) -> str:
        """Backends of one group share a process: when one hangs, the others are skipped."""
        return self.name

    @abstractmethod
    def workspace(self, base: Path) -> BenchWorkspace:
        """Register ``base`` (untimed)."""

    def close(self) -> None:  # noqa: B027 (a hook: most backends start nothing)
        """Stop whatever the backend started."""

    def profiled_pid(self) -> int | None:
        """The process whose stacks a profile of this backend should sample."""
        return None


# --- native: cp -a, a rename swap, rm -rf ---------------------------------------------------


class NativeWorkspace(BenchWorkspace):
    """Branches are full copies beside the base. Commit swaps the copy in with two renames and
    leaves the old tree to ``settle()``: its removal costs what a discard costs and can run in
    the background, so the commit row shows the swap alone."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.branches = base.parent / f"{base.name}.branches"
        self.branches.mkdir()
        self._old: list[Path] = []

    def path(self, name: str) -> Path:
        return self.branches / name

    def _create(self, name: str) -> Path:
        dst = self.path(name)
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.base), str(dst)], check=True)
        return dst

    def _commit(self, name: str) -> None:
        old = self.branches / f".{name}.old"
        os.rename(self.base, old)
        os.rename(self.path(name), self.base)
        self._old.append(old)

    def _discard(self, name: str) -> None:
        subprocess.run(["rm", "-rf", str(self.path(name))], check=True)

    def settle(self) -> None:
        for old in self._old:
            shutil.rmtree(old)
        self._old.clear()

    def close(self) -> None:
        super().close()
        self.settle()
        shutil.rmtree(self.branches)


class NativeBackend(Backend):
    name = "native"

    def workspace(self, base: Path) -> BenchWorkspace:
        return NativeWorkspace(base)


# --- kernel overlayfs ----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_OVERLAY_OPTS = "redirect_dir=off,metacopy=off,index=off"
_OPAQUE_XATTR = "trusted.overlay.opaque"


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    """mount(2) directly: the ``mount`` binary's fork and exec would dominate a create."""
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},{_OVERLAY_OPTS}"
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount overlay on {target}: {os.strerror(e)}")


_MNT_DETACH = 2


def umount(target: Path) -> None:
    """Unmount; a mount still busy (a job that outlived a failed scenario) is detached lazily."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return
    e = ctypes.get_errno()
    if e == errno.EBUSY and _libc.umount2(os.fsencode(target), _MNT_DETACH) == 0:
        log.warning("%s was busy: detached lazily", target)
        return
    raise OSError(e, f"umount {target}: {os.strerror(e)}")


def overlay_unavailable(scratch: Path) -> str | None:
    """Why kernel overlayfs cannot be measured here, or None when a test mount works."""
    if os.geteuid() != 0:
        return "overlayfs needs root"
    dirs = [scratch / d for d in ("lower", "upper", "work", "mnt")]
    for d in dirs:
        d.mkdir(parents=True)
    try:
        mount_overlay(*dirs)
    except OSError as e:
        return f"mount -t overlay failed: {e}"
    else:
        umount(dirs[3])
    finally:
        shutil.rmtree(scratch)
    return None


def apply_upper(upper: Path, lower: Path) -> None:
    """Commit an overlay branch: move its upper directory's entries into the lower tree.

    Whiteouts (0/0 character devices) delete, opaque directories replace, other directories
    merge, everything else is renamed over the lower entry (same filesystem, so atomic per
    entry). Directory metadata changes are not carried over: the rows only change files.
    """
    with os.scandir(upper) as entries:
        for entry in entries:
            dst = lower / entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                _remove(dst)
            elif stat.S_ISDIR(st.st_mode):
                if dst.is_dir() and not dst.is_symlink() and not _opaque(entry.path):
                    apply_upper(Path(entry.path), dst)
                else:
                    _remove(dst)
                    os.rename(entry.path, dst)
            else:
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                os.rename(entry.path, dst)


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError as e:
        if e.errno == errno.ENODATA:
            return False
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class OverlayWorkspace(BenchWorkspace):
    """Each branch is an overlay mount of the base (lower) with its own upper and work
    directories. Invariant: the base is changed only while no branch of it is mounted
    (commit unmounts first), as overlayfs requires."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.state = base.parent / f"{base.name}.overlay"
        for sub in ("upper", "work", "mnt"):
            (self.state / sub).mkdir(parents=True)

    def path(self, name: str) -> Path:
        return self.state / "mnt" / name

    def _create(self, name: str) -> Path:
        upper, work, mnt = (self.state / sub / name for sub in ("upper", "work", "mnt"))
        upper.mkdir()
        work.mkdir()
        mnt.mkdir()
        mount_overlay(self.base, upper, work, mnt)
        return mnt

    def _drop(self, name: str, keep_upper: bool) -> None:
        umount(self.path(name))
        self.path(name).rmdir()
        shutil.rmtree(self.state / "work" / name)
        if not keep_upper:
            shutil.rmtree(self.state / "upper" / name)

    def _commit(self, name: str) -> None:
        self._drop(name, keep_upper=True)
        upper = self.state / "upper" / name
        apply_upper(upper, self.base)
        shutil.rmtree(upper)

    def _discard(self, name: str) -> None:
        self._drop(name, keep_upper=False)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.state)


class OverlayBackend(Backend):
    name = "overlay"

    def workspace(self, base: Path) -> BenchWorkspace:
        return OverlayWorkspace(base)
