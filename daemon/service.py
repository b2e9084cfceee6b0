"""The daemon's life: open the state, mount, listen, announce readiness, shut down cleanly.

Teardown order is explicit (one nursery inside one exit stack): stop accepting
requests, detach the branches' overlays, kill every candidate process, unmount
FUSE, close the state.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import hashlib
import logging
import os
import shutil
import signal
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import trio

import branchfs
import cgroups
from daemon import fuseprocs
from daemon.config import Config
from daemon.dataplane import Plane
from daemon.fuseprocs import FuseProcs
from daemon.handlers import Handlers, RequestError
from daemon.meta import MetaStore
from daemon.notify import Notifier
from daemon.overlays import FUSE, Overlays, choose
from daemon.runs import RunTable
from daemon.server import bind_socket, serve_control

log = logging.getLogger(__name__)


def lock_state_dir(state_dir: Path) -> int:
    """One daemon per state directory: hold an exclusive lock for the daemon's life."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RequestError("busy", f"another branchd is using {state_dir}") from None
    return fd


def prepare_mountpoint(mountpoint: Path, stack: ExitStack) -> None:
    """Detach what a daemon killed with SIGKILL left at the mountpoint (a dead FUSE mount:
    "transport endpoint is not connected"), then, as root, make the mountpoint a shared
    mount so that candidates' mount namespaces see the FUSE mount come and go."""
    if cgroups.mounted(str(mountpoint)):
        log.warning("detaching a stale mount at %s", mountpoint)
        cgroups.detach(str(mountpoint))
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        cgroups.share_mountpoint(str(mountpoint))
        stack.callback(cgroups.release_mountpoint, str(mountpoint))


async def run(cfg: Config, notifier: Notifier | None = None) -> None:
    """Serve until SIGTERM, SIGINT or a ``shutdown`` request."""
    notifier = notifier or Notifier()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    orphaned: list[bool] = []  # the owner ended: its directories are ours to remove
    with ExitStack() as stack:
        stack.callback(_remove_owned, cfg.owned_dirs, orphaned)  # last, all unmounted
        stack.callback(os.close, lock_state_dir(cfg.state_dir))
        listener = bind_socket(cfg.socket, cfg.socket_mode, cfg.socket_group)
        stack.callback(cfg.socket.unlink, missing_ok=True)
        stack.callback(listener.close)
        prepare_mountpoint(cfg.mountpoint, stack)
        store = branchfs.Store(cfg.state_dir, mountpoint=str(cfg.mountpoint))
        stack.callback(store.close)
        for line in store.recovered:
            log.warning("recovery: %s", line)
        # One name per state directory: a daemon restarted after a crash finds its
        # predecessor's cgroup tree, kills what is left in it and removes it.
        tag = hashlib.sha256(str(cfg.state_dir).encode()).hexdigest()[:12]
        manager = cgroups.Manager(name=f"branchd-{tag}", fd_limit=cfg.run_fd_limit)
        stack.callback(manager.close)
        for warning in manager.warnings:
            log.warning("%s", warning)
        meta = MetaStore(cfg.state_dir / "branch-meta.json")
        backend, why = choose(cfg.backend, cfg.state_dir)
        log.info("backend %s: %s", backend, why)
        overlays = Overlays(store, cfg.mountpoint, backend, why)
        stack.callback(overlays.close)  # whatever ended the nursery: never leave one behind
        fuse = branchfs.FuseBackend(store)
        procs = None
        if backend == FUSE and fuseprocs.per_branch():
            procs = FuseProcs(store, cfg.mountpoint, cfg.debug_fuse)
            fuse.ops.relay = procs.relay  # a write the daemon's mount takes, for the kids
            stack.callback(procs.close)  # never a server process or its mount behind
        data = Plane(store, cfg.mountpoint, fuse, overlays, procs)  # the Store's one subscriber
        runs = RunTable(cfg.state_dir, cfg.mountpoint, manager, store, data.settle)

        async with trio.open_nursery() as nursery:

            def stop() -> None:
                data.close()  # the overlays before the FUSE mount they sit on goes
                nursery.cancel_scope.cancel()

            def orphan() -> None:  # the owner ended: stop, and remove what it cannot
                orphaned.append(True)
                stop()

            def report() -> None:
                notifier.status(f"{len(store.workspaces())} workspaces, "
                                f"{len(store.branches())} branches, {runs.active()} runs")

            handlers = Handlers(
                store, runs, meta, data,
                mountpoint=cfg.mountpoint, socket_path=cfg.socket, allow_uids=cfg.allow_uids,
                on_change=report, shutdown=stop,
            )
            mode, why = manager.namespace
            if mode is None:
                log.warning("runs see their branch at its own path, not the workspace's: %s",
                            why)
            else:
                log.info("runs see their branch at the workspace's path: %s", why)
            await nursery.start(_serve_fs, fuse, cfg)
            await overlays.serve_all()
            await nursery.start(overlays.watch)
            if procs is not None:
                await nursery.start(procs.watch)
            await nursery.start(serve_control, listener, handlers, cfg.allow_uids,
                                cfg.idle_timeout)
            await nursery.start(_signals, stop)
            if cfg.owner_pid is not None:
                await nursery.start(_outlive_not, cfg.owner_pid, orphan)
            log.info("branchd ready: mount %s, socket %s, cgroups %s, backend %s",
                     cfg.mountpoint, cfg.socket, manager.layout.kind, backend)
            notifier.ready(f"{len(store.workspaces())} workspaces, "
                           f"{len(store.branches())} branches")
        notifier.stopping()
        log.info("branchd stopping")


