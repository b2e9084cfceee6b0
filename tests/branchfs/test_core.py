"""Unit tier: the core (views, copy-up, whiteouts, opaque dirs, commit, Store)
without FUSE, on real directories."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from bfs_helpers import r, tree, w

import branchfs
from branchfs import BadName, Conflict, Exists, HasChildren, NotFound, Stale, Store
from branchfs.backing import OPAQUE_XATTR, is_whiteout

# -- names and workspaces --------------------------------------------------

@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "x\0y", "é" * 128, 7])
def test_bad_branch_names(store: Store, bad: object) -> None:
    with pytest.raises(BadName) as ei:
        store.create_branch("ws", bad)  # type: ignore[arg-type]
    assert "\n" not in str(ei.value) and ei.value.code == "bad-name"


def test_name_of_255_bytes_is_fine(store: Store) -> None:
    assert store.create_branch("ws", "n" * 255).name == "n" * 255


def test_workspace_rules(tmp_path: Path, store: Store, base: Path) -> None:
    assert store.add_workspace(str(base)).name == "ws"  # idempotent on the real path
    (tmp_path / "link").symlink_to(base)
    assert store.add_workspace(str(tmp_path / "link")).name == "ws"
    with pytest.raises(NotFound):
        store.add_workspace(str(tmp_path / "missing"))
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "inside").mkdir()
    with pytest.raises(BadName):
        store.add_workspace(str(tmp_path / "mnt" / "inside"))
    with pytest.raises(BadName):
        store.add_workspace(str(tmp_path / "state" / "branches"))
    with pytest.raises(BadName):  # would contain the state dir
        store.add_workspace(str(tmp_path))
    other = tmp_path / "x" / "base"
    other.mkdir(parents=True)
    assert store.add_workspace(str(other)).name == "base"
    other2 = tmp_path / "y" / "base"
    other2.mkdir(parents=True)
    assert store.add_workspace(str(other2)).name == "base-2"
    (base / "inner").mkdir()
    with pytest.raises(BadName, match="inside the registered workspace"):
        store.add_workspace(str(base / "inner"))
    with pytest.raises(BadName, match="contains the registered workspace"):
        store.add_workspace(str(other.parent))
    with pytest.raises(NotFound):
        store.workspace("nope")
    with pytest.raises(NotFound):
        store.create_branch("nope", "b")


def test_exceptions_carry_codes() -> None:
    assert branchfs.HasChildren("x").code == "conflict"
    assert branchfs.Stale("x").code == "stale"
    assert branchfs.NoSpace("x").code == "no-space"
    assert branchfs.PermissionDenied("x").code == "permission"
    assert str(branchfs.NotFound("a\nb")) == "a b"


# -- resolution, copy-up, whiteouts, opaque dirs ------------------------------

def test_create_is_o1_and_shows_the_base(store: Store, base: Path) -> None:
    b = store.create_branch("ws", "b1")
    assert b.status == "active" and b.parent is None
    v = store.view("ws", "b1")
    assert sorted(v.listdir(())) == ["a", "d", "empty"]
    assert r(v, "a") == b"hello\n"
    assert os.listdir(store.delta_dir("ws", "b1")) == []


def test_copy_up_on_write_leaves_base_alone(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "d/f", b"changed")
    assert r(v, "d/f") == b"changed"
    assert (base / "d" / "f").read_text() == "in d\n"
    delta = Path(store.delta_dir("ws", "b1"))
    assert (delta / "d" / "f").read_bytes() == b"changed"
    assert os.listdir(v.layers[1]) == os.listdir(base)


def test_copy_up_keeps_metadata_and_holes(store: Store, base: Path) -> None:
    big = base / "sparse"
    with open(big, "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    os.chmod(big, 0o640)
    os.setxattr(big, "user.k", b"v")
    os.utime(big, ns=(1_000_000_000, 2_000_000_000))
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.copy_up(("sparse",))
    st = os.stat(Path(store.delta_dir("ws", "b1")) / "sparse")
    assert st.st_size == (64 << 20) + 3
    assert st.st_blocks * 512 < (1 << 20)  # holes stayed holes
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 2_000_000_000
    assert v.getxattr(("sparse",), "user.k") == b"v"


def test_unlink_makes_a_whiteout_and_name_can_come_back(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.unlink(("a",))
    assert v.lookup(("a",)) is None and "a" not in v.listdir(())
    assert is_whiteout(os.lstat(Path(store.delta_dir("ws", "b1")) / "a"))
    with pytest.raises(FileNotFoundError):
        v.unlink(("a",))
    w(v, "a", b"again")
    assert r(v, "a") == b"again"
    assert (base / "a").read_text() == "hello\n"


def test_rmdir_rules_and_opaque_recreate(store: Store) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    with pytest.raises(OSError) as ei:
        v.rmdir(("d",))
    assert ei.value.errno == errno.ENOTEMPTY
    v.unlink(("d", "f"))
    v.rmdir(("d",))
    assert v.lookup(("d",)) is None
    v.mkdir(("d",), 0o755)
    assert v.listdir(("d",)) == {}  # the old content does not show through
    assert os.getxattr(Path(store.delta_dir("ws", "b1")) / "d", OPAQUE_XATTR) == b"y"
    with pytest.raises(OSError) as ei:
        v.rmdir(("a",))
    assert ei.value.errno == errno.ENOTDIR


def test_private_xattrs_hidden_and_refused(store: Store) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.unlink(("d", "f"))
    v.rmdir(("d",))
    v.mkdir(("d",), 0o755)
    assert v.listxattr(("d",)) == []
    with pytest.raises(OSError) as ei:
        v.getxattr(("d",), OPAQUE_XATTR)
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        v.setxattr(("a",), "user.overlay.opaque", b"y")
    assert ei.value.errno == errno.EPERM
    v.setxattr(("a",), "user.mine", b"1")
    assert v.listxattr(("a",)) == ["user.mine"]


def test_rename_file_over_existing_and_across_dirs(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.rename(("a",), ("d", "f"))
    assert r(v, "d/f") == b"hello\n" and v.lookup(("a",)) is None
    v.rename(("d", "f"), ("empty", "g"))
    assert sorted(v.listdir(())) == ["d", "empty"] and v.listdir(("d",)) == {}
    with pytest.raises(OSError) as ei:
        v.rename(("empty", "g"), ("d",))
    assert ei.value.errno == errno.EISDIR


def test_rename_lower_directory_copies_it_up(store: Store, base: Path) -> None:
    (base / "d" / "sub").mkdir()
    (base / "d" / "sub" / "x").write_text("x")
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "d/own", b"mine")
    v.rename(("d",), ("d2",))
    assert v.lookup(("d",)) is None
    assert sorted(v.listdir(("d2",))) == ["f", "own", "sub"]
    assert r(v, "d2/sub/x") == b"x" and r(v, "d2/own") == b"mine"
    v.mkdir(("d",), 0o755)
    assert v.listdir(("d",)) == {}
    v.rename(("d2",), ("empty",), 0)
    assert sorted(v.listdir(("empty",))) == ["f", "own", "sub"]
    v.mkdir(("e",), 0o755)
    w(v, "e/k", b"")
    with pytest.raises(OSError) as ei:
        v.rename(("empty",), ("e",))
    assert ei.value.errno == errno.ENOTEMPTY


def test_rename_noreplace_and_exchange(store: Store) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    with pytest.raises(OSError) as ei:
        v.rename(("a",), ("d",), 1)
    assert ei.value.errno == errno.EEXIST
    v.rename(("a",), ("d",), 2)
    assert r(v, "d") == b"hello\n" and r(v, "a/f") == b"in d\n"


def test_hard_links_in_branch(store: Store) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.link(("a",), ("d", "hl"))
    assert v.stat(("a",)).st_nlink == 2
    assert v.stat(("a",)).st_ino == v.stat(("d", "hl")).st_ino
    assert v.rename(("a",), ("d", "hl")) is False  # two links of one file: a no-op
    assert v.lookup(("a",)) is not None and v.stat(("a",)).st_nlink == 2
    w(v, "d/hl", b"both", os.O_WRONLY)
    assert r(v, "a") == b"botho\n"  # overwrote 4 of 6 bytes through the other name


def test_nested_branch_sees_parent_and_hides_via_parent_whiteouts(store: Store) -> None:
    store.create_branch("ws", "p")
    pv = store.view("ws", "p")
    w(pv, "new", b"from p")
    pv.unlink(("a",))
    store.create_branch("ws", "c", parent="p")
    cv = store.view("ws", "c")
    assert r(cv, "new") == b"from p" and cv.lookup(("a",)) is None
    w(cv, "new", b"from c")
    assert r(pv, "new") == b"from p"
    assert store.branch("ws", "c").parent == "p"


# -- diff ----------------------------------------------------------------------

def test_diff(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "a", b"new")
    v.unlink(("d", "f"))
    v.mkdir(("n",), 0o755)
    w(v, "n/x", b"x")
    v.chmod(("empty",), 0o700)
    v.copy_up(("d",))
    got = {(c.kind, c.path, c.type) for c in store.diff("ws", "b1")}
    assert got == {("modified", "a", "file"), ("deleted", "d/f", "file"), ("added", "n", "dir"),
                   ("added", "n/x", "file"), ("modified", "empty", "dir")}
    assert all(set(c.to_dict()) == {"kind", "path", "type", "old_path"}
               for c in store.diff("ws", "b1"))


def test_copy_up_without_change_is_no_diff(store: Store) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    os.close(v.open_write(("a",), os.O_WRONLY))
    assert store.diff("ws", "b1") == []


# -- commit, invalidation, discard ------------------------------------------------

def test_commit_into_base(store: Store, base: Path) -> None:
    os.link(base / "a", base / "a-link")  # a hard link in the base stays untouched
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "a", b"new a")
    v.unlink(("d", "f"))
    v.mkdir(("n",), 0o700)
    w(v, "n/x", b"x")
    v.symlink(("ln",), "../../etc/passwd")
    v.setxattr(("n",), "user.k", b"v")
    v.rename(("empty",), ("moved",))
    inode_before = v.stat(("a",)).st_ino
    res = store.commit("ws", "b1")
    assert res.into is None and res.changes > 0 and res.invalidated == []
    assert (base / "a").read_bytes() == b"new a"
    assert (base / "a-link").read_text() == "hello\n"
    assert os.stat(base / "a").st_ino == inode_before  # renamed, not copied
    assert os.listdir(base / "d") == []
    assert stat.S_IMODE(os.stat(base / "n").st_mode) == 0o700
    assert os.getxattr(base / "n", "user.k") == b"v"
    assert os.readlink(base / "ln") == "../../etc/passwd"
    assert (base / "moved").is_dir() and not (base / "empty").exists()
    for dirpath, dirnames, filenames in os.walk(base):  # no overlay artefacts
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            assert not is_whiteout(os.lstat(p))
            assert OPAQUE_XATTR not in os.listxattr(p, follow_symlinks=False)
    assert store.branch("ws", "b1").status == "committed"
    assert [b.name for b in store.branches("ws")] == []
    assert os.listdir(Path(store.state_dir) / "journal") == []


def test_commit_opaque_dir_replaces_base_content(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.unlink(("d", "f"))
    v.rmdir(("d",))
    v.mkdir(("d",), 0o755)
    w(v, "d/g", b"g")
    store.commit("ws", "b1")
    assert os.listdir(base / "d") == ["g"]
    assert OPAQUE_XATTR not in os.listxattr(base / "d")


def test_nested_commit_keeps_overlay_semantics(store: Store, base: Path) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", parent="p")
    cv = store.view("ws", "c")
    cv.unlink(("a",))
    w(cv, "d/new", b"n")
    res = store.commit("ws", "c")
    assert res.into == "p"
    pv = store.view("ws", "p")
    assert pv.lookup(("a",)) is None and r(pv, "d/new") == b"n"
    assert is_whiteout(os.lstat(Path(store.delta_dir("ws", "p")) / "a"))
    assert (base / "a").exists()
    store.commit("ws", "p")
    assert not (base / "a").exists() and (base / "d" / "new").read_bytes() == b"n"


def test_siblings_invalidated_first_commit_wins(store: Store) -> None:
    for n in ("x1", "x10", "x2"):
        store.create_branch("ws", n, on_sibling_commit="invalidate")
    store.create_branch("ws", "x10c", parent="x10")
    store.create_branch("ws", "x1c", parent="x1")
    store.discard("ws", "x1c")
    res = store.commit("ws", "x1")
    assert sorted(res.invalidated) == ["x10", "x10c", "x2"]
    assert store.branch("ws", "x10").status == "invalidated"
    with pytest.raises(Stale) as ei:
        store.commit("ws", "x10")
    assert "x1" in str(ei.value)
    with pytest.raises(NotFound) as ei2:
        store.commit("ws", "x1")
    assert "was committed" in str(ei2.value)
    with pytest.raises(Exists):
        store.create_branch("ws", "x2")
    store.discard("ws", "x10")
    assert store.branch("ws", "x10c").status == "discarded"


def test_nested_commit_invalidates_only_siblings(store: Store) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "other")
    store.create_branch("ws", "c1", parent="p")
    store.create_branch("ws", "c2", parent="p", on_sibling_commit="invalidate")
    store.create_branch("ws", "c3", parent="p")
    res = store.commit("ws", "c1")
    assert res.invalidated == ["c2"] and res.rebased == ["c3"]
    assert store.branch("ws", "p").status == "active"
    assert store.branch("ws", "other").status == "active"


def test_commit_refused_with_children(store: Store) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", parent="p")
    with pytest.raises(HasChildren) as ei:
        store.commit("ws", "p")
    assert ei.value.code == "conflict" and isinstance(ei.value, Conflict)


def test_discard_removes_descendants_and_name_reuse(store: Store, base: Path) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", parent="p")
    w(store.view("ws", "c"), "z", b"z")
    gone = store.discard("ws", "p")
    assert [(b.name, b.status) for b in gone] == [("p", "discarded"), ("c", "discarded")]
    with pytest.raises(NotFound) as ei:
        store.commit("ws", "c")
    assert "was discarded" in str(ei.value)
    with pytest.raises(NotFound):
        store.discard("ws", "p")
    with pytest.raises(NotFound):
        store.commit("ws", "never")
    b = store.create_branch("ws", "p")
    assert b.status == "active" and store.view("ws", "p").lookup(("z",)) is None
    assert sorted(os.listdir(base)) == ["a", "d", "empty"]


def test_discard_of_many_files_is_cheap(store: Store) -> None:
    store.create_branch("ws", "big")
    delta = Path(store.delta_dir("ws", "big"))
    for i in range(100):
        (delta / f"d{i}").mkdir()
        for j in range(100):
            (delta / f"d{i}" / f"f{j}").write_bytes(b"")
    store.discard("ws", "big")
    assert not delta.exists()  # moved to the trash at once
    store.close()
    assert os.listdir(Path(store.state_dir) / "trash") == []


def test_find_branch(store: Store, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    store.add_workspace(str(other))
    store.create_branch("ws", "one")
    store.create_branch("ws", "dup")
    store.create_branch("other", "dup")
    assert store.find_branch("one").workspace == "ws"
    with pytest.raises(Conflict):
        store.find_branch("dup")
    with pytest.raises(NotFound):
        store.find_branch("zzz")
    store.discard("ws", "one")
    with pytest.raises(NotFound) as ei:
        store.find_branch("one")
    assert "discarded" in str(ei.value)


def test_persistence(tmp_path: Path, store: Store) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", parent="p")
    w(store.view("ws", "c"), "f", b"kept")
    store.create_branch("ws", "gone")
    store.discard("ws", "gone")
    store.close()
    s2 = Store(tmp_path / "state")
    try:
        assert {(b.name, b.parent, b.status) for b in s2.branches(include_ended=True)} == {
            ("p", None, "active"), ("c", "p", "active"), ("gone", None, "discarded")}
        assert r(s2.view("ws", "c"), "f") == b"kept"
        assert s2.workspace("ws").base == str(tmp_path / "base")
        assert s2.recovered == []
    finally:
        s2.close()
    data = json.loads((tmp_path / "state" / "state.json").read_text())
    assert data["version"] == 1


def test_subscribe_events(store: Store) -> None:
    seen: list[tuple[str, str | None]] = []
    store.subscribe(lambda ev: seen.append((ev.kind, ev.branch.name if ev.branch else None)))
    store.create_branch("ws", "a1")
    store.create_branch("ws", "a2", on_sibling_commit="invalidate")
    store.create_branch("ws", "a3")
    store.commit("ws", "a1")
    assert seen == [("branch-created", "a1"), ("branch-created", "a2"),
                    ("branch-created", "a3"), ("committed", "a1"),
                    ("branch-ended", "a1"), ("branch-ended", "a2"), ("rebased", "a3")]


# -- the journal ---------------------------------------------------------------

def test_incomplete_journal_is_dropped(tmp_path: Path, store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    w(store.view("ws", "b1"), "a", b"new")
    store.close()
    (tmp_path / "state" / "journal" / "commit-x.json.tmp").write_text("{garbage")
    s2 = Store(tmp_path / "state")
    try:
        assert len(s2.recovered) == 1 and "dropped" in s2.recovered[0]
        assert (base / "a").read_text() == "hello\n"
        assert s2.branch("ws", "b1").status == "active"
    finally:
        s2.close()


# -- attacks ---------------------------------------------------------------------

def test_symlinks_never_lead_outside(tmp_path: Path, store: Store, base: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (base / "evil").symlink_to(outside)
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    with pytest.raises(OSError):
        v.lookup(("evil", "secret")) or v.need(("evil", "secret"))
    with pytest.raises(OSError):
        w(v, "evil/secret", b"pwned")
    with pytest.raises(OSError):
        v.open_read(("evil",))
    v.symlink(("up",), "../../../..")
    v.symlink(("etc",), "/etc")
    for path in (("etc", "passwd"), ("up", "etc", "passwd")):
        with pytest.raises(OSError):
            v.open_read(path)
    v.unlink(("evil",))
    v.mkdir(("evil",), 0o755)
    w(v, "evil/secret", b"in branch")
    store.diff("ws", "b1")
    store.commit("ws", "b1")
    assert (outside / "secret").read_text() == "secret"
    assert os.readlink(base / "etc") == "/etc" and os.readlink(base / "up") == "../../../.."
    assert (base / "evil" / "secret").read_text() == "in branch"


def test_base_swapped_for_symlink_after_lookup(tmp_path: Path, store: Store, base: Path) -> None:
    """A directory of the base replaced by a symlink under a running branch: the
    branch must not follow it (the walk is O_NOFOLLOW per component)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("outside")
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    assert v.lookup(("d", "f")) is not None
    (base / "d" / "f").unlink()
    (base / "d").rmdir()
    (base / "d").symlink_to(outside)
    assert v.lookup(("d", "f")) is None
    with pytest.raises(OSError):
        w(v, "d/f", b"x")
    assert (outside / "f").read_text() == "outside"


