"""A full disk: the writer gets ENOSPC, nothing already written is lost, the daemon serves on.

The disk is a real 8 MiB tmpfs holding the workspace and the daemon's state.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.protocol import ExitCode

from .conftest import CLI, tmpfs_at

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120),
              pytest.mark.root("mounts a small tmpfs to fill")]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "disk", "8m") as d:
        yield d


def fill(path: Path) -> int:
    """Write until not one more page fits; returns the errno that stopped the last write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stopped = 0
    try:
        for chunk in (1 << 20, 4096):  # big writes first, then fill the last pages
            try:
                for _ in range((64 << 20) // chunk):
                    os.write(fd, b"x" * chunk)
                stopped = 0
            except OSError as e:
                stopped = e.errno or 0
    finally:
        os.close(fd)
    return stopped


def test_enospc_reaches_the_writer_and_the_daemon_survives(small_disk: Path) -> None:
    ws = small_disk / "proj"
    ws.mkdir()
    (ws / "keep").write_text("base\n")
    d = EmbeddedDaemon(small_disk / "d")
    (small_disk / "d").mkdir()
    d.start()
    try:
        cli = CLI(d.socket)
        p = Path(cli("create", "full", "-w", str(ws)).stdout.strip())
        (p / "small").write_text("small change\n")
        assert fill(p / "big") == errno.ENOSPC
        assert (p / "small").read_text() == "small change\n"
        assert cli.json("status")["branches"] == 1  # still serving
        os.unlink(p / "big")  # free the space in the branch again
        cli("commit", "full")
        assert (ws / "small").read_text() == "small change\n"
        assert (ws / "keep").read_text() == "base\n" and not (ws / "big").exists()
    finally:
        d.stop()


def test_commit_on_a_full_disk_fails_cleanly_and_loses_nothing(small_disk: Path) -> None:
    ws = small_disk / "proj"
    ws.mkdir()
    (ws / "f").write_text("old\n")
    (small_disk / "d").mkdir()
    d = EmbeddedDaemon(small_disk / "d").start()
    try:
        cli = CLI(d.socket)
        p = Path(cli("create", "c", "-w", str(ws)).stdout.strip())
        (p / "f").write_text("new\n")
        assert fill(small_disk / "hog") == errno.ENOSPC  # the disk is full before the commit
        proc = cli("commit", "c", check=ExitCode.NO_SPACE)
        assert len(proc.stderr.splitlines()) == 1
        assert (ws / "f").read_text() == "old\n"
        assert (p / "f").read_text() == "new\n"  # the branch is intact
        os.unlink(small_disk / "hog")
        cli("commit", "c")
        assert (ws / "f").read_text() == "new\n"
    finally:
        d.stop()
