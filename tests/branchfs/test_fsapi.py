"""fs-API tier: the pyfuse3 Operations called directly (no kernel, no mount),
with a consistency check of the inode tables after every test."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from pyfuse3 import FUSEError

from branchfs import DataPlane, FuseBackend, Store
from branchfs import view as view_module
from branchfs.fs import ENTRY_TIMEOUT, ROOT, Operations
from branchfs.model import ACTIVE

CTX = pyfuse3.RequestContext()  # uid/gid/pid 0: the tests run as root


@dataclass
class Fields:
    """Stands in for pyfuse3.SetattrFields, whose attributes only the kernel
    side can set."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def check_consistency(ops: Operations) -> None:
    for (parent, name), ino in ops.dentries.items():
        assert (parent, name) in ops.nodes[ino].links
    for ino, node in ops.nodes.items():
        assert node.ino == ino
        for link in node.links:
            assert ops.dentries[link] == ino
        for fh in node.handles:
            assert ops.handles[fh].ino == ino
        if node.kind == "view" and node.links and ops.store.status(node.bid or "") == ACTIVE:
            view = ops.store.view_by_id(node.bid or "")
            e = view.lookup(ops._parts(node))
            assert e is not None and e.is_dir == node.is_dir, ops._parts(node)
    for fh, h in ops.handles.items():
        assert fh in ops.nodes[h.ino].handles


@pytest.fixture
def ops(store: Store) -> Iterator[Operations]:
    store.create_branch("ws", "b1")
    store.create_branch("ws", "b2")
    before = open_fds()
    fuse = FuseBackend(store)
    DataPlane(store, [fuse])  # the store's subscriber: its events reach the adapter
    o = fuse.ops
    yield o
    check_consistency(o)
    for fh in list(o.handles):
        os.close(o.handles.pop(fh).fd)
    for v in store._views.values():
        v.close()  # the fds of cached merged dirs
    held = {*store._base_fds.values(), *(fd for fds in store._dir_fds.values() for fd in fds),
            *(o._fd for o in store._origins.values() if o._fd is not None)}
    if view_module._watch is not None:
        held.add(view_module._watch.inotify.fd)  # the process's one inotify instance
    assert open_fds() <= before | {str(fd) for fd in held}  # no fd leaked


async def path(ops: Operations, *names: str) -> int:
    ino = ROOT
    for n in names:
        ino = (await ops.lookup(ino, n.encode(), CTX)).st_ino
    return ino


async def errno_of(coro: Any) -> int:
    with pytest.raises(FUSEError) as ei:
        await coro
    return ei.value.errno


@pytest.mark.trio
async def test_layout_and_lookup(ops: Operations) -> None:
    ws = await path(ops, "ws")
    assert stat.S_ISDIR((await ops.getattr(ws, CTX)).st_mode)
    fh = await ops.opendir(ROOT, CTX)
    assert [e[0] for e in ops.dirs[fh]] == ["ws"]
    await ops.releasedir(fh)
    fh = await ops.opendir(ws, CTX)
    assert sorted(e[0] for e in ops.dirs[fh]) == ["b1", "b2"]
    await ops.releasedir(fh)
    b1 = await path(ops, "ws", "b1")
    fh = await ops.opendir(b1, CTX)
    assert sorted(e[0] for e in ops.dirs[fh]) == ["a", "d", "empty"]
    await ops.releasedir(fh)
    missing = await ops.lookup(b1, b"nope", CTX)  # a negative entry the kernel may keep
    assert (missing.st_ino, missing.entry_timeout) == (0, ENTRY_TIMEOUT)
    assert await errno_of(ops.lookup(ws, b"nope", CTX)) == errno.ENOENT
    assert await errno_of(ops.lookup(ROOT, b"nope", CTX)) == errno.ENOENT
    assert (await ops.lookup(b1, b"..", CTX)).st_ino == ws
    assert await ops.listxattr(ws, CTX) == []
    assert await errno_of(ops.mkdir(ws, b"x", 0o755, CTX)) == errno.EPERM