def test_commit_timing_is_reported(store: Store) -> None:
    store.create_branch("ws", "b1")
    t = time.monotonic()
    res = store.commit("ws", "b1")
    assert 0 <= res.seconds <= time.monotonic() - t + 0.001
    assert set(res.to_dict()) == {"branch", "workspace", "into", "changes", "invalidated",
                                  "seconds", "rebased", "conflicted"}


def test_commit_across_filesystems(tmp_path: Path, base: Path) -> None:
    """State dir on tmpfs, base on the disk: commit falls back to copy + rename."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(base).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    state = Path(tempfile.mkdtemp(prefix="branchfs-xfs-", dir=shm))
    try:
        s = Store(state)
        try:
            s.add_workspace(str(base), name="ws")
            s.create_branch("ws", "b1")
            v = s.view("ws", "b1")
            w(v, "a", b"across")
            v.unlink(("d", "f"))
            v.mkdir(("n",), 0o755)
            w(v, "n/x", b"x")
            v.link(("n", "x"), ("n", "y"))
            v.rename(("empty",), ("moved",))
            s.commit("ws", "b1")
        finally:
            s.close()
        assert tree(base) == {"a": ("file", 0o644, b"across"), "d": ("dir", 0o755),
                              "n": ("dir", 0o755), "n/x": ("file", 0o644, b"x"),
                              "n/y": ("file", 0o644, b"x"), "moved": ("dir", 0o755)}
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_resolve_path_never_enters_the_mountpoint(tmp_path: Path, store: Store,
                                                  base: Path) -> None:
    (tmp_path / "mnt").mkdir(exist_ok=True)
    (tmp_path / "to-mnt").symlink_to(tmp_path / "mnt" / "ws" / "b1")
    (tmp_path / "rel").symlink_to("base/d")
    assert store.resolve_path(str(tmp_path / "rel" / ".." / "d")) == str(base / "d")
    with pytest.raises(BadName):
        store.resolve_path(str(tmp_path / "to-mnt" / "x"))
    with pytest.raises(BadName):
        store.resolve_path(str(tmp_path / "mnt" / "ws"))
    with pytest.raises(NotFound):
        store.resolve_path(str(tmp_path / "nope"))


def test_commit_refused_when_the_target_is_too_small(tmp_path: Path) -> None:
    """A real small filesystem (tmpfs of 1 MiB) as the base, the state on the
    disk: a commit that cannot fit is refused before anything changes."""
    base = tmp_path / "small"
    base.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(base)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (base / "keep").write_text("old")
        s = Store(tmp_path / "state")
        try:
            s.add_workspace(str(base), name="ws")
            s.create_branch("ws", "big")
            v = s.view("ws", "big")
            w(v, "keep", b"new")
            w(v, "huge", b"x" * (2 << 20))
            with pytest.raises(branchfs.NoSpace) as ei:
                s.commit("ws", "big")
            assert ei.value.code == "no-space" and "\n" not in str(ei.value)
            assert sorted(os.listdir(base)) == ["keep"] and (base / "keep").read_text() == "old"
            assert s.branch("ws", "big").status == "active"
            assert os.listdir(tmp_path / "state" / "journal") == []
            v.unlink(("huge",))
            s.commit("ws", "big")
            assert (base / "keep").read_text() == "new"
        finally:
            s.close()
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)
