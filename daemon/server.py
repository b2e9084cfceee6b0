"""The control server: newline-delimited JSON over a unix socket.

One task per connection; requests on a connection are answered in order. The
peer's credentials come from SO_PEERCRED and SO_PEERGROUPS, read once at accept;
file descriptors (a client's stdio for ``exec``) arrive as SCM_RIGHTS ancillary
data with the request that uses them. This module is the protocol's single error
boundary: every exception a handler raises becomes one error response, and the
daemon stays up.

A connection goes with what hangs on its client's life: the runs it started
(killed when it closes) and its session's branches (``create`` with ``session``
until ``session-end``; discarded when it closes first).

No client can take the daemon's descriptors: connections per uid and the
descriptors a connection may hold are capped (the constants below), a
connection that has not said hello in time, or sits idle with nothing in
flight, is closed, and running out of descriptors pauses ``accept`` instead of
ending the daemon.
"""

from __future__ import annotations

import array
import ctypes
import errno
import logging
import math
import os
import socket
import struct
from collections import Counter, deque
from pathlib import Path
from typing import Any

import trio

import branchfs
from branchfs.model import ACTIVE
from daemon import protocol
from daemon.handlers import HANDLERS, SESSION, Handlers, Peer, RequestError, Session
from daemon.meta import MetaTooLarge

log = logging.getLogger(__name__)

MAX_FDS = 8  # descriptors accepted with one message
MAX_HELD_FDS = 2 * MAX_FDS  # descriptors received that no request has taken yet
MAX_CONNECTIONS_PER_UID = 256  # open at once; a pattern's threads use one each
HELLO_TIMEOUT = 10.0  # seconds from accept to a complete hello
DEFAULT_IDLE_TIMEOUT = 600.0  # seconds without a request, nothing in flight (--idle-timeout)
ACCEPT_BACKOFF = 0.1  # seconds accept waits when the daemon is out of descriptors
OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ERRNO_CODES = {
    errno.ENOSPC: "no-space",
    errno.EDQUOT: "no-space",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.ENOENT: "not-found",
    errno.EEXIST: "exists",
    errno.ESTALE: "stale",
    errno.EBUSY: "busy",
}


def to_error(exc: BaseException) -> protocol.Error:
    """Map any exception from a handler onto a stable error code and one line."""
    if isinstance(exc, branchfs.BranchFSError | RequestError | MetaTooLarge
                  | protocol.ProtocolError):
        return protocol.Error(exc.code, str(exc))
    if isinstance(exc, OSError) and exc.errno in ERRNO_CODES:
        return protocol.Error(ERRNO_CODES[exc.errno], os.strerror(exc.errno or 0) +
                              (f": {exc.filename}" if exc.filename else ""))
    log.error("internal error", exc_info=exc)
    return protocol.Error("internal", f"internal error ({type(exc).__name__}: {exc})")


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in every Python
NGROUPS_MAX = 65536
_libc = ctypes.CDLL(None, use_errno=True)


