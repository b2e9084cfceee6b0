"""Durable writes: the one helper every state file goes through.

``atomic_write`` writes a temp file in the target's directory, fsyncs it,
``os.replace``s it over the target and fsyncs the directory, so a reader (or a
restart after a crash) sees the old content or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable
from typing import Any

from .errors import Corrupt

TMP_SUFFIX = ".tmp"

_libc = ctypes.CDLL(None, use_errno=True)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(path: str | os.PathLike[str]) -> tuple[list[Any], bytes]:
    """The records of an append-only log of JSON lines (the state log, a branch's
    origins), and its torn tail: the bytes after the last newline, an append that
    a crash cut short, which the caller ignores. A complete line that is not JSON
    is damage, never skipped: Corrupt. One reader, so one rule, for every log."""
    with open(path, "rb") as f:
        *lines, tail = f.read().split(b"\n")
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise Corrupt(f"{os.fspath(path)}: line {n} of {len(lines)} is not a record; "
                          "the log is damaged (a torn last line would be ignored)") from None
    return records, tail


def atomic_write(path: str | os.PathLike[str], data: bytes, *,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Replace *path* with *data* atomically and durably.

    *before_replace* is called (if given) after the temp file is durable and
    before it is renamed over *path*: the crash-test hook uses it.
    """
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding *fd* (data moved by rename must be durable)."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
