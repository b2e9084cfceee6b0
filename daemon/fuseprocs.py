"""The FUSE backend in processes of its own: one FUSE server process per active branch.

Why one per branch (measured on the 2-core test VM): pyfuse3 allows one
session per process and a session is one mount, so only a mount per branch
lets parallel branches use more than one core (one per workspace would leave
the 16-parallel-branches case, 16 branches of one workspace, on one core, as
in the daemon); a fixed pool would have to share a mount between processes,
which FUSE does not do. The price: a fresh interpreter with pyfuse3, trio and
branchfs imported is 33 MiB of peak RSS and 0.33 s (``/usr/bin/time``, load
about 1), which neither a create (1.5 ms) nor 16 short parallel branches can
pay (started per branch, 16 parallel branches took 5.35 s against 0.35 s for
overlayfs). So one fork server is started with the daemon, and each process
is forked from it (pages shared until written), one spare ahead; a create
then waits 12-18 ms for the mount (load 2-3). Short branches still pay that
start (16 parallel branches, quick bench, load 12: 1.49 s against 0.59 s for
overlayfs, and 1.0 s against 0.81 s with every branch served by the daemon),
long ones win a core each and never stall the control socket.

The process mounts the branch on its own directory inside the daemon's FUSE
mount, ``<mountpoint>/<ws>/<branch>``, as the overlay backend does, so the path
does not change; the daemon's own mount still answers the directories above it
and an ended branch (ESTALE), and serves the branch itself while no process
does (one still mounting, one that died, a host where it cannot mount). The
on-disk delta is the only data both share (``branchfs.replica``).

The daemon talks to each process over a socket pair (``branchfs.wire``):
every Store event of the workspace is sent to its processes; no request ever
waits for a process beyond a bound (a create for its mount, MOUNT_WAIT; a
commit's quiesce, QUIESCE_TIMEOUT, then ``busy``; ``settle`` for the events
applied, APPLY_TIMEOUT, once per stuck process). A commit (or a pending one's
finish, a rebase, a resolve) first quiesces every process of the workspace,
so no write of theirs lands while the Store moves the deltas; the branches it
moves are detached and their processes stopped. A process that dies is
logged, its mount detached (the daemon's mount serves the branch at once) and
a new one forked, up to RESTARTS times per branch. PR_SET_PDEATHSIG chains
the fork server to the daemon and each process to the fork server: a daemon
killed with SIGKILL leaves none behind, and the next daemon detaches the dead
mounts with its own (``prepare_mountpoint``).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import branchfs
from branchfs import origins, overlay
from branchfs.replica import event_message
from branchfs.wire import Conn, WireError
from daemon.handlers import RequestError
from daemon.overlays import FUSE

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 10.0  # a spare still importing takes 0.3 s, more on a loaded host
MOUNT_WAIT = 2.0  # longest a create (or a restart) waits for its process's mount
QUIESCE_TIMEOUT = 10.0  # a request being answered (a copy-up of a large file) may take long
APPLY_TIMEOUT = 2.0  # the child waits up to 1 s for the kernel per event (fs.DRAIN_TIMEOUT)
MAX_PATHS = 2000  # more paths in one event: the child forgets the whole branch
MAX_PENDING = 8 << 20  # bytes a child has not read: it is stuck, and killed
RESTARTS = 3


def per_branch() -> bool:
    """Whether FUSE branches get server processes: where the daemon may mount (root)
    and ``BRANCHD_FUSE_SERVERS`` is not ``daemon`` (the benchmark compares both)."""
    return os.geteuid() == 0 and os.environ.get("BRANCHD_FUSE_SERVERS", "process") != "daemon"


@dataclass(eq=False)
class Child:
    """One FUSE server process. ``root`` is an O_PATH fd on its mount's root, kept
    from the ``mounted`` answer on; the mount is detached through it."""

    conn: Conn
    pid: int | None = None  # from its hello
    branch: branchfs.Branch | None = None
    root: int | None = None
    mounted: trio.Event = field(default_factory=trio.Event)
    failed: str | None = None
    wake: trio.Event = field(default_factory=trio.Event)
    acks: dict[int, trio.Event] = field(default_factory=dict)  # of quiesce frames
    applied: dict[int, trio.Event] = field(default_factory=dict)  # of events (settle)
    ended: bool = False  # its branch ended: detached, serving its last users

    @property
    def name(self) -> str:
        b = self.branch
        return f"{b.workspace}/{b.name} (pid {self.pid})" if b else f"pid {self.pid}"

    def kill(self) -> int | None:
        """SIGKILL; a pidfd of the process, to wait on (the caller's to close). While
        its socket is open its pid is its own: it holds the only other end, which
        closes as it exits (the fork server reaps it). One that has not said hello
        yet ends when the socket closes."""
        fd = None
        if self.pid is not None and not (self.conn.closed or self.conn.eof):
            try:
                fd = os.pidfd_open(self.pid)
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _close(self.conn)
        return fd

    def stop(self) -> None:
        """SIGKILL, not waited for."""
        if (fd := self.kill()) is not None:
            os.close(fd)


class FuseProcs:
    """The FUSE backend's server processes (a ``branchfs.backend.Backend``, between
    the overlays and the daemon's own mount; see the module docstring).
    Invariant: ``_children[bid]`` is the process serving active branch *bid*
    (mounted, or still mounting); a branch without one is served by the daemon's
    own mount."""

    name = FUSE

    def __init__(self, store: branchfs.Store, mountpoint: Path, debug: bool = False) -> None:
        self.store = store
        self.mountpoint = mountpoint
        self.debug = debug
        self._children: dict[str, Child] = {}
        self._others: set[Child] = set()  # spares and ended branches' processes
        self._spare: Child | None = None
        self._restarts: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._locks: dict[str, trio.Lock] = {}
        self._held: dict[str, list[Child]] = {}  # workspace -> processes quiesced
        self._holder: dict[str, trio.lowlevel.Task] = {}  # workspace -> who quiesced it
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing = False
        self._forker: subprocess.Popen[bytes] | None = None
        self._forker_conn: Conn | None = None

    def path_of(self, branch: branchfs.Branch) -> str:
        return str(self.mountpoint / branch.workspace / branch.name)

    def _subtree(self, branch: branchfs.Branch) -> list[branchfs.Branch]:
        live = [b for b in self.store.branches(branch.workspace) if b.status == "active"]
        out = [branch]
        for b in out:
            out.extend(c for c in live if c.parent == b.name)
        return out

    # -- processes -----------------------------------------------------------------

    async def _fork_server(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """Start the fork server and keep it: one that dies (with every server process
        it forked: PDEATHSIG) is logged and started again."""
        while not self._closing:
            self._forker, self._forker_conn = _start_fork_server()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            fd = os.pidfd_open(self._forker.pid)
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
                _close(self._forker_conn)
            code = self._forker.wait()
            if not self._closing:
                log.error("the FUSE fork server (pid %d) ended (status %d); starting another",
                          self._forker.pid, code)
                await trio.sleep(1)

    def _spawn(self) -> Child:
        """Have the fork server fork a process; it waits for its branch (a spare)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child = Child(Conn(ours))
        try:
            assert self._forker_conn is not None
            self._forker_conn.send({"op": "fork"}, [theirs.fileno()])
            if not self._forker_conn.flush():
                log.warning("the FUSE fork server is slow to read")
        except WireError as exc:
            log.error("cannot reach the FUSE fork server: %s", exc)
        finally:
            theirs.close()
        self._others.add(child)
        assert self._nursery is not None
        self._nursery.start_soon(self._reader, child)
        self._nursery.start_soon(self._writer, child)
        return child

    def _take_spare(self) -> Child:
        """The spare (or a new process where there is none); the next spare is started
        after the request that takes this one was answered."""
        child = self._spare if self._spare is not None else self._spawn()
        self._spare = None
        assert self._nursery is not None
        self._nursery.start_soon(self._new_spare)
        return child

    async def _new_spare(self) -> None:
        if self._spare is None and not self._closing:
            self._spare = self._spawn()

    def _send(self, child: Child, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if child.conn.closed or child.conn.eof:
            return
        try:
            child.conn.send(msg, fds)
        except WireError:
            return  # it died: _gone tells
        if child.conn.pending > MAX_PENDING:
            log.error("the FUSE server of %s reads nothing from the daemon: killed",
                      child.name)
            child.stop()
        elif child.conn.pending:
            self._wake(child)

    def _wake(self, child: Child) -> None:
        if self._token is not None:
            self._token.run_sync_soon(child.wake.set)  # from any thread

    async def _writer(self, child: Child) -> None:
        try:
            while not (child.conn.closed or child.conn.eof):
                await child.wake.wait()
                child.wake = trio.Event()
                while not child.conn.flush():
                    await trio.lowlevel.wait_writable(child.conn.fileno())
        except (WireError, OSError, trio.ClosedResourceError):
            return

    async def _reader(self, child: Child) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(child.conn.fileno())
                child.conn.read()
                while (got := child.conn.next()) is not None:
                    self._received(child, *got)
        except (WireError, OSError, trio.ClosedResourceError):
            pass
        finally:
            if not child.mounted.is_set():
                child.failed = child.failed or "it ended before mounting"
                child.mounted.set()
        # the end of its socket: the process exited (or the daemon closed it)
        await self._gone(child)

    def _received(self, child: Child, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "hello" and child.pid is None:
            child.pid = int(msg["pid"])
        elif op == "mounted" and fds:
            child.root = fds.pop(0)
            child.mounted.set()
        elif op == "failed":
            child.failed = str(msg.get("error"))
            child.mounted.set()
        elif op in ("done", "quiesced"):
            acks = child.applied if op == "done" else child.acks
            ack = acks.pop(int(msg.get("seq") or 0), None)
            if ack is not None:
                ack.set()
        elif op == "changed":
            self._relay(child, msg)
        for fd in fds:
            os.close(fd)

    def _relay(self, child: Child, msg: dict[str, Any]) -> None:
        """A write in *child*'s branch changed what its descendants see through it."""
        if child.branch is not None:
            self.relay(child.branch.id, tuple(msg["parts"]), bool(msg["name_changed"]))

    def relay(self, bid: str, parts: tuple[str, ...], name_changed: bool) -> None:
        """A write in branch *bid* (served by a process, or by the daemon's mount:
        ``Operations.relay``) changed *parts*: to its descendants' processes."""
        b = self.store.branch_by_id(bid)
        if b is None:
            return
        msg = {"op": "changed", "parts": list(parts), "name_changed": name_changed}
        for d in self._subtree(b)[1:]:
            kid = self._children.get(d.id)
            if kid is not None:
                self._send(kid, msg)

    async def _gone(self, child: Child) -> None:
        """A process's socket ended: it exited, or was killed. Its branch, if still
        active, gets a new one."""
        self._others.discard(child)
        if self._spare is child:
            self._spare = None
        b = child.branch
        mine = b is not None and self._children.get(b.id) is child
        if mine and b is not None:
            del self._children[b.id]
        self._detach_child(child)
        _close(child.conn)
        child.wake.set()  # its writer task ends
        for ack in [*child.acks.values(), *child.applied.values()]:
            ack.set()
        if self._closing:
            return
        if not mine or b is None or self.store.status(b.id) != "active":
            return
        n = self._restarts[b.id] = self._restarts.get(b.id, 0) + 1
        if n > RESTARTS:
            log.error("the FUSE server of %s died, %d times: the daemon serves the "
                      "branch from now on", child.name, n)
            return
        log.error("the FUSE server of %s died: the daemon serves the branch until "
                  "a new one is mounted", child.name)
        # It may have died with the fork server, which _fork_server may not have seen
        # die yet (a poll: either may notice first), and starts again after a second.
        with trio.move_on_after(MOUNT_TIMEOUT):
            while not self._forking():  # noqa: ASYNC110
                await trio.sleep(0.05)
        await self.serve(self.store.branch_by_id(b.id) or b)

    def _forking(self) -> bool:
        """Whether a fork server is up to fork a process."""
        c = self._forker_conn
        return (self._forker is not None and self._forker.poll() is None
                and c is not None and not (c.closed or c.eof))

    def _detach_child(self, child: Child) -> None:
        root, child.root = child.root, None
        if root is None:
            return
        try:
            overlay.detach(overlay.fd_path(root), follow=True)
        except OSError as exc:
            log.error("cannot detach the FUSE mount of %s: %s", child.name, exc)
        finally:
            os.close(root)

    # -- the backend -----------------------------------------------------------------

    async def serve(self, branch: branchfs.Branch) -> None:
        """Hand an active branch to a server process, and wait (up to MOUNT_WAIT) for
        its mount: what a caller does right after a create (a copy-up) must not land
        in the daemon's own mount, which serves the branch until the process's mount
        is on it, over the same delta (``_mounting``). Measured here, the mount lands
        12-18 ms after the create (a fork, a trio loop, the mount, its INIT)."""
        if (branch.id in self._children or self._nursery is None or self._closing
                or self.store.pending(branch.workspace)):
            return
        view = self.store.view(branch.workspace, branch.name)
        assert view.work is not None
        child = self._take_spare()
        self._others.discard(child)
        child.branch = branch
        self._children[branch.id] = child
        self._send(child, {
            "op": "serve", "state_dir": self.store.state_dir, "ws": branch.workspace,
            "bid": branch.id, "name": branch.name, "path": self.path_of(branch),
            "owner": self.store.workspace(branch.workspace).owner,
            # (an Origins of a path that does not exist keeps no records)
            "origins": os.path.join(self.store.state_dir, "branches", branch.id,
                                    origins.FILE),
            "shared": self.store.shared(branch.id), "debug": self.debug,
            "log_level": logging.getLogger().level,
            "branches": [b.to_dict() for b in self.store.branches(branch.workspace)],
        }, [*view.layers, view.work])
        self._nursery.start_soon(self._mounting, child, branch)
        with trio.move_on_after(MOUNT_WAIT):
            await child.mounted.wait()

    async def _mounting(self, child: Child, branch: branchfs.Branch) -> None:
        """Wait for *child*'s mount; one that cannot mount leaves the branch to the
        daemon, with a warning."""
        with trio.move_on_after(MOUNT_TIMEOUT):
            await child.mounted.wait()
        if child.root is None:
            if self._children.get(branch.id) is not child or self._closing:
                log.debug("%s ended before its mount: %s", child.name, child.failed)
                child.stop()
                return
            log.warning("branch %s/%s stays on the daemon's FUSE mount: its server "
                        "process did not mount it (%s)", branch.workspace, branch.name,
                        child.failed or f"no answer in {MOUNT_TIMEOUT:.0f} s")
            if self._children.get(branch.id) is child:
                del self._children[branch.id]
            child.stop()
            return
        if self._children.get(branch.id) is not child:
            self._end(child)  # its branch ended while it mounted
            return
        log.debug("branch %s served by %s", branch.name, child.name)

    def serves(self, bid: str) -> bool:
        child = self._children.get(bid)
        return child is not None and child.root is not None

    def server_pid(self, bid: str) -> int | None:
        """The pid of the process serving *bid*, None where the daemon does."""
        return self._children[bid].pid if self.serves(bid) else None

    def detach(self, branches: Sequence[branchfs.Branch]) -> None:
        """Detach the mounts of *branches* and stop their processes: what is open
        in them gets ENOTCONN (a commit or discard moves their upper dirs)."""
        for b in branches:
            child = self._children.get(b.id)
            if child is not None:
                self._end(child)

    def _end(self, child: Child) -> None:
        b = child.branch
        if b is not None and self._children.get(b.id) is child:
            del self._children[b.id]
            self._restarts.pop(b.id, None)
        child.ended = True
        self._others.add(child)
        self._detach_child(child)
        self._send(child, {"op": "stop"})

    async def quiesce(self, workspace: str, moving: Sequence[branchfs.Branch]) -> None:
        """*moving* are detached; every other process of *workspace* holds still (no
        FUSE request of its is being answered, none will be) until ``resume``.
        RequestError("busy") where one did not answer in QUIESCE_TIMEOUT."""
        self.detach(moving)
        lock = self._locks.setdefault(workspace, trio.Lock())
        await lock.acquire()
        self._holder[workspace] = trio.lowlevel.current_task()
        kids = [c for c in self._children.values()
                if c.branch is not None and c.branch.workspace == workspace
                and c.root is not None]
        self._held[workspace] = kids
        asked = []
        for child in kids:
            seq = next(self._seq)
            ack = child.acks[seq] = trio.Event()
            self._send(child, {"op": "quiesce", "seq": seq})
            asked.append((child, ack))
        with trio.move_on_after(QUIESCE_TIMEOUT):
            for _, ack in asked:
                await ack.wait()
        for child, ack in asked:
            if not ack.is_set():
                await self.resume(workspace, moving)  # (its caller may not: it raised)
                raise RequestError("busy", f"the FUSE server of {child.name} did not hold "
                                   f"still in {QUIESCE_TIMEOUT:.0f} s; try again")
            assert child.branch is not None
            self.store.reload_origins(child.branch.id)  # it appended to the log

    async def resume(self, workspace: str, moving: Sequence[branchfs.Branch]) -> None:
        """The processes go on (one that never answered the quiesce holds still only
        until it reads this); a branch of *moving* still active gets a new one."""
        self._release(workspace)
        for b in moving:
            if self.store.status(b.id) == "active" and not self.store.pending(workspace):
                await self.serve(b)

    def _release(self, workspace: str) -> None:
        """Resume what this task quiesced in *workspace* (nothing if it holds nothing:
        a refused quiesce released it already)."""
        lock = self._locks.get(workspace)
        if lock is None or not lock.locked() or self._holder.get(workspace) is not (
                trio.lowlevel.current_task()):
            return
        for child in self._held.pop(workspace, []):
            self._send(child, {"op": "resume"})
        del self._holder[workspace]
        lock.release()

    def invalidate(self, event: branchfs.Event) -> None:
        """To every process of the workspace (its records; the invalidations where it
        serves the target), waited for by ``settle``; an ended branch's detached."""
        msg = event_message(event, MAX_PATHS)
        mine = {event.target, event.branch.id if event.branch is not None else None}
        for child in list(self._children.values()):
            if child.branch is None or child.branch.workspace != event.workspace:
                continue
            seq = None
            if child.branch.id in mine:  # it changes what this process shows
                seq = next(self._seq)
                child.applied[seq] = trio.Event()
            self._send(child, {**msg, "seq": seq})
        if event.kind == "branch-ended" and event.branch is not None:
            self.detach([event.branch])

    async def settle(self) -> None:
        """Until the processes applied the events sent them, or APPLY_TIMEOUT passed."""
        waiting = [c for c in self._children.values() if c.applied]
        with trio.move_on_after(APPLY_TIMEOUT):
            for child in waiting:
                for ack in list(child.applied.values()):
                    await ack.wait()
        for child in waiting:
            if child.applied:  # not waited for again: a stuck process stalls no request
                child.applied.clear()
                log.warning("the FUSE server of %s has not applied a change in %.0f s",
                            child.name, APPLY_TIMEOUT)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Hold the processes' nursery, serve every active branch, then supervise."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._fork_server)
                self._spare = self._spawn()
                for b in self.store.branches():
                    if b.status == "active":
                        await self.serve(b)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.close()

    def close(self) -> None:
        """Detach every process's mount and kill the processes (nothing in them
        needs flushing: their writes are the upper dirs' own)."""
        self._closing = True
        kids = [*self._children.values(), *self._others]
        self._children.clear()
        self._others.clear()
        self._spare = None
        dying = []
        for child in kids:
            self._detach_child(child)
            if (fd := child.kill()) is not None:
                dying.append((child, fd))
        deadline = time.monotonic() + 5
        for child, fd in dying:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                log.error("FUSE server %s did not end after SIGKILL", child.name)
            os.close(fd)
        if self._forker is not None and self._forker.poll() is None:
            self._forker.kill()  # (it forks nothing more: the daemon is going)
            self._forker.wait(5)


def _start_fork_server() -> tuple[subprocess.Popen[bytes], Conn]:
    """On the event loop thread, which lives as long as the daemon: PDEATHSIG
    follows the thread that forked, not the process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "branchfs.child", str(os.getpid()), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        theirs.close()
    return proc, Conn(ours)


def _close(conn: Conn) -> None:
    if conn.closed:
        return
    try:
        trio.lowlevel.notify_closing(conn.sock)  # its reader and writer tasks wait on it
    except RuntimeError:
        pass  # outside trio: no task is left to wait
    conn.close()