@pytest.mark.trio
async def test_missing_name_in_a_nested_branch_is_not_cached(ops: Operations,
                                                             store: Store) -> None:
    store.create_branch("ws", "c", "b1")  # the parent's writes may make the name
    c = await path(ops, "ws", "c")
    assert await errno_of(ops.lookup(c, b"nope", CTX)) == errno.ENOENT


@pytest.mark.trio
async def test_create_write_read_rename_keeps_inode(ops: Operations, base: Path) -> None:
    b1 = await path(ops, "ws", "b1")
    fi, attr = await ops.create(b1, b"new", 0o644, os.O_WRONLY, CTX)
    assert await ops.write(fi.fh, 0, b"data") == 4
    await ops.release(fi.fh)
    d = await path(ops, "ws", "b1", "d")
    await ops.rename(b1, b"new", d, b"moved", 0, CTX)
    moved = await ops.lookup(d, b"moved", CTX)
    assert moved.st_ino == attr.st_ino and moved.st_size == 4
    fi = await ops.open(moved.st_ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 100) == b"data"
    await ops.release(fi.fh)
    a = await path(ops, "ws", "b1", "a")
    fi = await ops.open(a, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"J")
    await ops.release(fi.fh)
    assert (await ops.lookup(b1, b"a", CTX)).st_ino == a
    assert (base / "a").read_text() == "hello\n"
    assert not (base / "new").exists()


@pytest.mark.trio
async def test_setattr_and_copy_up_refreshes_readers(ops: Operations) -> None:
    a = await path(ops, "ws", "b1", "a")
    reader = await ops.open(a, os.O_RDONLY, CTX)
    assert not ops.handles[reader.fh].upper
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 2
    attr.st_mode = stat.S_IFREG | 0o600
    got = await ops.setattr(a, attr, Fields(update_size=True, update_mode=True), None, CTX)
    assert got.st_size == 2 and stat.S_IMODE(got.st_mode) == 0o600
    assert ops.handles[reader.fh].upper  # now reads the branch's copy
    assert await ops.read(reader.fh, 0, 100) == b"he"
    await ops.release(reader.fh)


@pytest.mark.trio
async def test_links_and_unlink_forget(ops: Operations) -> None:
    b1 = await path(ops, "ws", "b1")
    a = await path(ops, "ws", "b1", "a")
    attr = await ops.link(a, b1, b"a2", CTX)
    assert attr.st_ino == a and attr.st_nlink == 2
    await ops.unlink(b1, b"a", CTX)
    assert (await ops.getattr(a, CTX)).st_nlink == 1
    assert ops.nodes[a].name == "a2"
    fi = await ops.open(a, os.O_RDWR, CTX)
    await ops.unlink(b1, b"a2", CTX)
    assert await ops.write(fi.fh, 0, b"still open") == 10
    assert (await ops.getattr(a, CTX)).st_nlink == 0
    await ops.forget([(a, 2)])
    assert a in ops.nodes  # still open
    await ops.release(fi.fh)
    assert a not in ops.nodes


@pytest.mark.trio
async def test_rename_across_branches_is_exdev(ops: Operations) -> None:
    b1 = await path(ops, "ws", "b1")
    b2 = await path(ops, "ws", "b2")
    assert await errno_of(ops.rename(b1, b"a", b2, b"a", 0, CTX)) == errno.EXDEV


@pytest.mark.trio
async def test_private_xattrs(ops: Operations) -> None:
    a = await path(ops, "ws", "b1", "a")
    assert await errno_of(ops.setxattr(a, b"user.overlay.opaque", b"y", CTX)) == errno.EPERM
    await ops.setxattr(a, b"user.x", b"1", CTX)
    assert await ops.listxattr(a, CTX) == [b"user.x"]
    assert await errno_of(ops.getxattr(a, b"user.nope", CTX)) == errno.ENODATA


