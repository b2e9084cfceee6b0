"""A typed, blocking client of branchd's control socket.

Each thread gets its own connection (a ``run`` blocks its connection until the
process ends, and patterns run candidates from several threads). Requests are
answered in order on a connection, so a reply is always for the last request.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from pathlib import Path
from typing import Any

from branching.errors import BranchError
from daemon import protocol


class _Connection:
    def __init__(self, path: Path, timeout: float | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as e:
            self.sock.close()
            code = "permission" if isinstance(e, PermissionError) else "unavailable"
            raise BranchError(code, f"cannot reach branchd at {path}: {e.strerror}") from None
        self.buf = b""
        self.next_id = 1
        try:
            self.call("hello", {"version": protocol.VERSION})
        except BaseException:  # refused (a busy daemon, a version mismatch): not leaked
            self.sock.close()
            raise

    def call(self, op: str, args: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        req = protocol.Request(self.next_id, op, args)
        self.next_id += 1
        data = req.encode()
        try:
            try:
                if fds:
                    sent = socket.send_fds(self.sock, [data], fds)
                    data = data[sent:]
                if data:
                    self.sock.sendall(data)
            except BrokenPipeError:
                pass  # the daemon may have refused us and closed: its reason is still to read
            line = self._readline()
        except OSError as e:
            raise BranchError("unavailable", f"branchd connection lost: {e}") from None
        resp = protocol.decode_response(line)
        if resp.error is not None:
            raise BranchError(resp.error.code, resp.error.message)
        return resp.result or {}

    def _readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the daemon closed the connection")
            self.buf += chunk
            if len(self.buf) > protocol.MAX_MESSAGE:
                raise BranchError("protocol", "response exceeds the message size cap")
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def dropped(self) -> bool:
        """Whether the daemon closed this connection while it was idle: between requests
        nothing arrives but the daemon's goodbye (or the end of the stream)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(self.buf or poller.poll(0))

    def close(self) -> None:
        self.sock.close()


class Client:
    """Talks to one daemon. Thread-safe: one connection per calling thread."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else protocol.default_socket()
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[_Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.dropped():  # timed out by the daemon: a new one
            self.release()
            conn = None
        if conn is None:
            conn = _Connection(self.socket_path, self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        """Send one request (with ``fds`` passed alongside); returns its result or raises."""
        args = {k: v for k, v in args.items() if v is not None}
        if fds:
            args["pass_fds"] = len(fds)
        try:
            return self._conn().call(op, args, fds)
        except BranchError as e:
            if e.code in ("unavailable", "protocol"):
                self.release()  # a broken connection is not reused
            raise
        except protocol.ProtocolError as e:
            self.release()
            raise BranchError("protocol", str(e)) from None

    def release(self) -> None:
        """Close the calling thread's connection (a worker thread calls this when done)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                self._all.remove(conn)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
