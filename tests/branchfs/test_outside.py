"""Unit tier: changes made to the parent outside a branch (the base directory
written directly, or the parent branch's own writes). Untouched paths show
them; commit refuses to overwrite them (OutsideChange) unless forced.

Outside writes here always change a file's size or replace it: a same-size
rewrite within one tick of the kernel's coarse file clock keeps (ino, size,
mtime, ctime) and cannot be seen (docs/format.md, caveats)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from bfs_helpers import r, tree, w
from hypothesis import given, settings
from hypothesis import strategies as st

from branchfs import Conflict, OutsideChange, Store, backing
from branchfs.origins import FILE
from branchfs.view import View


def refused(store: Store, name: str) -> OutsideChange:
    with pytest.raises(OutsideChange) as ei:
        store.commit("ws", name)
    assert isinstance(ei.value, Conflict) and ei.value.code == "conflict"
    assert "\n" not in str(ei.value)
    return ei.value


def test_outside_change_to_a_modified_file(store: Store, base: Path, tmp_path: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "a", b"branch a")
    w(v, "new", b"n")
    (base / "a").write_text("outside a, longer\n")
    before = tree(base)
    delta = tree(Path(store.delta_dir("ws", "b1")))
    exc = refused(store, "b1")
    assert str(exc) == ("base changed outside the branch: a; "
                        "commit with force to overwrite")
    assert exc.paths == ["a"]
    assert tree(base) == before  # nothing changed on refusal
    assert tree(Path(store.delta_dir("ws", "b1"))) == delta
    assert store.branch("ws", "b1").status == "active"
    assert os.listdir(Path(store.state_dir) / "journal") == []
    assert r(v, "a") == b"branch a"
    res = store.commit("ws", "b1", force=True)
    assert res.changes == 2
    assert (base / "a").read_bytes() == b"branch a" and (base / "new").read_bytes() == b"n"


def test_outside_deletion_of_a_modified_file(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    w(store.view("ws", "b1"), "d/f", b"branch f")
    (base / "d" / "f").unlink()
    assert refused(store, "b1").paths == ["d/f"]
    assert not (base / "d" / "f").exists()


def test_outside_creation_of_a_name_the_branch_created(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "x", b"branch x")
    v.mkdir(("nd",), 0o755)
    w(v, "nd/y", b"branch y")
    w(v, "nd/z", b"branch z")
    (base / "x").write_text("outside x")
    (base / "nd").mkdir()
    (base / "nd" / "y").write_text("outside y")
    (base / "nd" / "other").write_text("outside other")
    exc = refused(store, "b1")
    assert exc.paths == ["nd/y", "x"]
    assert str(exc).startswith("base changed outside the branch: nd/y (and 1 more); ")
    (base / "x").unlink()
    (base / "nd" / "y").unlink()
    store.commit("ws", "b1")  # a directory made on both sides merges
    assert sorted(os.listdir(base / "nd")) == ["other", "y", "z"]


def test_outside_change_to_an_untouched_path_shows_and_stays(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "a", b"branch a")
    (base / "d" / "f").write_text("outside f, longer")
    (base / "outside-new").write_text("o")
    (base / "empty").rmdir()
    assert r(v, "d/f") == b"outside f, longer"
    assert r(v, "outside-new") == b"o"
    assert v.lookup(("empty",)) is None
    store.commit("ws", "b1")
    assert (base / "d" / "f").read_text() == "outside f, longer"
    assert (base / "outside-new").read_text() == "o"
    assert (base / "a").read_bytes() == b"branch a" and not (base / "empty").exists()


def test_deleted_in_branch_then_changed_outside(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    store.view("ws", "b1").unlink(("a",))
    (base / "a").write_text("outside a, longer\n")
    assert refused(store, "b1").paths == ["a"]
    assert (base / "a").read_text() == "outside a, longer\n"
    store.commit("ws", "b1", force=True)
    assert not (base / "a").exists()


def test_deleted_on_both_sides_is_no_conflict(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.unlink(("a",))
    w(v, "d/f", b"f")
    v.unlink(("d", "f"))
    (base / "a").unlink()
    (base / "d" / "f").unlink()
    store.commit("ws", "b1")
    assert sorted(os.listdir(base)) == ["d", "empty"]


def test_replaced_outside_by_atomic_rename(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    w(store.view("ws", "b1"), "a", b"branch")
    (base / "a.tmp").write_text("hello\n")  # same content and size, a new inode
    os.rename(base / "a.tmp", base / "a")
    assert refused(store, "b1").paths == ["a"]


def test_deleted_directory_against_outside_changes(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.unlink(("d", "f"))
    v.rmdir(("d",))
    (base / "d" / "late").write_text("made outside after the branch deleted d")
    assert refused(store, "b1").paths == ["d/late"]
    (base / "d" / "late").unlink()
    (base / "d" / "f").write_text("changed outside, longer")
    assert refused(store, "b1").paths == ["d/f"]
    store.commit("ws", "b1", force=True)
    assert not (base / "d").exists()


def test_renamed_directory_against_outside_change(store: Store, base: Path) -> None:
    (base / "d" / "sub").mkdir()
    (base / "d" / "sub" / "g").write_text("g")
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.rename(("d",), ("e",))
    (base / "d" / "sub" / "g").write_text("g changed outside")
    assert refused(store, "b1").paths == ["d/sub/g"]
    (base / "d" / "sub" / "g").unlink()
    (base / "d" / "sub" / "g").write_text("g")  # same content, not the same file
    assert refused(store, "b1").paths == ["d/sub/g"]
    store.commit("ws", "b1", force=True)
    assert tree(base / "e") == {"f": ("file", 0o644, b"in d\n"), "sub": ("dir", 0o755),
                                "sub/g": ("file", 0o644, b"g")}


def test_replaced_directory_would_bring_back_a_file_deleted_outside(store: Store,
                                                                   base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "d/f", b"branch f")
    v.rename(("d",), ("x",))
    v.rename(("x",), ("d",))  # d is now the branch's own (opaque) directory
    (base / "d" / "f").unlink()
    assert refused(store, "b1").paths == ["d/f"]
    v.unlink(("d", "f"))
    store.commit("ws", "b1")  # deleted on both sides
    assert os.listdir(base / "d") == []


def test_recreated_directory_replaces_only_what_it_saw(store: Store, base: Path) -> None:
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    v.unlink(("d", "f"))
    v.rmdir(("d",))
    v.mkdir(("d",), 0o755)
    w(v, "d/g", b"g")
    (base / "d" / "h").write_text("outside")
    assert refused(store, "b1").paths == ["d/h"]
    (base / "d" / "h").unlink()
    store.commit("ws", "b1")
    assert os.listdir(base / "d") == ["g"]


def test_name_shown_again_after_both_deleted_it(store: Store, base: Path) -> None:
    """A branch that hid `a`, then saw it deleted below and deleted it too, no
    longer hides it: making `a` again checks against nothing, not the old `a`."""
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "a", b"branch a")
    (base / "a").unlink()
    v.unlink(("a",))
    w(v, "a", b"again")
    store.commit("ws", "b1")
    assert (base / "a").read_bytes() == b"again"


def test_records_survive_a_restart(tmp_path: Path, base: Path) -> None:
    s = Store(tmp_path / "state")
    s.add_workspace(str(base), name="ws")
    b = s.create_branch("ws", "b1")
    w(s.view("ws", "b1"), "a", b"branch a")
    w(s.view("ws", "b1"), "d/f", b"branch f")
    s.close()
    log_path = tmp_path / "state" / "branches" / b.id / FILE
    with open(log_path, "ab") as f:
        f.write(b'["d/f",2,')  # a record torn by a crash
    (base / "a").write_text("outside a, longer\n")
    s = Store(tmp_path / "state")
    try:
        assert refused(s, "b1").paths == ["a"]
        assert log_path.read_bytes().endswith(b"\n")
        s.commit("ws", "b1", force=True)
    finally:
        s.close()


def test_branch_without_records_commits_unchecked(tmp_path: Path, base: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    s = Store(tmp_path / "state")
    s.add_workspace(str(base), name="ws")
    b = s.create_branch("ws", "old")
    s.close()
    os.unlink(tmp_path / "state" / "branches" / b.id / FILE)  # made by an older version
    s = Store(tmp_path / "state")
    try:
        w(s.view("ws", "old"), "a", b"branch a")
        (base / "a").write_text("outside a, longer\n")
        s.commit("ws", "old")
        assert (base / "a").read_bytes() == b"branch a"
        assert "predates origin records" in caplog.text
    finally:
        s.close()


# -- nested branches: the parent's own writes are outside the child -------------

def test_nested_child_against_parent_writes(store: Store, base: Path) -> None:
    store.create_branch("ws", "p")
    pv = store.view("ws", "p")
    w(pv, "a", b"p before the fork")
    store.create_branch("ws", "c", parent="p")
    cv = store.view("ws", "c")
    w(cv, "a", b"child a")
    w(cv, "d/f", b"child f")
    w(pv, "a", b"p after the fork, longer")
    w(pv, "d/other", b"p untouched by the child")
    exc = refused(store, "c")
    assert str(exc) == ("parent branch p changed outside the branch: a; "
                        "commit with force to overwrite")
    assert r(pv, "a") == b"p after the fork, longer"
    store.commit("ws", "c", force=True)
    assert r(pv, "a") == b"child a" and r(pv, "d/f") == b"child f"
    assert r(pv, "d/other") == b"p untouched by the child"


def test_nested_base_change_seen_through_the_parent(store: Store, base: Path) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", parent="p")
    w(store.view("ws", "c"), "a", b"child a")
    (base / "a").write_text("outside a, longer\n")
    assert refused(store, "c").paths == ["a"]


def test_parent_takes_over_the_childs_records(store: Store, base: Path) -> None:
    """After a child's commit the parent hides what the child hid; the
    parent's own commit then checks those paths against the same records."""
    (base / "keep").write_text("k")
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", parent="p")
    cv = store.view("ws", "c")
    w(cv, "a", b"child a")
    cv.unlink(("d", "f"))
    cv.rmdir(("d",))
    cv.mkdir(("d",), 0o755)
    w(cv, "d/g", b"g")
    store.commit("ws", "c")
    (base / "d" / "f").write_text("changed outside, longer")
    (base / "a").write_text("outside a, longer\n")
    assert refused(store, "p").paths == ["a", "d/f"]
    (base / "a").unlink()
    os.rename(base / "keep", base / "a")  # a different file again
    (base / "d" / "f").unlink()
    assert refused(store, "p").paths == ["a"]


