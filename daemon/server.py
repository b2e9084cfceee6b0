"""The control server: newline-delimited JSON over a unix socket.

One task per connection; requests on a connection are answered in order. The
peer's credentials come from SO_PEERCRED; file descriptors (a client's stdio for
``exec``) arrive as SCM_RIGHTS ancillary data with the request that uses them.
This module is the protocol's single error boundary: every exception a handler
raises becomes one error response, and the daemon stays up.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
from collections import deque
from pathlib import Path
from typing import Any

import trio

import branchfs
from daemon import protocol
from daemon.handlers import HANDLERS, Handlers, Peer, RequestError
from daemon.meta import MetaTooLarge

log = logging.getLogger(__name__)

MAX_FDS = 8  # descriptors accepted with one message
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
    if isinstance(exc, branchfs.BranchFSError | RequestError | MetaTooLarge):
        return protocol.Error(exc.code, str(exc))
    if isinstance(exc, protocol.ProtocolError):
        return protocol.Error("protocol", str(exc))
    if isinstance(exc, OSError) and exc.errno in ERRNO_CODES:
        return protocol.Error(ERRNO_CODES[exc.errno], os.strerror(exc.errno or 0) +
                              (f": {exc.filename}" if exc.filename else ""))
    log.error("internal error", exc_info=exc)
    return protocol.Error("internal", f"internal error ({type(exc).__name__}: {exc})")


def peer_of(sock: trio.socket.SocketType) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


class Connection:
    """One client connection: reads lines (and descriptors), answers each in order."""

    def __init__(self, sock: trio.socket.SocketType, handlers: Handlers, peer: Peer) -> None:
        self.sock = sock
        self.handlers = handlers
        self.peer = peer
        self.fds: deque[int] = deque()
        self.attached: list[str] = []  # runs to kill if this client goes away

    async def run(self) -> None:
        buf = b""
        greeted = False
        try:
            while True:
                data = await self._recv()
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
                    await self._send_error(0, protocol.Error(
                        "protocol", f"message exceeds {protocol.MAX_MESSAGE} bytes"))
                    return
        except (ConnectionError, trio.ClosedResourceError, trio.BrokenResourceError):
            return
        finally:
            for fd in self.fds:
                os.close(fd)
            for run_id in self.attached:
                record = self.handlers.runs.get(run_id)
                if record is not None and record.result is None:
                    log.info("client of run %s went away: killing it", run_id)
                    record.run.kill()
            self.sock.close()

    async def refuse(self, message: str) -> None:
        with self.sock:
            try:
                await self._send_error(0, protocol.Error("permission", message))
            except OSError:
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
        return bytes(data)

    async def _hello(self, line: bytes) -> bool:
        try:
            req = protocol.decode_request(line)
        except protocol.ProtocolError as e:
            await self._send_error(0, protocol.Error("protocol", str(e)))
            return False
        if req.op != "hello":
            await self._send_error(req.id, protocol.Error("protocol", "say hello first"))
            return False
        if req.args.get("version") != protocol.VERSION:
            await self._send_error(req.id, protocol.Error(
                "protocol", f"protocol version {req.args.get('version')!r} is not supported; "
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
            result = await HANDLERS[req.op](self.handlers, self.peer, req.args, fds)
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
            sent = await self.sock.send(view)
            view = view[sent:]


def bind_socket(path: Path, mode: int) -> trio.socket.SocketType:
    """Listen on ``path``; refuse if another daemon answers there, replace a stale file."""
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
    os.chmod(path, mode)
    sock.listen(128)
    return trio.socket.from_stdlib_socket(sock)


async def serve_control(
    listener: trio.socket.SocketType,
    handlers: Handlers,
    allow_uids: frozenset[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    allowed = {0, os.geteuid(), *allow_uids}
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            sock, _ = await listener.accept()
            peer = peer_of(sock)
            conn = Connection(sock, handlers, peer)
            if peer.uid in allowed:
                nursery.start_soon(conn.run)
            else:
                log.warning("refused connection from uid %d (pid %d)", peer.uid, peer.pid)
                nursery.start_soon(conn.refuse, f"uid {peer.uid} may not use this branchd")
