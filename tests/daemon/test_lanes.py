"""A commit runs off the event loop: the daemon answers everything else meanwhile.

The commit is held half way for real, by the kernel: the workspace's base is on
a tmpfs and the daemon's state on another filesystem, so the commit copies each
file of the branch across, in name order; the test holds a write lease
(``F_SETLEASE``) on one file of the branch's delta, and the kernel makes the
commit's open of it wait until the test gives the lease up. While it waits
(the files before it are in the base, those after it not yet), list, info,
status and create in another workspace are answered; a FUSE reader of the
workspace waits at its gate and then sees the new base whole, never the mix
on disk. (With the overlay backend the reader's branch is the kernel's, which
has no gate: that part runs where FUSE serves the branches.)
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from branching.client import Client

from .conftest import CLI, tmpfs_at

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120),
              pytest.mark.root("mounts a tmpfs for the base, so that the commit copies across")]

FILES = 100  # more than Store's FSYNC_EACH_MAX: synced by one syncfs, not opened for it
HELD = 50  # the file whose copy waits for the lease
ANSWER_S = 5.0  # a generous bound: idle, each takes milliseconds here


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "tmpfs", "16m") as d:
        yield d


class Lease:
    """A write lease on *path*: an open(2) of it by anyone else waits until ``release``
    (or the kernel's lease-break-time, 45 s). ``broken`` says an open is waiting."""

    def __init__(self, path: Path) -> None:
        self._old = signal.signal(signal.SIGIO, lambda *_: None)  # the break's notice
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)

    def broken(self) -> bool:
        return fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_WRLCK

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(self.fd)
            self.fd = -1
            signal.signal(signal.SIGIO, self._old)


class Background(threading.Thread):
    def __init__(self, fn: object) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()  # type: ignore[operator]
        except BaseException as e:
            self.error = e


def timed(fn: object) -> tuple[float, object]:
    t0 = time.monotonic()
    out = fn()  # type: ignore[operator]
    return time.monotonic() - t0, out


def read_all(branch: Path) -> set[str]:
    return {(branch / f"f{i:03}").read_text() for i in range(FILES)}


def test_a_commit_held_half_way_leaves_the_daemon_answering(tmpfs: Path,
                                                            tmp_path: Path) -> None:
    ws = tmpfs / "proj"
    ws.mkdir()
    for i in range(FILES):
        (ws / f"f{i:03}").write_text("old\n")
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "d").mkdir()
    d = EmbeddedDaemon(tmp_path / "d").start()
    lease = None
    try:
        cli = CLI(d.socket)
        mover = Path(cli("create", "mover", "-w", str(ws)).stdout.strip())
        reader = Path(cli("create", "reader", "-w", str(ws)).stdout.strip())
        for i in range(FILES):
            (mover / f"f{i:03}").write_text("new\n")
        bid = cli.json("info", "mover", "-w", str(ws))["id"]
        backend = cli.json("status")["backend"]
        lease = Lease(d.state_dir / "branches" / bid / "upper" / f"f{HELD:03}")

        commit = Background(lambda: cli("commit", "mover", "-w", str(ws)))
        deadline = time.monotonic() + 30
        while not lease.broken():
            assert commit.is_alive() and time.monotonic() < deadline, commit.error
            time.sleep(0.01)
        # the commit's worker waits in the kernel, half way through its copies
        on_disk = [(ws / f"f{i:03}").read_text() for i in range(FILES)]
        assert on_disk[:HELD] == ["new\n"] * HELD and on_disk[HELD:] == ["old\n"] * (FILES - HELD)

        waiting = None
        if backend == "fuse":
            waiting = Background(lambda: read_all(reader))
        with Client(d.socket) as c:
            answers = {
                "cli list": timed(lambda: cli("list")),
                "list": timed(lambda: c.call("list")),
                "info": timed(lambda: c.call("info", name="mover", workspace=str(ws))),
                "status": timed(lambda: c.call("status")),
                "add elsewhere": timed(lambda: c.call("workspace-add", path=str(other))),
                "create elsewhere": timed(lambda: c.call("create", name="elsewhere",
                                                         workspace=str(other))),
            }
        slow = {k: s for k, (s, _) in answers.items() if s > ANSWER_S}
        assert not slow, slow
        assert [b["name"] for b in answers["list"][1]["branches"]  # type: ignore[index]
                if b["name"] == "mover"] == ["mover"]
        assert commit.is_alive(), "the commit was not held while the requests were answered"
        if waiting is not None:
            time.sleep(0.3)
            assert waiting.is_alive(), "the FUSE reader got past the gate of the workspace"

        lease.release()
        commit.join(60)
        assert not commit.is_alive() and commit.error is None, commit.error
        if waiting is not None:
            waiting.join(30)
            assert waiting.error is None, waiting.error
            assert waiting.result == {"new\n"}, waiting.result  # the new base, whole
        assert read_all(reader) == {"new\n"}
        assert cli.json("info", "mover", "-w", str(ws))["status"] == "committed"
    finally:
        if lease is not None:
            lease.release()
        d.stop()
