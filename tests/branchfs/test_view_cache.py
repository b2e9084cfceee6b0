"""The view's cache of merged directories never serves what changed: after the
view's own renames, a parent branch's writes, changes made outside to the base,
a commit and a discard. Each test first checks that the merge it is about to
make stale is really cached, so that it would catch a cache that is not
invalidated."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from bfs_helpers import r, w

from branchfs import Store, backing
from branchfs import view as view_module
from branchfs.view import View


def cached(v: View, path: str) -> bool:
    return tuple(path.split("/")) in v._cache


def test_own_rename_of_a_directory(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    assert r(v, "d/f") == b"in d\n"
    assert cached(v, "d")
    v.rename(("d",), ("e",))
    assert v.lookup(("d", "f")) is None
    assert r(v, "e/f") == b"in d\n"
    v.mkdir(("d",), 0o755)  # the old name again, now an empty directory
    assert v.listdir(("d",)) == {}
    w(v, "d/f", b"new")
    assert r(v, "d/f") == b"new" and r(v, "e/f") == b"in d\n"


def test_outside_directory_replaced(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    assert r(v, "d/f") == b"in d\n"
    assert cached(v, "d")
    (base / "d").rename(base / "old")  # the cached fd still reaches this one
    (base / "d").mkdir()
    (base / "d" / "g").write_text("g")
    assert v.lookup(("d", "f")) is None
    assert r(v, "d/g") == b"g"


def test_outside_directory_appears_below_an_upper_one(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.mkdir(("n",), 0o755)
    w(v, "n/mine", b"m")
    assert r(v, "n/mine") == b"m"
    assert cached(v, "n")
    (base / "n").mkdir()  # the merge of n gains the base's n
    (base / "n" / "x").write_text("x")
    assert r(v, "n/x") == b"x" and r(v, "n/mine") == b"m"
    assert sorted(v.listdir(("n",))) == ["mine", "x"]


def test_parent_branch_writes(store: Store, base: Path) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", "p")
    p, c = store.view("ws", "p"), store.view("ws", "c")
    assert r(c, "d/f") == b"in d\n"
    assert cached(c, "d")
    p.rename(("d",), ("e",))  # a whiteout and an opaque copy in the parent's upper dir
    assert c.lookup(("d", "f")) is None
    assert r(c, "e/f") == b"in d\n"
    p.mkdir(("d",), 0o755)  # opaque: the base's d stays hidden
    assert c.listdir(("d",)) == {}


def test_commit_into_the_parent(store: Store, base: Path) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", "p")
    old = store.view("ws", "p")
    assert r(old, "d/f") == b"in d\n"
    assert cached(old, "d")
    c = store.view("ws", "c")
    c.mkdir(("d", "sub"), 0o755)
    w(c, "d/sub/x", b"x")
    c.unlink(("d", "f"))
    store.commit("ws", "c")
    for v in (store.view("ws", "p"), old):  # the Store's new view, and one kept from before
        assert r(v, "d/sub/x") == b"x"
        assert v.lookup(("d", "f")) is None


def test_discard_then_the_same_name_again(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.mkdir(("d", "sub"), 0o755)
    w(v, "d/sub/x", b"x")
    assert cached(v, "d/sub")
    store.discard("ws", "b1")
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    assert v.lookup(("d", "sub")) is None
    assert sorted(v.listdir(("d",))) == ["f"]


def test_cache_is_bounded_and_keeps_parents(store: Store,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("branchfs.view.MAX_CACHED_DIRS", 8)
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    for i in range(20):
        v.mkdir(("d", f"s{i}"), 0o755)
        w(v, f"d/s{i}/x", str(i).encode())
    for i in range(20):
        assert r(v, f"d/s{i}/x") == str(i).encode()
        assert len(v._cache) <= 8
        for parts in v._cache:  # a cached merge's parent is cached
            assert parts == () or parts[:-1] in v._cache
    v.close()
    assert not v._cache


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_outside_directory_replaced_through_a_mount(mount: Any, base: Path) -> None:
    b1 = mount.path("b1")
    assert os.listdir(b1 / "d") == ["f"]
    assert (b1 / "d" / "f").read_text() == "in d\n"
    (base / "d").rename(base / "old")
    (base / "d").mkdir()
    (base / "d" / "g").write_text("g")
    assert os.listdir(b1 / "d") == ["g"]
    assert (b1 / "d" / "g").read_text() == "g"


def test_no_watch_to_be_had_means_not_cached(store: Store, base: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_watch(self: backing.Inotify, dirfd: int) -> int:
        # running out of inotify watches is a host-wide limit: injected, not produced
        raise OSError(errno.ENOSPC, "no space left for watches")

    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    monkeypatch.setattr(backing.Inotify, "add", no_watch)
    assert r(v, "d/f") == b"in d\n"
    assert not v._cache
    (base / "d").rename(base / "old")
    (base / "d").mkdir()
    assert v.lookup(("d", "f")) is None


def test_close_drops_every_watch(store: Store) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.mkdir(("d", "sub"), 0o755)
    w(v, "d/sub/x", b"x")
    assert r(v, "d/sub/x") == b"x"
    watch = view_module._watch
    assert watch is not None and v._wds
    held = set(v._wds)
    assert all(v in watch.views[wd] for wd in held)
    v.close()
    assert not v._cache and not v._wds
    assert not any(v in watch.views.get(wd, ()) for wd in held)