def test_parent_commit_after_child_commit_without_outside_change(store: Store,
                                                                 base: Path) -> None:
    store.create_branch("ws", "p")
    w(store.view("ws", "p"), "a", b"p a")
    store.create_branch("ws", "c", parent="p")
    cv = store.view("ws", "c")
    w(cv, "a", b"child a")
    w(cv, "d/f", b"child f")
    cv.rename(("empty",), ("moved",))
    store.commit("ws", "c")
    store.commit("ws", "p")
    assert (base / "a").read_bytes() == b"child a"
    assert (base / "d" / "f").read_bytes() == b"child f"
    assert (base / "moved").is_dir() and not (base / "empty").exists()


def test_parent_that_stopped_hiding_a_path_adopts_the_childs_record(store: Store,
                                                                    base: Path) -> None:
    store.create_branch("ws", "p")
    pv = store.view("ws", "p")
    w(pv, "a", b"p a")
    (base / "a").unlink()
    pv.unlink(("a",))  # nothing below any more: p no longer hides `a`
    (base / "a").write_text("made outside again")
    store.create_branch("ws", "c", parent="p")
    w(store.view("ws", "c"), "a", b"child a")
    store.commit("ws", "c")
    store.commit("ws", "p")  # checked against what the child saw, not p's old `a`
    assert (base / "a").read_bytes() == b"child a"