def peer_of(sock: trio.socket.SocketType) -> Peer:
    """Who connected, as the kernel saw them at connect(): uid, gid and pid
    (SO_PEERCRED), and the supplementary groups (SO_PEERGROUPS). Read once, here:
    the process may be gone, or have changed its groups, by the time a request
    comes, and its pid may be another process's by then."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid, peer_groups(sock))


def peer_groups(sock: trio.socket.SocketType | socket.socket) -> tuple[int, ...]:
    """SO_PEERGROUPS: the peer's supplementary groups at connect(), an array of gid_t.
    Through libc: Python's getsockopt takes at most 1024 bytes (256 groups). When the
    buffer is too small the kernel says ERANGE and how many bytes it needs."""
    n = 64
    while True:
        buf = (ctypes.c_uint32 * n)()
        size = ctypes.c_uint32(ctypes.sizeof(buf))  # socklen_t
        if _libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf,
                            ctypes.byref(size)) == 0:
            return tuple(buf[:size.value // 4])
        err = ctypes.get_errno()
        if err != errno.ERANGE or n >= NGROUPS_MAX:
            raise OSError(err, f"SO_PEERGROUPS: {os.strerror(err)}")
        n = min(NGROUPS_MAX, max(size.value // 4, 2 * n))


class Connection:
    """One client connection: reads lines (and descriptors), answers each in order.

    It is timed out only while it waits for the client: a request being answered
    (a ``wait`` for a run of an hour) or a run attached to it keeps it open."""

    def __init__(self, sock: trio.socket.SocketType, handlers: Handlers, peer: Peer,
                 idle_timeout: float) -> None:
        self.sock = sock
        self.handlers = handlers
        self.peer = peer
        self.idle_timeout = idle_timeout  # 0: never
        self.fds: deque[int] = deque()
        self.attached: list[str] = []  # runs to kill if this client goes away
        self.session = Session()  # branches to discard if this client goes away

    async def run(self) -> None:
        buf = b""
        greeted = False
        hello_by = trio.current_time() + HELLO_TIMEOUT
        SESSION.set(self.session)  # this task's: its handlers see this connection's
        stopping = False
        try:
            while True:
                with trio.move_on_at(self._deadline(greeted, hello_by)) as waited:
                    data = await self._recv()
                if waited.cancelled_caught:
                    log.debug("closing a %s connection of uid %d",
                              "idle" if greeted else "silent", self.peer.uid)
                    await self.goodbye("unavailable", "idle connection closed" if greeted
                                       else f"no hello within {HELLO_TIMEOUT:.0f} s")
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not greeted:
                        greeted = await self._hello(line)
                        if not greeted:
                            return
                        continue
                    await self._answer(line)
                if len(buf) > protocol.MAX_MESSAGE:
                    raise protocol.ProtocolError(f"message exceeds {protocol.MAX_MESSAGE} bytes")
        except protocol.ProtocolError as e:  # the connection cannot go on: say why, close
            await self.goodbye("protocol", str(e))
        except (ConnectionError, trio.ClosedResourceError, trio.BrokenResourceError,
                trio.TooSlowError):
            return
        except Exception:  # a bug here must end this connection only, never the daemon
            log.exception("connection of uid %d (pid %d) failed", self.peer.uid, self.peer.pid)
        except trio.Cancelled:  # the daemon stops: its clients' branches stay, as all do
            stopping = True
            raise
        finally:
            for fd in self.fds:
                os.close(fd)
            for run_id in self.attached:
                record = self.handlers.runs.get(run_id)
                if record is not None and record.result is None:
                    log.info("client of run %s went away: killing it", run_id)
                    self.handlers.runs.kill(record, "detached")
            self.sock.close()
            if self.session.branches and not stopping:
                await self._end_session()

    async def _end_session(self) -> None:
        """The client went away holding a session: its branches go with it."""
        held, self.session.branches = self.session.branches, []
        log.info("client pid %d went away in a session: discarding %d branches",
                 self.peer.pid, len(held))
        with trio.CancelScope(shield=True):  # not half done if the daemon stops meanwhile
            await self.handlers.end_session(self.peer, held)

    def _deadline(self, greeted: bool, hello_by: float) -> float:
        if not greeted:
            return hello_by
        self.attached = [run_id for run_id in self.attached  # the ended need no kill
                         if (r := self.handlers.runs.get(run_id)) is not None
                         and r.result is None]
        self.session.branches = [held for held in self.session.branches  # nor the ended
                                 if self.handlers.store.status(held[2]) == ACTIVE]
        if not self.idle_timeout or self.attached or self.session.branches:
            return math.inf  # closing it would kill the runs, discard the branches
        return trio.current_time() + self.idle_timeout

    async def goodbye(self, code: str, message: str) -> None:
        """The last word before the daemon closes: best effort, never blocking for long."""
        with trio.move_on_after(1):  # a peer that never reads gets nothing
            try:
                await self._send_error(0, protocol.Error(code, message))
            except (OSError, trio.ClosedResourceError, trio.BrokenResourceError,
                    trio.TooSlowError):
                pass

    async def _recv(self) -> bytes:
        fds = array.array("i")
        data, ancdata, _flags, _addr = await self.sock.recvmsg(
            65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        for fd in fds:
            os.set_inheritable(fd, False)
            self.fds.append(fd)
        if len(self.fds) > MAX_HELD_FDS:
            raise protocol.ProtocolError(
                f"more than {MAX_HELD_FDS} descriptors passed that no request takes")
        return bytes(data)

    async def _hello(self, line: bytes) -> bool:
        try:
            req = protocol.decode_request(line)
        except protocol.ProtocolError as e:
            await self._send_error(0, protocol.Error(e.code, str(e)))
            return False
        if req.op != "hello":
            await self._send_error(req.id, protocol.Error("protocol", "say hello first"))
            return False
        version = req.args.get("version")
        if type(version) is not int or version != protocol.VERSION:  # not True, not 1.0
            await self._send_error(req.id, protocol.Error(
                "protocol", f"protocol version {version!r} is not supported; "
                f"this daemon speaks {protocol.VERSION}"))
            return False
        await self._send(protocol.Response(req.id, result={"version": protocol.VERSION,
                                                           "pid": os.getpid()}))
        return True

    async def _answer(self, line: bytes) -> None:
        ident = 0
        fds: list[int] = []
        try:
            req = protocol.decode_request(line)
            ident = req.id
            fds = self._take_fds(req.args)
            await self.handlers.authorize(self.peer, req.op, req.args)
            try:
                result = await HANDLERS[req.op](self.handlers, self.peer, req.args, fds)
            finally:  # what the request changed is seen through the mounts before its answer
                await self.handlers.data.settle()
            if req.op == "exec" and not req.args.get("detach"):
                self.attached.append(result["run"])
            response = protocol.Response(ident, result=result)
        except trio.Cancelled:
            raise
        except Exception as e:
            response = protocol.Response(ident, error=to_error(e))
        finally:
            for fd in fds:
                os.close(fd)
        await self._send(response)

    def _take_fds(self, args: dict[str, Any]) -> list[int]:
        want = args.get("pass_fds", 0)
        if not isinstance(want, int) or isinstance(want, bool) or not 0 <= want <= MAX_FDS:
            raise RequestError("bad-request", "'pass_fds' must be a small count")
        if want > len(self.fds):
            raise RequestError("bad-request", f"expected {want} descriptors, got {len(self.fds)}")
        return [self.fds.popleft() for _ in range(want)]

    async def _send_error(self, ident: int, error: protocol.Error) -> None:
        await self._send(protocol.Response(ident, error=error))

    async def _send(self, response: protocol.Response) -> None:
        try:
            data = response.encode()
        except protocol.ProtocolError as e:
            data = protocol.Response(response.id, error=protocol.Error("protocol", str(e))).encode()
        view = memoryview(data)
        while view:
            # a client that stops reading its answers is as idle as one that stops asking
            with trio.fail_after(self.idle_timeout or math.inf):
                sent = await self.sock.send(view)
            view = view[sent:]


def bind_socket(path: Path, mode: int, group: int | None = None) -> trio.socket.SocketType:
    """Listen on ``path`` (owned by ``group`` where given, with ``mode``); refuse if another
    daemon answers there, replace a stale file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a daemon that died
            else:
                raise RequestError("busy", f"another branchd is listening on {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    if group is not None:
        try:
            os.chown(path, -1, group)
        except PermissionError:
            sock.close()
            raise RequestError("permission", f"cannot give {path} to group {group}: "
                               "the daemon is neither root nor in that group") from None
    os.chmod(path, mode)  # before listen(): nobody connects under the umask's mode
    sock.listen(128)
    return trio.socket.from_stdlib_socket(sock)


async def accept(listener: trio.socket.SocketType) -> trio.socket.SocketType:
    """The next connection. Out of descriptors, wait and try again (the connection
    stays queued): logged once per shortage, the daemon never exits for it."""
    short = False
    while True:
        try:
            sock, _ = await listener.accept()
        except OSError as e:
            if e.errno == errno.ECONNABORTED:
                continue
            if e.errno not in OUT_OF_FDS:
                raise
            if not short:
                log.error("cannot accept a connection: %s; retrying every %.1f s",
                          os.strerror(e.errno), ACCEPT_BACKOFF)
                short = True
            await trio.sleep(ACCEPT_BACKOFF)
            continue
        if short:
            log.warning("accepting connections again")
        return sock


async def serve_control(
    listener: trio.socket.SocketType,
    handlers: Handlers,
    allow_uids: frozenset[int],
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    allowed = {0, os.geteuid(), *allow_uids}
    open_per_uid: Counter[int] = Counter()

    async def serve(conn: Connection) -> None:
        try:
            await conn.run()
        finally:
            open_per_uid[conn.peer.uid] -= 1

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            sock = await accept(listener)
            peer = peer_of(sock)
            conn = Connection(sock, handlers, peer, idle_timeout)
            if peer.uid not in allowed:
                log.warning("refused connection from uid %d (pid %d)", peer.uid, peer.pid)
                nursery.start_soon(_refuse, conn, "permission",
                                   f"uid {peer.uid} may not use this branchd")
            elif open_per_uid[peer.uid] >= MAX_CONNECTIONS_PER_UID:
                log.debug("uid %d has %d connections open: refused one more",
                          peer.uid, MAX_CONNECTIONS_PER_UID)
                nursery.start_soon(_refuse, conn, "busy", f"uid {peer.uid} has "
                                   f"{MAX_CONNECTIONS_PER_UID} connections open already")
            else:
                open_per_uid[peer.uid] += 1
                nursery.start_soon(serve, conn)


async def _refuse(conn: Connection, code: str, message: str) -> None:
    with conn.sock:
        await conn.goodbye(code, message)