@pytest.mark.trio
async def test_commit_makes_invalidated_siblings_stale(ops: Operations, store: Store) -> None:
    store.discard("ws", "b2")
    store.create_branch("ws", "b2", on_sibling_commit="invalidate")
    a1 = await path(ops, "ws", "b1", "a")
    a2 = await path(ops, "ws", "b2", "a")
    fi = await ops.open(a2, os.O_RDONLY, CTX)
    store.commit("ws", "b1")
    assert await errno_of(ops.getattr(a2, CTX)) == errno.ESTALE
    assert await errno_of(ops.read(fi.fh, 0, 10)) == errno.ESTALE
    assert await errno_of(ops.getattr(a1, CTX)) == errno.ESTALE
    ws = await path(ops, "ws")
    assert await errno_of(ops.lookup(ws, b"b2", CTX)) == errno.ENOENT
    await ops.release(fi.fh)
    await ops.forget([(a1, 1), (a2, 1)])


@pytest.mark.trio
async def test_unexpected_error_makes_only_that_branch_failsafe(
        ops: Operations, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    a1 = await path(ops, "ws", "b1", "a")
    a2 = await path(ops, "ws", "b2", "a")
    view = store.view("ws", "b1")

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")  # a bug cannot be produced on purpose: injected

    monkeypatch.setattr(view, "open_write", broken)
    assert await errno_of(ops.open(a1, os.O_RDWR, CTX)) == errno.EIO
    monkeypatch.undo()
    assert await errno_of(ops.getattr(a1, CTX)) == errno.EIO
    assert await errno_of(ops.open(a1, os.O_RDWR, CTX)) == errno.EPERM
    assert (await ops.getattr(a2, CTX)).st_size == 6  # the sibling is fine
    fi = await ops.open(a2, os.O_RDWR, CTX)
    await ops.release(fi.fh)


@pytest.mark.trio
async def test_xattr_answers_follow_changes(ops: Operations, store: Store) -> None:
    store.create_branch("ws", "c", parent="b1")
    a = await path(ops, "ws", "b1", "a")
    ca = await path(ops, "ws", "c", "a")
    for ino in (a, ca):
        assert await errno_of(ops.getxattr(ino, b"user.k", CTX)) == errno.ENODATA
    await ops.setxattr(a, b"user.k", b"v", CTX)
    assert await ops.getxattr(a, b"user.k", CTX) == b"v"
    assert await ops.getxattr(ca, b"user.k", CTX) == b"v"  # seen through the parent
    await ops.removexattr(a, b"user.k", CTX)
    assert await errno_of(ops.getxattr(ca, b"user.k", CTX)) == errno.ENODATA


@pytest.mark.trio
async def test_xattr_names_known_from_a_new_handle(ops: Operations, base: Path) -> None:
    b1 = await path(ops, "ws", "b1")
    fi, attr = await ops.create(b1, b"new", 0o644, os.O_WRONLY, CTX)
    assert ops.nodes[attr.st_ino].xattrs is not None  # asked before the first write
    assert await errno_of(ops.getxattr(attr.st_ino, b"security.capability", CTX)) \
        == errno.ENODATA
    await ops.setxattr(attr.st_ino, b"user.k", b"v", CTX)
    assert await ops.getxattr(attr.st_ino, b"user.k", CTX) == b"v"
    await ops.release(fi.fh)
    os.setxattr(base / "a", "user.outside", b"o")  # read by the copy-up of the write open
    a = await path(ops, "ws", "b1", "a")
    fi = await ops.open(a, os.O_WRONLY, CTX)
    assert await ops.getxattr(a, b"user.outside", CTX) == b"o"
    await ops.release(fi.fh)
    await ops.forget([(attr.st_ino, 1), (a, 1)])
