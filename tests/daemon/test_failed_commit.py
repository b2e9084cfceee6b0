"""A commit that fails half way never leaves a mixed base behind for anyone to use.

Real disks: the base on an 8 MiB tmpfs, the daemon's state on another
filesystem (the test's tmp dir), so that the commit copies across filesystems.
"Another process fills the disk during the commit" is made exact instead of
timed: the daemon's open of the commit's journal waits, in the kernel, for the
test's answer to a fanotify permission event (FAN_OPEN_PERM), and the test
fills the base's disk before it answers, so every copy after that point gets
ENOSPC (the commit's space check has passed already). (An inotify watch and a
SIGSTOP had raced the daemon: a commit of 30 ms could end before the stop.)
The journal is durable by the first copy, so the rule applies: the
commit is finished before anything else happens in that workspace (Busy, exit 4,
until then) and its branch can not be discarded meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.protocol import ExitCode

from .conftest import CLI, tmpfs_at
from .test_full_disk import fill

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120),
              pytest.mark.root("mounts a small tmpfs to fill")]

FILES = 40
SIZE = 64 << 10
FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_ALLOW = 0x4, 0x1, 0x1, 0x1
FAN_OPEN_PERM, FAN_EVENT_ON_CHILD, AT_FDCWD = 0x10000, 0x08000000, -100
EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata
PAGE = 4096  # tmpfs allocates by pages


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "disk", "8m") as d:
        yield d


class FillOnJournal(threading.Thread):
    """Fills *disk* the moment a commit journal is begun in *state*/journal: the
    daemon's open of it waits for this thread's answer (FAN_OPEN_PERM), given only
    once the disk is full. Other opens there are let through at once."""

    def __init__(self, state: Path, disk: Path) -> None:
        super().__init__(daemon=True)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                            ctypes.c_int, ctypes.c_char_p]
        self.fd = self.libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self.libc.fanotify_mark(self.fd, FAN_MARK_ADD, FAN_OPEN_PERM | FAN_EVENT_ON_CHILD,
                                       AT_FDCWD, str(state / "journal").encode()) == 0
        self.disk, self.filled = disk, threading.Event()
        self.start()

    def run(self) -> None:
        try:
            while not self.filled.is_set():
                buf = os.read(self.fd, 4096)
                off = 0
                while off < len(buf):
                    size, _, _, _, _, fd, _ = EVENT.unpack_from(buf, off)
                    off += size
                    try:
                        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(
                                "commit-") and not self.filled.is_set():
                            fill(self.disk / "hog")
                            self.filled.set()
                    finally:
                        os.write(self.fd, struct.pack("iI", fd, FAN_ALLOW))
                        os.close(fd)
        finally:
            os.close(self.fd)  # later opens go on unasked


def setup(disk: Path, tmp_path: Path) -> tuple[EmbeddedDaemon, CLI, Path, Path]:
    ws = disk / "proj"
    ws.mkdir()
    for i in range(FILES):
        (ws / f"f{i:02}").write_bytes(b"o" * SIZE)
    (tmp_path / "d").mkdir()
    d = EmbeddedDaemon(tmp_path / "d").start()
    cli = CLI(d.socket)
    p = Path(cli("create", "c", "-w", str(ws)).stdout.strip())
    cli("create", "sib", "-w", str(ws))
    for i in range(FILES):
        (p / f"f{i:02}").write_bytes(b"n" * SIZE)
    return d, cli, ws, d.state_dir


def statuses(cli: CLI, ws: Path) -> dict[str, str]:
    return {b["name"]: b["status"] for b in cli.json("list", "-w", str(ws), "--all")["branches"]}


def contents(ws: Path) -> set[bytes]:
    return {(ws / f"f{i:02}").read_bytes()[:1] for i in range(FILES)}


def fail_commit(d: EmbeddedDaemon, cli: CLI, disk: Path, state: Path) -> None:
    assert d.proc is not None
    filler = FillOnJournal(state, disk)
    proc = cli("commit", "c", check=ExitCode.NO_SPACE)
    assert filler.filled.is_set()
    assert len(proc.stderr.splitlines()) == 1
    assert "nothing else happens in workspace" in proc.stderr


def test_enospc_in_a_commit_blocks_the_workspace_until_it_is_finished(
        disk: Path, tmp_path: Path) -> None:
    d, cli, ws, state = setup(disk, tmp_path)
    try:
        fail_commit(d, cli, disk, state)
        # nothing happens in the workspace on top of a half-applied commit
        for args in (["list", "-w", str(ws)], ["create", "x", "-w", str(ws)],
                     ["info", "sib"], ["diff", "sib"]):
            proc = cli(*args, check=ExitCode.CONFLICT)
            assert "failed half way" in proc.stderr and len(proc.stderr.splitlines()) == 1
        # and a branch with a journal is never discarded
        cli("discard", "c", check=ExitCode.CONFLICT)
        os.unlink(disk / "hog")  # the space comes back: the next request finishes it
        branches = statuses(cli, ws)
        assert branches == {"c": "committed", "sib": "active"}  # it carries on
        assert contents(ws) == {b"n"}
        assert sorted(os.listdir(ws)) == [f"f{i:02}" for i in range(FILES)]  # no temporaries
        assert os.listdir(state / "journal") == []
        cli("create", "after", "-w", str(ws))
    finally:
        d.stop()


def test_a_restart_on_a_still_full_disk_keeps_the_workspace_blocked(
        disk: Path, tmp_path: Path) -> None:
    d, cli, ws, state = setup(disk, tmp_path)
    try:
        cli("create", "sibkid", "--from", "sib")  # not a sibling: served again all the same
        fail_commit(d, cli, disk, state)
        d.stop()
        d.start()  # recovery cannot finish it yet: the daemon starts and says so
        assert "could not yet complete" in d.log_path.read_text()
        cli("list", "-w", str(ws), check=ExitCode.CONFLICT)
        cli("discard", "c", check=ExitCode.CONFLICT)
        os.unlink(disk / "hog")
        branches = statuses(cli, ws)
        assert branches == {"c": "committed", "sib": "active", "sibkid": "active"}
        backend = cli.json("status")["backend"]  # what start-up held back serves them now
        assert {cli.json("info", n)["backend"] for n in ("sib", "sibkid")} == {backend}
        assert contents(ws) == {b"n"}
        d.stop()
        d.start()  # and nothing is replayed twice
        assert statuses(cli, ws) == branches
        assert contents(ws) == {b"n"}
    finally:
        d.stop()


def test_create_and_discard_on_a_full_state_disk_change_nothing(disk: Path) -> None:
    ws = disk / "proj"
    ws.mkdir()
    (ws / "f").write_text("old\n")
    (disk / "d").mkdir()
    d = EmbeddedDaemon(disk / "d").start()
    try:
        cli = CLI(d.socket)

        def log_size() -> int:
            [log] = d.state_dir.glob("state.log.*")  # the generation changes at a start
            return log.stat().st_size

        # Branch records go to the state log; a tmpfs page is allocated whole, so
        # fill the log's last page with records until the next one would not fit:
        # then the disk is filled, and the next record needs a page there is not.
        before = log_size()
        cli("create", "c00", "-w", str(ws))
        step = log_size() - before  # a record of a branch of this name length
        n = 1
        while PAGE - log_size() % PAGE >= step:
            cli("create", f"c{n:02}", "-w", str(ws))
            n += 1
        assert fill(disk / "hog") == errno.ENOSPC
        for args in (["discard", "c00"], ["create", "new", "-w", str(ws)]):
            proc = cli(*args, check=ExitCode.NO_SPACE)
            assert len(proc.stderr.splitlines()) == 1
        assert cli.json("info", "c00")["status"] == "active"
        cli("info", "new", check=ExitCode.NOT_FOUND)
        os.unlink(disk / "hog")
        d.stop()
        d.start()
        assert cli.json("info", "c00")["status"] == "active"  # the log never said otherwise
        cli("info", "new", check=ExitCode.NOT_FOUND)
        cli("discard", "c00")
        cli("create", "new", "-w", str(ws))
    finally:
        d.stop()