def test_name_made_again_where_the_parent_hides_nothing(store: Store, base: Path) -> None:
    store.create_branch("ws", "p")
    store.create_branch("ws", "c", parent="p")
    store.view("ws", "c").unlink(("a",))
    (base / "a").unlink()
    store.commit("ws", "c")  # deleted on both sides: p is left hiding nothing at `a`
    w(store.view("ws", "p"), "a", b"p a")
    store.commit("ws", "p")
    assert (base / "a").read_bytes() == b"p a"


def test_safe_save_by_rename(store: Store, base: Path) -> None:
    """Editors and pip replace a file by renaming a new one over it: the branch
    hides the old `a` from the moment of the rename."""
    for name in ("b1", "b2"):
        store.create_branch("ws", name)
        v = store.view("ws", name)
        w(v, "a.tmp", name.encode())
        v.rename(("a.tmp",), ("a",))
        if name == "b1":
            store.commit("ws", name)
            assert (base / "a").read_bytes() == b"b1"
    (base / "a").write_text("outside, longer")
    assert refused(store, "b2").paths == ["a"]


def test_directory_renames_without_outside_change(store: Store, base: Path) -> None:
    (base / "d" / "sub").mkdir()
    (base / "d" / "sub" / "g").write_text("g")
    (base / "x").mkdir()
    (base / "x" / "y").write_text("y")
    store.create_branch("ws", "b1")
    v = store.view("ws", "b1")
    w(v, "d/f", b"f in the branch")  # an upper entry the directory copy moves
    v.rename(("d",), ("e",))
    v.rename(("e",), ("x",), 2)  # RENAME_EXCHANGE
    store.commit("ws", "b1")
    assert tree(base / "x") == {"f": ("file", 0o644, b"f in the branch"),
                                "sub": ("dir", 0o755), "sub/g": ("file", 0o644, b"g")}
    assert tree(base / "e") == {"y": ("file", 0o644, b"y")}
    assert not (base / "d").exists()


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_outside_changes_through_a_mount(mount: Any, base: Path) -> None:
    b1 = mount.path("b1")
    (b1 / "a").write_text("branch a")
    (base / "d" / "f").write_text("outside f, not read in the branch before")
    assert (b1 / "d" / "f").read_text() == "outside f, not read in the branch before"
    (base / "a").write_text("outside a, longer\n")
    with pytest.raises(RuntimeError) as ei:
        mount.cmd("commit", name="b1")
    assert str(ei.value) == ("conflict: base changed outside the branch: a; "
                             "commit with force to overwrite")
    assert (b1 / "a").read_text() == "branch a"
    assert (base / "a").read_text() == "outside a, longer\n"
    mount.cmd("commit", name="b1", force=True)
    assert (base / "a").read_text() == "branch a"
    assert (base / "d" / "f").read_text() == "outside f, not read in the branch before"


