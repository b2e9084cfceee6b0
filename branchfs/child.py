"""FUSE server processes: one branch each, mounted on the branch's own directory.

``python -m branchfs.child DAEMON_PID FD`` is the fork server the daemon
(``daemon/fuseprocs.py``) starts, with its end of a socket pair as fd FD: the
imports take 0.3 s here, a branch create 1.5 ms, so the server processes are
forked from this one (a few ms; their pages are shared with it until
written), one for each ``fork`` frame, with the socket pair end it carries.
Each dies with its parent (PR_SET_PDEATHSIG, checked against a parent that
was gone before it was set: the daemon for the fork server, the fork server
for a server process), says ``hello`` with its pid, then waits (a spare) for a
``serve`` frame (``branchfs.wire``) with
the branch's layers as descriptors, mounts an ``Operations`` of that one branch
over a ``Replica`` at the given path (inside the daemon's own mount, so the path
users were given does not change), answers ``mounted`` with a descriptor of its
mount's root, and serves until the daemon says ``stop``, closes the socket, or
the kernel ends the session (the daemon detached the mount and its last user
left).

Frames from the daemon, answered in order: ``event`` (a Store event, applied
and its invalidations waited for, then ``done``), ``changed`` (an ancestor
branch served elsewhere was written: ``Operations.changed_in``), ``quiesce``
(``quiesced`` at once: no request is half done between two of them; then the
requests wait at the workspace's gate, ``Operations.quiesce``, and other frames
are kept, until ``resume``: the daemon changes the delta meanwhile), ``stop``.
To the daemon, unasked: ``changed`` after a write in this branch when it has
live descendants. The mount is never unmounted by path from here (the
path may reach another branch's mount by then): the daemon detaches it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import socket
import sys
from typing import Any

import pyfuse3
import trio

from .errors import BranchFSError
from .fs import Operations
from .mount import fuse_options, set_read_ahead
from .replica import Replica
from .wire import Conn, WireError

log = logging.getLogger("branchfs.child")

PR_SET_PDEATHSIG = 1


def _die_with(daemon: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != daemon:  # it died before the prctl: nobody would kill us
        os._exit(1)


class Server:
    """The control side of one served branch; runs on the trio thread, between
    FUSE requests (a handler never awaits, so none is ever half done here)."""

    def __init__(self, conn: Conn, ops: Operations, replica: Replica) -> None:
        self.conn = conn
        self.ops = ops
        self.replica = replica
        self.held: list[dict[str, Any]] | None = None  # frames kept while quiesced

    def relay(self, bid: str, parts: tuple[str, ...], name_changed: bool) -> None:
        self.conn.send({"op": "changed", "bid": bid, "parts": list(parts),
                        "name_changed": name_changed})

    async def handle(self, msg: dict[str, Any]) -> bool:
        """Act on one frame; False once the daemon said stop."""
        op = msg.get("op")
        if self.held is not None and op not in ("resume", "stop"):
            self.held.append(msg)  # after the resume: the daemon is changing the delta
            return True
        if op == "event":
            ev = self.replica.apply(msg)
            self.ops.on_event(ev)
            if msg.get("paths") is None and msg.get("target") == self.replica.bid:
                self.ops.forget_all(self.replica.bid)
            await self.ops.settle()
            self.conn.send({"op": "done", "seq": msg.get("seq")})
        elif op == "changed":
            self.ops.changed_in(self.replica.bid, msg["parts"], msg["name_changed"])
        elif op == "quiesce":
            # (a handler never awaits past its gate: none is half done now)
            self.ops.quiesce(self.replica.workspace_name)
            self.held = []
            self.conn.send({"op": "quiesced", "seq": msg.get("seq")})
        elif op == "resume":
            later, self.held = self.held or [], None
            self.ops.resume(self.replica.workspace_name)
            for m in later:
                if not await self.handle(m):
                    return False
        elif op == "stop":
            return False
        else:
            log.error("unknown frame from the daemon: %r", op)
        return True

    async def control(self) -> None:
        fd = self.conn.fileno()
        while True:
            if not self.conn.flush():
                with trio.move_on_after(0.05):
                    await trio.lowlevel.wait_writable(fd)
                continue
            await trio.lowlevel.wait_readable(fd)
            self.conn.read()
            while (got := self.conn.next()) is not None:
                msg, fds = got
                for f in fds:
                    os.close(f)
                if not await self.handle(msg):
                    return


async def serve(conn: Conn, msg: dict[str, Any], fds: list[int]) -> None:
    try:
        replica = Replica(msg, fds)
    except BranchFSError as exc:  # a damaged origins log: the daemon's mount says so
        raise MountFailed(f"cannot serve the branch: {exc}") from None
    ops = Operations(replica, branch=(replica.workspace_name, replica.bid))
    server = Server(conn, ops, replica)
    ops.relay = server.relay
    path = msg["path"]
    try:
        pyfuse3.init(ops, path, fuse_options(msg.get("debug", False)))
    except RuntimeError as exc:  # libfuse said why on stderr; the daemon decides
        replica.close()
        raise MountFailed(f"cannot mount {path}: {exc}") from None
    try:
        ops.start()
        async with trio.open_nursery() as nursery:
            async def session() -> None:
                await pyfuse3.main(min_tasks=1, max_tasks=1)
                nursery.cancel_scope.cancel()  # the kernel ended it: detached, unused

            nursery.start_soon(session)
            # our own loop answers it, once the kernel took the INIT reply
            root = await trio.to_thread.run_sync(
                os.open, path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                set_read_ahead(path)
                conn.send({"op": "mounted", "pid": os.getpid()}, [root])
            finally:
                os.close(root)
            try:
                await server.control()
            except WireError:
                pass  # the daemon is gone (and PDEATHSIG on its way) or closed us
            nursery.cancel_scope.cancel()
    finally:
        ops.stop()
        pyfuse3.close(unmount=False)
        replica.close()


def main(argv: list[str] | None = None) -> int:
    """The fork server: fork a server process for each ``fork`` frame, with the
    socket it carries, until the daemon closes the connection."""
    args = sys.argv[1:] if argv is None else argv
    _die_with(int(args[0]))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them; pidfds tell
    conn = Conn(socket.socket(fileno=int(args[1])))
    me = os.getpid()
    while True:
        try:
            msg, fds = conn.wait_blocking()
        except WireError:
            return 0  # the daemon closed it (or died: PDEATHSIG is on its way)
        if msg.get("op") != "fork" or len(fds) != 1:
            log.error("unexpected frame for the fork server: %r", msg.get("op"))
            for fd in fds:
                os.close(fd)
            continue
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            conn.close()  # (and the ends for later forks it received already)
            _die_with(me)
            os._exit(_one(Conn(socket.socket(fileno=fds[0]))))
        os.close(fds[0])


def _one(conn: Conn) -> int:
    """A forked server process: say who it is, wait for its branch, serve it."""
    try:
        conn.send({"op": "hello", "pid": os.getpid()})
        msg, fds = conn.wait_blocking()
    except WireError:
        return 0  # a spare the daemon never used
    if msg.get("op") != "serve":
        return 0
    logging.getLogger().setLevel(msg.get("log_level", logging.INFO))
    try:
        trio.run(functools.partial(serve, conn, msg, fds))
    except MountFailed as exc:
        # (a branch that ended before its mount: its directory is gone already)
        _tell(conn, str(exc))
    except Exception as exc:
        log.exception("FUSE server of %s/%s failed", msg.get("ws"), msg.get("name"))
        _tell(conn, str(exc))
        return 1
    return 0


class MountFailed(Exception):
    pass


def _tell(conn: Conn, error: str) -> None:
    try:
        conn.send({"op": "failed", "error": error})
        conn.flush()
    except WireError:
        pass


if __name__ == "__main__":
    sys.exit(main())
