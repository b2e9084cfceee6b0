"""What a branch changed: its view compared with its parent's view.

Only the paths the branch's upper dir holds can differ, so the walk follows the
upper dir and looks each name up in both views; a new or opaque directory is
compared entry by entry. A copied-up file that ended up identical (same type,
mode, owner, content or link target) is not reported.
"""

from __future__ import annotations

import os
import stat

from . import backing
from .backing import is_whiteout, lstat_at
from .model import Change
from .view import Entry, Parts, View

_CMP_CHUNK = 1 << 20


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def diff(child: View, parent: View) -> list[Change]:
    out: list[Change] = []
    _walk_upper(child, parent, (), out)
    return out


def _walk_upper(child: View, parent: View, parts: Parts, out: list[Change]) -> None:
    fd = backing.open_dir(child.layers[0], parts)
    try:
        for name in sorted(os.listdir(fd)):
            st = lstat_at(fd, name)
            if st is None:
                continue
            rel = (*parts, name)
            pe = parent.lookup(rel)
            if is_whiteout(st):
                if pe is not None:
                    out.append(Change("deleted", "/".join(rel), kind_of(pe.st.st_mode)))
                continue
            ce = child.lookup(rel)
            if ce is None:
                continue
            if stat.S_ISDIR(st.st_mode) and pe is not None and pe.is_dir:
                if _meta_differs(ce.st, pe.st):
                    out.append(Change("modified", "/".join(rel), "dir"))
                if backing.is_opaque_at(fd, name):
                    _compare_dirs(child, parent, rel, out)
                else:
                    _walk_upper(child, parent, rel, out)
                continue
            _compare_entry(child, parent, rel, ce, pe, out)
    finally:
        os.close(fd)


def _compare_entry(child: View, parent: View, rel: Parts, ce: Entry, pe: Entry | None,
                   out: list[Change]) -> None:
    path = "/".join(rel)
    if pe is None:
        out.append(Change("added", path, kind_of(ce.st.st_mode)))
        if ce.is_dir:
            _compare_dirs(child, parent, rel, out)
        return
    if ce.is_dir != pe.is_dir:
        out.append(Change("modified", path, kind_of(ce.st.st_mode)))
        if ce.is_dir:
            _compare_dirs(child, parent, rel, out)
        return
    if ce.is_dir:
        if _meta_differs(ce.st, pe.st):
            out.append(Change("modified", path, "dir"))
        _compare_dirs(child, parent, rel, out)
    elif _entry_differs(child, parent, rel, ce, pe):
        out.append(Change("modified", path, kind_of(ce.st.st_mode)))


def _compare_dirs(child: View, parent: View, rel: Parts, out: list[Change]) -> None:
    ce = child.listdir(rel)
    try:
        pe = parent.listdir(rel)
    except (FileNotFoundError, NotADirectoryError):
        pe = {}
    for name in sorted(pe.keys() - ce.keys()):
        out.append(Change("deleted", "/".join((*rel, name)), kind_of(pe[name].st.st_mode)))
    for name in sorted(ce):
        _compare_entry(child, parent, (*rel, name), ce[name], pe.get(name), out)


def _meta_differs(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid)


def _entry_differs(child: View, parent: View, rel: Parts, ce: Entry, pe: Entry) -> bool:
    a, b = ce.st, pe.st
    if _meta_differs(a, b):
        return True
    if stat.S_ISLNK(a.st_mode):
        return child.readlink(rel) != parent.readlink(rel)
    if not stat.S_ISREG(a.st_mode):
        return a.st_rdev != b.st_rdev
    if a.st_size != b.st_size:
        return True
    fa = child.open_read(rel)
    try:
        fb = parent.open_read(rel)
        try:
            off = 0
            while True:
                x = os.pread(fa, _CMP_CHUNK, off)
                y = os.pread(fb, _CMP_CHUNK, off)
                if x != y:
                    return True
                if not x:
                    return False
                off += len(x)
        finally:
            os.close(fb)
    finally:
        os.close(fa)