async def _serve_fs(fuse: branchfs.FuseBackend, cfg: Config, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    await branchfs.serve(fuse, str(cfg.mountpoint), debug=cfg.debug_fuse, task_status=task_status)


async def _signals(stop: Callable[[], None], *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()  # before READY=1: a SIGTERM right after it must be ours
        async for signum in signals:
            if signum == signal.SIGHUP:
                _toggle_debug()
                continue
            log.info("received %s", signal.Signals(signum).name)
            stop()
            return


async def _outlive_not(owner: int, stop: Callable[[], None], *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Stop, as on SIGTERM, when the process that owns this daemon ends (an embedded
    daemon: the agent, notebook or test that started it, even if it was SIGKILLed).

    The owner is our parent: the pidfd is opened only while getppid() still names it,
    so a pid reused after the owner died cannot be mistaken for it."""
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        fd = None
    if fd is None or os.getppid() != owner:
        if fd is not None:
            os.close(fd)
        log.info("owner process %d is gone: stopping", owner)
        task_status.started()
        stop()
        return
    try:
        task_status.started()
        await trio.lowlevel.wait_readable(fd)
        log.info("owner process %d ended: stopping", owner)
        stop()
    finally:
        os.close(fd)


def _remove_owned(dirs: tuple[Path, ...], orphaned: list[bool]) -> None:
    """Remove an embedded daemon's own directories once its owner, who would have, is
    gone; never one with a mount left below it (the walk would go into it)."""
    if not orphaned:
        return
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for d in dirs:
        if any(p == str(d) or p.startswith(f"{d}/") for p in points):
            log.warning("%s still has a mount below it: left in place", d)
            continue
        for parent, subdirs, _ in os.walk(d):  # a run's overlay work dir: the kernel's, 0
            for sub in subdirs:
                path = os.path.join(parent, sub)
                if not os.path.islink(path):
                    with contextlib.suppress(OSError):
                        os.chmod(path, 0o700)
        shutil.rmtree(d, ignore_errors=True)


def _toggle_debug() -> None:
    """SIGHUP switches the log level between INFO and DEBUG at runtime."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if root.level != logging.DEBUG else logging.INFO)
    log.warning("log level now %s", logging.getLevelName(root.level))
