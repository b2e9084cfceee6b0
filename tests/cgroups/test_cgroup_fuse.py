"""Killing from the thread that serves FUSE: the daemon's situation.

A killed candidate with a file open on the daemon's FUSE mount sends FLUSH
while it exits and cannot finish exiting until the daemon answers. The daemon
answers FUSE on its trio thread, and kills from that thread too; so kill()
must not wait there for the processes to be gone. A one-file pyfuse3
filesystem served in this process stands in for branchfs.
"""

from __future__ import annotations

import errno
import functools
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from cgroups import Manager

pytestmark = [pytest.mark.cgroup, pytest.mark.mount]

FILE_INODE = pyfuse3.ROOT_INODE + 1


class OneFile(pyfuse3.Operations):
    """A root directory holding one empty file, "f"; tells when it is opened, counts FLUSHes."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = trio.Event()
        self.flushes = 0

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
        elif inode == FILE_INODE:
            attrs.st_mode = stat.S_IFREG | 0o644
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_ino = inode
        attrs.st_nlink = 1
        return attrs

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == b"f":
            return await self.getattr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.opened.set()
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return b""

    async def flush(self, fh: int) -> None:
        self.flushes += 1

    async def release(self, fh: int) -> None:
        pass


@pytest.fixture
def fuse_dir(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    yield mnt
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == str(mnt) for line in f):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


@pytest.mark.timeout(60)
@pytest.mark.trio
async def test_kill_group_on_the_fuse_thread(
    manager: Manager, fuse_dir: Path, tmp_path: Path
) -> None:
    ops = OneFile()
    pyfuse3.init(ops, str(fuse_dir), set(pyfuse3.default_options) | {"fsname=cgtest"})
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            # spawn in a worker thread too: the candidate's chdir is a FUSE request
            spawn = functools.partial(
                manager.spawn, ["sh", "-c", "exec 3< f && exec sleep 60"],
                cwd=str(fuse_dir), group="branch",
            )  # fmt: skip
            run = await trio.to_thread.run_sync(spawn)
            await ops.opened.wait()
            assert manager.kill_group("branch") == 1  # on the thread serving FUSE
            result = await trio.to_thread.run_sync(run.wait, 30)
            assert result is not None and result.killed
            assert ops.flushes == 1  # the dying process's FLUSH was answered
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