# -- random: a commit is refused exactly when it would lose the outside change --

PATHS = st.sampled_from(["a", "b", "d/f", "d/g", "d/e", "d/e/h", "empty/i", "d", "empty"])
OP = st.sampled_from(["write", "append", "unlink", "rmdir", "mkdir", "rename", "link", "chmod",
                      "symlink", "exchange", "rename-onto"])
OPS = st.lists(st.tuples(OP, PATHS, PATHS), max_size=12)
CHANGES = st.sampled_from([("modify", "a"), ("modify", "d/f"), ("modify", "d/g"),
                           ("delete", "a"), ("delete", "d/f"), ("delete", "d/g"),
                           ("create", "b"), ("create", "d/g"), ("create", "empty/i")])
OUTSIDE = b"changed outside the branch, 40 bytes...."  # no branch op writes this


def _apply(v: View, op: str, p: str, q: str) -> None:
    pp, qq = tuple(p.split("/")), tuple(q.split("/"))
    if op in ("rename", "exchange", "rename-onto") and (p.startswith(q + "/")
                                                     or q.startswith(p + "/")):
        return  # the kernel refuses a rename into its own subtree before FUSE sees it
    try:
        if op in ("write", "append"):
            w(v, p, p.encode() * 2, os.O_WRONLY | (os.O_APPEND if op == "append" else os.O_TRUNC))
        elif op == "unlink":
            v.unlink(pp)
        elif op == "rmdir":
            v.rmdir(pp)
        elif op == "mkdir":
            v.mkdir(pp, 0o755)
        elif op in ("rename", "exchange"):
            v.rename(pp, qq, backing.RENAME_EXCHANGE if op == "exchange" else 0)
        elif op == "rename-onto":
            v.rename(qq, pp)
        elif op == "link":
            v.link(pp, qq)
        elif op == "chmod":
            v.chmod(pp, 0o600)
        else:
            v.symlink(pp, q)
    except OSError:
        pass  # what POSIX refuses, the branch refuses too: nothing to check here


