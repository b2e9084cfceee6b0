"""The async client of branchd's control socket, for asyncio and trio alike (anyio).

The same protocol and pool as ``branching.client.Client``, with the socket's
waits on the event loop instead of in a thread: a call in flight holds its own
connection, so as many calls run at once as there are tasks making them, and at
most ``IDLE_KEPT`` idle connections stay open afterwards. The connections are
plain non-blocking sockets bound to no event loop: one client serves successive
``asyncio.run``s, and ``close()`` needs no loop.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from branching.client import Wire, broken_by, connect_error, request_args
from branching.errors import BranchError
from daemon import protocol

CONNECT_RETRY = 0.01  # seconds between tries while the daemon's accept queue is full


class _AsyncConnection(Wire):
    @classmethod
    async def open(cls, path: Path) -> _AsyncConnection:
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        conn = cls(sock)
        try:
            while True:
                try:
                    sock.connect(str(path))
                    break
                except BlockingIOError:  # a unix socket's backlog is full: not refused
                    await anyio.sleep(CONNECT_RETRY)
                except OSError as e:
                    raise connect_error(path, e) from None
            await conn.call("hello", {"version": protocol.VERSION})
        except BaseException:  # refused, or cancelled while connecting: not leaked
            sock.close()
            raise
        return conn

    async def call(self, op: str, args: dict[str, Any],
                   fds: list[int] | None = None) -> dict[str, Any]:
        data = self.request(op, args)
        try:
            try:
                await self._send(data, fds)
            except BrokenPipeError:
                pass  # the daemon may have refused us and closed: its reason is still to read
            while (line := self.line()) is None:
                self.feed(await self._recv())
        except OSError as e:
            raise BranchError("unavailable", f"branchd connection lost: {e}") from None
        return self.result(line)

    async def _send(self, data: bytes, fds: list[int] | None) -> None:
        view = memoryview(data)
        while view:
            try:
                if fds:
                    sent = socket.send_fds(self.sock, [view], fds)
                    fds = None  # they went with the first byte sent
                else:
                    sent = self.sock.send(view)
                view = view[sent:]
            except BlockingIOError:
                await anyio.wait_writable(self.sock)

    async def _recv(self) -> bytes:
        while True:
            try:
                return self.sock.recv(65536)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)


class AsyncClient:
    """Talks to one daemon from async code (asyncio or trio). Safe to share between the
    tasks of one event loop; see the module docstring."""

    IDLE_KEPT = 2

    def __init__(self, socket_path: str | os.PathLike[str] | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else protocol.default_socket()
        self._idle: list[_AsyncConnection] = []
        self._closed = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncCalls]:
        """One connection for a sequence of calls, given back (or closed) afterwards; a
        call that is cancelled closes it (the daemon then kills a run attached to it)."""
        conn = await self._take()
        try:
            yield AsyncCalls(conn)
        except BaseException as e:
            self._give_back(conn, broken_by(e))
            if isinstance(e, protocol.ProtocolError):
                raise BranchError("protocol", str(e)) from None
            raise
        self._give_back(conn, broken=False)

    async def call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        """Send one request (with ``fds`` passed alongside); returns its result or raises."""
        async with self.connection() as c:
            return await c.call(op, fds, **args)

    def held(self) -> AsyncHeld:
        """A connection of its own for calls whose effects belong to it (a session)."""
        return AsyncHeld(self)

    async def _take(self) -> _AsyncConnection:
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:  # (a pop, not a test first: loops in other threads share it)
                return await _AsyncConnection.open(self.socket_path)
            if not conn.dropped():  # else timed out by the daemon while idle: next one
                return conn
            conn.close()

    def _give_back(self, conn: _AsyncConnection, broken: bool) -> None:
        if not broken and not self._closed and len(self._idle) < self.IDLE_KEPT:
            self._idle.append(conn)
        else:
            conn.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections (those in use close when their call is done)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class AsyncCalls:
    """Calls on one connection (``AsyncClient.connection()``)."""

    def __init__(self, conn: _AsyncConnection) -> None:
        self._conn = conn

    async def call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        return await self._conn.call(op, request_args(args, fds), fds)


class AsyncHeld:
    """``branching.client.Held`` for async code: one connection kept for calls that
    belong to it, opened on first use, replaced if the daemon closed it while idle."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._conn: _AsyncConnection | None = None
        self._lock = anyio.Lock()  # one request at a time on the connection

    @property
    def opened(self) -> bool:
        return self._conn is not None

    async def call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        async with self._lock:
            if self._conn is not None and self._conn.dropped():
                self._conn.close()
                self._conn = None
            if self._conn is None:
                self._conn = await self._client._take()
            conn = self._conn
            try:
                return await conn.call(op, request_args(args, fds), fds)
            except BaseException as e:
                if broken_by(e):
                    conn.close()
                    self._conn = None
                if isinstance(e, protocol.ProtocolError):
                    raise BranchError("protocol", str(e)) from None
                raise

    def release(self, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._give_back(conn, broken)
