"""What a branch's changes hide, and commit's check that it is still there.

When a branch first hides a path of its parent (copy-up, whiteout, a rename
onto it), the identity of the entry the layers below showed there is recorded:
``(layer, type, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``. A path
with no record hid nothing ("absent"). At commit, every path the plan
replaces or deletes is compared with its record; a difference means the
parent changed there since the branch looked (a change made to the base
directly, or by the parent branch itself), and the commit would overwrite it.

A kernel overlay serving the branch (``branchfs.overlay``) copies up without
telling us, so a path may be hidden without a record. The log's first line
therefore holds a *stamp*, a ctime the kernel gave out as the branch was made:
at commit, an unrecorded path whose target entry has a ctime at or after the
stamp changed after the branch began (ctime cannot be set by users; rename,
link, chmod and writes all move it) and counts as an outside change. An
unrecorded entry older than the stamp is what the branch saw.

The records live in ``branches/<id>/origins``, an append-only log of JSON
values, one a line: ``{"stamp": ctime_ns}`` first, then ``[path, layer, type,
dev, ino, size, mtime_ns, ctime_ns]`` sets a record, ``[path]`` drops the
records of *path* and of everything below it. A torn last line (a crash in
the middle of an append) is ignored. The log is not fsynced per line, like the upper dir next to it;
commit's ``syncfs`` of the branch's filesystem makes both durable.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from . import backing
from .durable import read_log
from .view import Entry, View

log = logging.getLogger(__name__)

FILE = "origins"

Record = tuple[int, int, int, int, int, int, int]  # layer, type, dev, ino, size, mtime, ctime


def record(layer: int, st: os.stat_result) -> Record:
    return (layer, stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


def same(rec: Record | None, st: os.stat_result | None) -> bool:
    """Whether *st* is still the entry *rec* recorded (None: nothing there).
    A directory only has to be a directory still: its times change with every
    entry made in it and a parent branch's copy-up gives it another inode;
    what matters is its entries, which are compared one by one."""
    if rec is None or st is None:
        return rec is None and st is None
    if rec[1] != stat.S_IFMT(st.st_mode):
        return False
    return stat.S_ISDIR(st.st_mode) or rec[2:] == (st.st_dev, st.st_ino, st.st_size,
                                                    st.st_mtime_ns, st.st_ctime_ns)


class _Node:
    __slots__ = ("kids", "rec")

    def __init__(self) -> None:
        self.rec: Record | None = None
        self.kids: dict[str, _Node] = {}


class Origins:
    """The records of one branch, in memory (a tree of path components) and in
    its log.

    Invariant: every path the branch's upper dir hides (an entry or a
    whiteout there or at an ancestor, or an opaque ancestor) where a lower
    layer showed an entry when the hiding began has a record of that entry;
    a path hidden again is recorded again, so a record left behind for a path
    no longer hidden does not stand for it. ``tracked`` is False for a branch made before
    records were kept (no log file): nothing is recorded or checked for it.
    ``stamp`` (None in logs older than it) is a kernel ctime no earlier than
    any change the branch could have seen when it was made.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._root = _Node()
        self._fd: int | None = None
        self.stamp: int | None = None
        self.tracked = os.path.exists(path)
        if not self.tracked:
            return
        items, torn = read_log(path)
        for item in items:
            if isinstance(item, dict):
                self.stamp = item["stamp"]
                continue
            parts = item[0].split("/")
            if len(item) == 1:
                self._drop(parts)
            else:
                self._set(parts, tuple(item[1:]))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if torn:
            log.warning("%s: ignored a torn last record", path)
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - len(torn))

    @staticmethod
    def create(path: str) -> None:
        """Start the log of a new branch with its stamp."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Asking for the ctime makes the next one fine-grained (Linux 6.13+
            # multigrain timestamps) and moves the kernel's floor past it: every
            # change made later, to any file, gets a ctime at least this one.
            os.fstat(fd)
            os.utime(fd)
            stamp = os.fstat(fd).st_ctime_ns
            os.write(fd, b'{"stamp":%d}\n' % stamp)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the tree (paths as tuples of names, as views hold them) ---------------

    def _find(self, parts: Sequence[str]) -> _Node | None:
        node: _Node | None = self._root
        for name in parts:
            assert node is not None
            node = node.kids.get(name)
            if node is None:
                return None
        return node

    def _set(self, parts: Sequence[str], rec: Record) -> bool:
        """Set the record of *parts*; False if it was that already."""
        node = self._root
        for name in parts:
            kid = node.kids.get(name)
            if kid is None:
                kid = node.kids[name] = _Node()
            node = kid
        if node.rec == rec:
            return False
        node.rec = rec
        return True

    def _drop(self, parts: Sequence[str]) -> bool:
        pnode = self._find(parts[:-1])
        return pnode is not None and pnode.kids.pop(parts[-1], None) is not None

    def _append(self, parts: Sequence[str], rec: Sequence[int] = ()) -> None:
        assert self._fd is not None
        # by hand: json.dumps of the whole list costs 4 times as much, per copy-up
        line = "[" + ",".join([json.dumps("/".join(parts)), *map(str, rec)]) + "]\n"
        os.write(self._fd, line.encode())

    # -- what views and commit call ----------------------------------------

    def get(self, parts: Sequence[str]) -> Record | None:
        node = self._find(parts)
        return node.rec if node is not None else None

    def recorded_in(self, parts: Sequence[str]) -> set[str]:
        """The names directly in directory *parts* that have a record."""
        node = self._find(parts)
        return set() if node is None else {n for n, k in node.kids.items() if k.rec is not None}

    def note(self, parts: Sequence[str], e: Entry | None) -> None:
        """*parts* was not hidden and is about to be; the layers below show *e*
        there (None: nothing, which also drops stale records below it)."""
        if not self.tracked:
            return
        if e is None:
            self.forget(parts)
            return
        rec = record(e.layer, e.st)
        if self._set(parts, rec):
            self._append(parts, rec)

    def forget(self, parts: Sequence[str]) -> None:
        """*parts* is no longer hidden (nothing below it either): drop its records."""
        if self.tracked and self._drop(parts):
            self._append(parts)

    def for_parent(self) -> list[list[Any]]:
        """The records to give the parent branch when this one commits into it:
        those of entries below the parent's upper dir (the parent's own entries,
        layer 1, it has recorded itself), with layers counted from the parent."""
        out: list[list[Any]] = []
        for path, rec in self._walk(self._root, ""):
            if rec[0] >= 2:
                out.append([path, rec[0] - 1, *rec[1:]])
        return out

    def adopt(self, items: Iterable[Sequence[Any]]) -> None:
        """Take a committed child's records for paths this branch has none for
        (where it has one, it hid the path first). Idempotent: a journal replay
        adopts again."""
        if not self.tracked:
            return
        for path, *rec in items:
            parts = path.split("/")
            node = self._find(parts)
            if node is None or node.rec is None:
                self._set(parts, tuple(rec))  # type: ignore[arg-type]
                self._append(parts, rec)

    def _walk(self, node: _Node, prefix: str) -> Iterator[tuple[str, Record]]:
        for name, kid in node.kids.items():
            path = f"{prefix}/{name}" if prefix else name
            if kid.rec is not None:
                yield path, kid.rec
            yield from self._walk(kid, path)


class Check:
    """Commit's comparison of the target (the parent's view) with the records,
    fed by the planner with the target entry it already looked up for each
    path: no extra lookup per changed file. ``conflicts`` lists the paths
    changed outside the branch, in plan order."""

    def __init__(self, origins: Origins, target: View, source: int) -> None:
        self.origins = origins
        self.target = target
        self.source = source  # the branch's upper dir
        self.conflicts: list[str] = []

    def replaced(self, parts: Sequence[str], te: Entry | None) -> None:
        """The plan puts the branch's entry at *parts* over *te*."""
        self._compare(tuple(parts), te.st if te is not None else None, moving=True)

    def removed(self, parts: Sequence[str], te: Entry | None) -> None:
        """The plan deletes *parts*; gone from the target as well is no conflict."""
        if te is not None:
            self._compare(tuple(parts), te.st, moving=False)

    def _compare(self, parts: tuple[str, ...], st: os.stat_result | None, moving: bool) -> None:
        rec = self.origins.get(parts)
        stamp = self.origins.stamp
        if rec is None and st is not None and stamp is not None:
            # unrecorded (a kernel copy-up): as it was, unless changed since the branch began
            unchanged = st.st_ctime_ns < stamp
        else:
            unchanged = same(rec, st)
        if not unchanged:
            self.conflicts.append("/".join(parts))
            return
        if st is None or not stat.S_ISDIR(st.st_mode):
            return
        # the whole directory goes: everything in it must be as recorded
        entries = self.target.listdir(parts)
        for name, e in sorted(entries.items()):
            self._compare((*parts, name), e.st, moving)
        if moving:
            # deleted outside, yet in the branch's tree that replaces the directory
            for name in sorted(self.origins.recorded_in(parts) - entries.keys()):
                if self._in_source((*parts, name)):
                    self.conflicts.append("/".join((*parts, name)))

    def _in_source(self, parts: tuple[str, ...]) -> bool:
        try:
            fd = backing.open_dir(self.source, parts[:-1])
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            st = backing.lstat_at(fd, parts[-1])
            return st is not None and not backing.is_whiteout(st)
        finally:
            os.close(fd)