def _shown(v: View, p: str) -> bytes | None:
    e = v.lookup(tuple(p.split("/")))
    if e is None or not stat.S_ISREG(e.st.st_mode):
        return None if e is None else b"<not a file>"
    return r(v, p)


def _outside(v: View, kind: str, p: str) -> bool:
    """Change *p* in the parent's view *v* (the base, or a parent branch); False
    if this kind of change does not apply there."""
    parts = tuple(p.split("/"))
    e = v.lookup(parts)
    if kind == "delete":
        if e is None or e.is_dir:
            return False
        v.unlink(parts)
    elif kind == "modify":
        if e is None or not stat.S_ISREG(e.st.st_mode):
            return False
        w(v, p, OUTSIDE)
    else:
        pe = v.lookup(parts[:-1]) if len(parts) > 1 else v.lookup(())
        if e is not None or pe is None or not pe.is_dir:
            return False
        w(v, p, OUTSIDE)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("where", ["base", "parent"])
@settings(max_examples=150, deadline=None, database=None)
@given(change=CHANGES, first=st.tuples(OP, PATHS), ops=OPS)
def test_refused_exactly_when_the_outside_change_would_be_lost(
        where: str, change: tuple[str, str], first: tuple[str, str],
        ops: list[tuple[str, str, str]]) -> None:
    """Random branch operations, the first one on the path changed outside."""
    kind, target = change
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        base = Path(tmp) / "base"
        (base / "d").mkdir(parents=True)
        (base / "empty").mkdir()
        (base / "a").write_text("hello\n")
        (base / "d" / "f").write_text("in d\n")
        s = Store(Path(tmp) / "state")
        try:
            s.add_workspace(str(base), name="ws")
            parent = None
            if where == "parent":
                parent = "p"
                s.create_branch("ws", "p")
                w(s.view("ws", "p"), "d/g", b"written in p before the fork")
            s.create_branch("ws", "c", parent=parent)
            v = s.view("ws", "c")
            for op in [(first[0], target, first[1]), *ops]:
                _apply(v, *op)
            if not _outside(s.view("ws", parent), kind, target):
                return
            shown = _shown(v, target)
            lost = shown != (None if kind == "delete" else OUTSIDE)
            if lost:
                assert refused(s, "c").paths == [target]
                s.commit("ws", "c", force=True)
            else:  # the commit keeps the outside change: the parent shows what c showed
                shown_in_c = {p: _shown(v, p) for p in ("a", "b", "d/f", "d/g", "d/e/h", "empty/i")}
                s.commit("ws", "c")
                after = s.view("ws", parent)
                assert {p: _shown(after, p) for p in shown_in_c} == shown_in_c
        finally:
            s.close()
