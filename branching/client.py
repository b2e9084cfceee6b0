"""A typed, blocking client of branchd's control socket.

A call takes a connection from a small pool of idle ones and gives it back (a
``wait`` blocks its connection until the run ends, and patterns run candidates
from several threads). Requests are answered in order on a connection, so a
reply is always for the last request.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from branching.errors import BranchError
from daemon import protocol


def connect_error(path: Path, e: OSError) -> BranchError:
    """Why the daemon at *path* cannot be reached, and what to do about it."""
    if isinstance(e, PermissionError):
        return BranchError("permission", f"cannot reach branchd at {path}: {e.strerror}")
    return BranchError("unavailable", f"cannot reach branchd at {path}: {e.strerror}; "
                       f"start one with `branchctl serve` or `systemctl start branchd`, "
                       f"or set BRANCHD_SOCKET to a running one's socket")


def request_args(args: dict[str, Any], fds: list[int] | None) -> dict[str, Any]:
    """A call's arguments as sent: None means absent; passed descriptors are counted."""
    args = {k: v for k, v in args.items() if v is not None}
    if fds:
        args["pass_fds"] = len(fds)
    return args


def broken_by(e: BaseException) -> bool:
    """Whether a connection on which a call raised *e* is unusable: a daemon error leaves
    it as it was, anything else (lost, malformed, interrupted mid-call) in a state
    unknown."""
    return not isinstance(e, BranchError) or e.code in ("unavailable", "protocol")


class Wire:
    """What a connection to the daemon is, without its I/O: the socket, the requests'
    ids and encoding, the replies' framing and decoding into a result or a BranchError.
    ``_Connection`` does the I/O blocking, ``branching.aclient`` on an event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.next_id = 1

    def request(self, op: str, args: dict[str, Any]) -> bytes:
        req = protocol.Request(self.next_id, op, args)
        self.next_id += 1
        return req.encode()

    def line(self) -> bytes | None:
        """The next complete reply line received, if any."""
        if b"\n" not in self.buf:
            if len(self.buf) > protocol.MAX_MESSAGE:
                raise BranchError("protocol", "response exceeds the message size cap")
            return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            raise ConnectionResetError("the daemon closed the connection")
        self.buf += chunk

    @staticmethod
    def result(line: bytes) -> dict[str, Any]:
        resp = protocol.decode_response(line)
        if resp.error is not None:
            raise BranchError(resp.error.code, resp.error.message)
        return resp.result or {}

    def dropped(self) -> bool:
        """Whether the daemon closed this connection while it was idle: between requests
        nothing arrives but the daemon's goodbye (or the end of the stream)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(self.buf or poller.poll(0))

    def close(self) -> None:
        self.sock.close()


class _Connection(Wire):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as e:
            self.sock.close()
            raise connect_error(path, e) from None
        try:
            self.call("hello", {"version": protocol.VERSION})
        except BaseException:  # refused (a busy daemon, a version mismatch): not leaked
            self.sock.close()
            raise

    def call(self, op: str, args: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        data = self.request(op, args)
        try:
            try:
                if fds:
                    sent = socket.send_fds(self.sock, [data], fds)
                    data = data[sent:]
                if data:
                    self.sock.sendall(data)
            except BrokenPipeError:
                pass  # the daemon may have refused us and closed: its reason is still to read
            while (line := self.line()) is None:
                self.feed(self.sock.recv(65536))
        except OSError as e:
            raise BranchError("unavailable", f"branchd connection lost: {e}") from None
        return self.result(line)


class Client:
    """Talks to one daemon. Thread-safe.

    Each call takes an idle connection (or opens one) and gives it back when
    answered; at most ``IDLE_KEPT`` idle connections stay open, so a client used
    from many threads (a pattern's workers, a graph framework's pool) holds
    only as many connections as it has calls in flight. Calls that belong
    together (``exec`` and the ``wait`` for that run: the daemon kills a run
    whose connection goes away) share one through ``connection()``.
    """

    IDLE_KEPT = 2

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else protocol.default_socket()
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[Calls]:
        """One connection for a sequence of calls, given back (or closed) afterwards."""
        conn = self._take()
        try:
            yield Calls(conn)
        except BaseException as e:
            self._give_back(conn, broken_by(e))
            if isinstance(e, protocol.ProtocolError):
                raise BranchError("protocol", str(e)) from None
            raise
        self._give_back(conn, broken=False)

    def call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        """Send one request (with ``fds`` passed alongside); returns its result or raises."""
        with self.connection() as c:
            return c.call(op, fds, **args)

    def held(self) -> Held:
        """A connection of its own for calls whose effects belong to it (a session)."""
        return Held(self)

    def _take(self) -> _Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return _Connection(self.socket_path, self.timeout)
            if not conn.dropped():  # else timed out by the daemon while idle: next one
                return conn
            conn.close()

    def _give_back(self, conn: _Connection, broken: bool) -> None:
        with self._lock:
            if not broken and not self._closed and len(self._idle) < self.IDLE_KEPT:
                self._idle.append(conn)
                return
        conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections (those in use close when their call is done)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Calls:
    """Calls on one connection (``Client.connection()``)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        return self._conn.call(op, request_args(args, fds), fds)


class Held:
    """One connection kept for calls that belong to it (``Client.held()``), opened on first
    use and given back by ``release()``. Thread-safe: its calls go one at a time. One
    that the daemon closed while idle is replaced: the daemon closes only a connection
    that holds nothing (no run, no branch of a session), so nothing goes with it."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._conn: _Connection | None = None
        self._lock = threading.Lock()

    @property
    def opened(self) -> bool:
        return self._conn is not None

    def call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        with self._lock:
            if self._conn is not None and self._conn.dropped():
                self._conn.close()
                self._conn = None
            if self._conn is None:
                self._conn = self._client._take()
            conn = self._conn
            try:
                return conn.call(op, request_args(args, fds), fds)
            except BaseException as e:
                if broken_by(e):
                    conn.close()
                    self._conn = None
                if isinstance(e, protocol.ProtocolError):
                    raise BranchError("protocol", str(e)) from None
                raise

    def release(self, broken: bool = False) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            self._client._give_back(conn, broken)
