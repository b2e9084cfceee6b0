"""The FUSE mount as a data-plane backend: ``FuseBackend``, and ``serve()``, which
mounts the Store's branches with pyfuse3 and runs the FUSE session."""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Sequence

import pyfuse3
import trio

from .fs import Operations
from .model import ACTIVE, Branch
from .store import Event, Store

log = logging.getLogger(__name__)

# Read-ahead of the mount, in KiB: the kernel's default (128) makes a cold
# sequential read a chain of small synchronous requests; 1 MiB lets it ask
# for up to max_pages at a time, ahead of the reader (measured: 128 MiB cold
# read 215-420 ms -> 80-160 ms here; 2 MiB and more gave nothing more).
READ_AHEAD_KB = 1024


class FuseBackend:
    """The daemon's FUSE mount (``branchfs.backend.Backend``): it serves every active
    branch from the Store's records, so ``serve`` and ``detach`` have nothing to
    do (an ended branch answers ESTALE); quiescing holds a workspace's requests
    at a gate, and Store events invalidate the kernel's caches."""

    name = "fuse"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ops = Operations(store)

    def serves(self, bid: str) -> bool:
        return self.store.status(bid) == ACTIVE

    async def serve(self, branch: Branch) -> None:
        pass

    def detach(self, branches: Sequence[Branch]) -> None:
        pass

    async def quiesce(self, workspace: str, moving: Sequence[Branch]) -> None:
        self.ops.quiesce(workspace)

    async def resume(self, workspace: str, moving: Sequence[Branch]) -> None:
        self.ops.resume(workspace)

    def invalidate(self, event: Event) -> None:
        self.ops.on_event(event)

    async def settle(self) -> None:
        await self.ops.settle()

    def close(self) -> None:
        pass  # the mount goes when serve() ends


async def serve(fuse: FuseBackend, mountpoint: str, *, debug: bool = False,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Mount *fuse*'s Store at *mountpoint* and serve it until cancelled.

    One FUSE session per process (pyfuse3's rule). ``task_status.started()``
    is called once the mount is live; the mount is always removed on the way
    out, whatever ended the session.
    """
    await _clear_dead_mount(os.fspath(mountpoint))
    ops = fuse.ops
    if not _may_allow_other():
        log.warning("mounting without allow_other: only uid %d can use the branches "
                    "(add user_allow_other to /etc/fuse.conf)", os.geteuid())
    pyfuse3.init(ops, os.fspath(mountpoint), fuse_options(debug))
    log.info("mounted branches at %s", mountpoint)
    try:
        ops.start()
        async with trio.open_nursery() as nursery:
            # One worker task: our handlers await nothing but a quiesced workspace's
            # gate, and more workers hand pyfuse3's read lock back and forth on every
            # request (agent workload: 3.0-3.4 s with one worker, 3.7-4.3 s with 99;
            # quick bench at e1665e4: 1.84 s with one, 3.61 s with up to 64). So a
            # request waiting at a gate holds the others back until its workspace
            # resumes: the price of the gate until FUSE is served by processes of
            # its own (issue 13).
            nursery.start_soon(functools.partial(pyfuse3.main, min_tasks=1, max_tasks=1))
            # Answered by the loop just started, once the kernel took our INIT
            # reply (which sets the read-ahead to its own default).
            await trio.to_thread.run_sync(os.statvfs, os.fspath(mountpoint))
            set_read_ahead(os.fspath(mountpoint))
            task_status.started()
    finally:
        ops.stop()
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def fuse_options(debug: bool) -> set[str]:
    """The mount options of the daemon's mount and of a branch's own (``branchfs.child``)."""
    options = set(pyfuse3.default_options)
    options |= {"fsname=branchfs", "subtype=branchfs", "default_permissions"}
    if _may_allow_other():
        options.add("allow_other")
    if debug:
        options.add("debug")
    return options


def _may_allow_other() -> bool:
    """allow_other needs root, or user_allow_other in /etc/fuse.conf."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def set_read_ahead(mountpoint: str) -> None:
    """Raise the read-ahead of the mount's backing device info (root only).
    Its device number comes from mountinfo: a stat of the mount would wait
    for this very process to answer."""
    real = _real(mountpoint)
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real and " - fuse" in line:
                dev = fields[2]  # the last one listed is the newest mount
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.debug("read-ahead of %s stays the kernel's: %s", real, exc)


def _real(mountpoint: str) -> str:
    """The mountpoint's path as mountinfo shows it (its last component not resolved:
    resolving it would ask the FUSE mount)."""
    return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(mountpoint))),
                        os.path.basename(os.path.abspath(mountpoint)))


def _fuse_mount_state(mountpoint: str) -> tuple[str, str]:
    """("none" | "dead" | "live", real path) of a FUSE mount at *mountpoint*."""
    real = _real(mountpoint)
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == real and " - fuse" in line for line in f)
    if not mounted:
        return "none", real
    try:
        os.statvfs(real)  # never answered from the kernel's cache
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        return "dead", real
    return "live", real


async def _clear_dead_mount(mountpoint: str) -> None:
    """A daemon killed without unmounting leaves a dead FUSE mount ("transport
    endpoint is not connected"): detach it, or the new mount would stack on it.
    A live one (another daemon still serving) is refused."""
    state, real = _fuse_mount_state(mountpoint)
    if state == "dead":
        log.warning("detaching the dead mount left at %s", real)
        await trio.run_process(["fusermount3", "-u", "-z", real], check=False)
    elif state == "live":
        raise OSError(errno.EBUSY, f"{real} is already served by a running FUSE filesystem")
