"""The framing between the daemon and a FUSE server process (``branchfs.child``).

A stream socket (one end each) carries frames: a 4-byte big-endian length, then
that many bytes of JSON, one object. Descriptors travel as SCM_RIGHTS beside a
frame's first byte; a frame that carries some says how many (``"fds": n``) and
takes them, in order, from those received so far. Both ends use the socket
non-blocking: ``send`` never waits (what the peer has not read yet is kept in
``pending`` and written by ``flush``), and a peer that stops reading shows as
a ``pending`` that grows, never as a caller that hangs.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
from collections.abc import Sequence
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
MAX_FDS = 64


class WireError(Exception):
    """The peer closed the connection or sent something that is not a frame."""


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._in = bytearray()
        self._fds: list[int] = []  # received, not yet claimed by a frame
        self._out: list[tuple[bytes, list[int]]] = []
        self.closed = False  # by close()
        self.eof = False  # the peer closed its end

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> int:
        """Bytes sent but not yet taken by the peer's socket."""
        return sum(len(b) for b, _ in self._out)

    def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Queue *msg* (and duplicates of *fds*, which stay the caller's) and write what
        the socket takes now."""
        if fds:
            msg = {**msg, "fds": len(fds)}
        body = json.dumps(msg, separators=(",", ":")).encode()
        self._out.append((HEADER.pack(len(body)) + body, [os.dup(fd) for fd in fds]))
        self.flush()

    def flush(self) -> bool:
        """Write what the socket takes without waiting; True when nothing is left."""
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", fds))])
                else:
                    n = self.sock.send(data)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise WireError(f"send: {exc}") from None
            for fd in fds:
                os.close(fd)
            if n == len(data):
                self._out.pop(0)
            else:
                self._out[0] = (data[n:], [])
        return True

    def read(self) -> bool:
        """Take what the socket has now into the buffer; False if nothing was there.
        Raises WireError at end of stream."""
        try:
            data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            return False
        except OSError as exc:
            raise WireError(f"receive: {exc}") from None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.set_inheritable(fd, False)
                self._fds.extend(fds)
        if not data:
            self.eof = True
            raise WireError("the peer closed the connection")
        self._in += data
        return True

    def next(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next whole frame received and its descriptors (now the caller's), or None."""
        if len(self._in) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._in)
        if size > MAX_FRAME:
            raise WireError(f"a frame of {size} bytes")
        if len(self._in) < HEADER.size + size:
            return None
        body = bytes(self._in[HEADER.size:HEADER.size + size])
        del self._in[:HEADER.size + size]
        try:
            msg = json.loads(body)
        except ValueError as exc:
            raise WireError(f"not JSON: {exc}") from None
        n = int(msg.get("fds", 0))
        fds, self._fds = self._fds[:n], self._fds[n:]
        return msg, fds

    def wait_blocking(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next frame, waiting for it with poll(2) (the child's start and its
        quiesced state, where nothing else may run). TimeoutError after *timeout*."""
        while (got := self.next()) is None:
            if not self.flush():
                select.select([], [self.sock], [], timeout)
                continue
            if not select.select([self.sock], [], [], timeout)[0]:
                raise TimeoutError("no frame")
            self.read()
        return got

    def close(self) -> None:
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.sock.close()
        self.closed = True
