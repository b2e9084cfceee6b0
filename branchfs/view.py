"""One branch's merged view of its layers, and every change made through it.

A view is a stack of directory trees, top first: the branch's own upper dir
(the only one ever written), its ancestors' upper dirs, and last the
workspace's base directory. A name resolves to the topmost layer holding it;
a whiteout hides it in every layer below; a directory merges the directories
of the same name below it until one of them is opaque or a layer holds a
non-directory there (overlayfs's lookup rules). Changes copy the entry up
into the upper dir first. Paths are tuples of names ("parts"); every error is
an OSError carrying the errno a POSIX filesystem would give.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import backing
from .backing import DIR_FLAGS, at, is_whiteout, lstat_at

if TYPE_CHECKING:
    from .origins import Origins

Parts = tuple[str, ...]

# Merged directories a view keeps open (each holds one fd per layer showing it).
MAX_CACHED_DIRS = 256
# The longest a cached merge is used: for changes inotify does not report
# (a network filesystem changed from another machine), as long as the FUSE
# mount's own entry timeout.
CACHE_SECONDS = 10.0

log = logging.getLogger(__name__)


def _err(code: int, parts: Sequence[str] = ()) -> OSError:
    return OSError(code, os.strerror(code), "/".join(parts))


@dataclass(frozen=True)
class Entry:
    """Where a name resolved: the layer index (0 = upper) and its lstat."""

    layer: int
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


class _Dirs:
    """The merged directory at some path: (layer index, open dir fd), top first.

    A cached one has the inotify watches of its directories in ``wds`` (None:
    not cached), when it was read in ``born``, and the names of the cached
    merges directly below it in ``kids``; ``users`` counts the ``View.dirs()``
    blocks holding it: its fds are closed once it is neither cached nor held."""

    __slots__ = ("fds", "wds", "born", "kids", "users")

    def __init__(self, fds: list[tuple[int, int]]) -> None:
        self.fds = fds
        self.wds: list[int] | None = None
        self.born = 0.0
        self.kids: set[str] = set()
        self.users = 0

    def release(self) -> None:
        if self.users == 0 and self.wds is None:
            self.close()

    def close(self) -> None:
        for _, fd in self.fds:
            os.close(fd)
        self.fds = []

    def fd(self, layer: int) -> int:
        for i, fd in self.fds:
            if i == layer:
                return fd
        raise KeyError(layer)

    def find(self, name: str) -> Entry | None:
        for i, fd in self.fds:
            st = lstat_at(fd, name)
            if st is None:
                continue
            if is_whiteout(st):
                return None
            return Entry(i, st)
        return None

    def lower_has(self, name: str) -> bool:
        """Whether a layer below the upper shows *name* (deleting it needs a whiteout)."""
        for i, fd in self.fds:
            if i == 0:
                continue
            st = lstat_at(fd, name)
            if st is None:
                continue
            return not is_whiteout(st)
        return False


class _Watch:
    """The process's inotify instance, and the views whose cached merges hold
    each watched directory (weakly: a view dropped unclosed stops counting)."""

    def __init__(self) -> None:
        self.inotify = backing.Inotify()
        self.views: dict[int, weakref.WeakSet[View]] = {}

    def add(self, view: View, fd: int) -> int:
        wd = self.inotify.add(fd)
        self.views.setdefault(wd, weakref.WeakSet()).add(view)
        return wd

    def release(self, view: View, wd: int) -> None:
        views = self.views.get(wd)
        if views is None:
            return
        views.discard(view)
        if not views:
            del self.views[wd]
            self.inotify.remove(wd)

    def drain(self) -> None:
        """Make every view forget the merges that changes queued so far touch."""
        for wd, mask, name in self.inotify.read():
            if mask & backing.IN_Q_OVERFLOW:  # events were lost: forget everything
                for views in list(self.views.values()):
                    for v in list(views):
                        v.close()
                continue
            for v in list(self.views.get(wd, ())):
                v._changed_in(wd, mask, name)
            if mask & backing.IN_IGNORED:  # the kernel dropped the watch
                self.views.pop(wd, None)


_watch: _Watch | None = None
_no_watch = False


def _watcher() -> _Watch | None:
    """The process's _Watch, made on first use; None where inotify cannot be had
    (then nothing is cached)."""
    global _watch, _no_watch
    if _watch is None and not _no_watch:
        try:
            _watch = _Watch()
        except OSError as exc:
            _no_watch = True
            log.warning("no inotify (%s): merged directories are not cached", exc)
    return _watch


class View:
    """A branch's merged view over ``layers`` (root dir fds, top first).

    Invariants: only ``layers[0]`` (the upper dir) is written, and only when
    the view is writable; the fds belong to the caller (the Store) and stay
    open while the view is used; nothing here follows a symlink found in a
    layer; before the upper dir starts hiding a path, ``origins`` (if any)
    is told what the layers below show there (``_hide``).

    Resolution is cached: ``_cache`` keeps the merged directories (their
    layers' dir fds) by path, and a parent's merge whenever a child's. Every
    directory of a cached merge is watched with inotify before what it decides
    is read, and the queued events are applied before every resolution, so a
    change made anywhere (this view, the base edited outside, a parent branch
    written, a commit, a kernel overlay writing the upper dir) makes the merges
    it touches be read again at the next request. A merge is also read again
    after CACHE_SECONDS, for changes inotify does not see. The view's own
    changes forget what they change at once (``_changed``).
    """

    def __init__(self, layers: Sequence[int], work: int | None = None,
                 origins: Origins | None = None, *, watched: bool = True) -> None:
        self.layers = list(layers)
        # False: caches nothing and never touches the process's inotify watcher,
        # which is the one thread's that uses the cached views (a worker's own view)
        self.watched = watched
        self.work = work  # fd of the branch's work dir: temp copies, same fs as upper
        self.origins = origins
        # parts -> merged dir, least recently used first; see the class docstring
        self._cache: OrderedDict[Parts, _Dirs] = OrderedDict()
        self._wds: dict[int, set[Parts]] = {}  # watch -> the cached merges holding its dir

    def _hide(self, parts: Sequence[str], e: Entry | None) -> None:
        """*parts* showed the layers below (*e*, or nothing) and the upper dir
        is about to hide it: commit checks later that it is still so."""
        if self.origins is not None:
            self.origins.note(parts, e)

    def _unhide(self, parts: Sequence[str]) -> None:
        """The upper dir stops hiding *parts* and nothing is below it."""
        if self.origins is not None:
            self.origins.forget(parts)

    # -- resolution -------------------------------------------------------

    @contextmanager
    def dirs(self, parts: Sequence[str]) -> Iterator[_Dirs]:
        """The merged directory *parts* (ENOENT/ENOTDIR if there is none), for
        the duration of the ``with``; the caller must not close it."""
        d = self._resolve(tuple(parts))
        d.users += 1
        try:
            yield d
        finally:
            d.users -= 1
            d.release()

    def _resolve(self, parts: Parts) -> _Dirs:
        """The merge at *parts*, cached when it can be (see the class docstring)."""
        watch = _watcher() if self.watched else None
        if watch is not None:
            watch.drain()
        return self._merge(parts, watch)

    def _merge(self, parts: Parts, watch: _Watch | None) -> _Dirs:
        d = self._cache.get(parts)
        if d is not None:
            if time.monotonic() - d.born < CACHE_SECONDS:
                for k in range(len(parts) + 1):  # the least recently used has no cached kid
                    self._cache.move_to_end(parts[:k])
                return d
            self._forget(parts)
        if not parts:
            d = _Dirs([(i, os.dup(fd)) for i, fd in enumerate(self.layers)])
            cache = watch is not None
            wds = self._watch_all(watch, d) if cache else None
        else:
            parent = self._merge(parts[:-1], watch)
            cache = parent.wds is not None
            try:
                d, wds = self._merge_child(parent, parts, watch if cache else None)
            finally:
                parent.release()
        if wds is None:  # not cached (nor watched), or a watch could not be added
            return d
        d.wds = wds
        d.born = time.monotonic()
        self._cache[parts] = d
        for wd in wds:
            self._wds.setdefault(wd, set()).add(parts)
        if parts:
            self._cache[parts[:-1]].kids.add(parts[-1])
        if len(self._cache) > MAX_CACHED_DIRS:
            self._forget(next(iter(self._cache)))
        return d

    def _watch_all(self, watch: _Watch | None, d: _Dirs) -> list[int] | None:
        wds: list[int] = []
        for _, fd in d.fds:
            if self._watch_one(watch, fd, wds) is None:
                return None
        return wds

    def _watch_one(self, watch: _Watch | None, fd: int, wds: list[int]) -> list[int] | None:
        """Add a watch of *fd* to *wds*; None (all of *wds* released) if it cannot
        be had, as when the user's inotify watches are used up."""
        if watch is None:
            return None
        try:
            wds.append(watch.add(self, fd))
        except OSError as exc:
            log.debug("directory not cached, no inotify watch: %s", exc)
            for wd in wds:
                self._release_wd(watch, wd, None)
            wds.clear()
            return None
        return wds

    def _release_wd(self, watch: _Watch, wd: int, parts: Parts | None) -> None:
        held = self._wds.get(wd)
        if held is not None and parts is not None:
            held.discard(parts)
        if not held:
            self._wds.pop(wd, None)
            watch.release(self, wd)

    def _changed_in(self, wd: int, mask: int, name: str) -> None:
        """inotify says the directory watched as *wd* changed: its entry *name*,
        or (no name) the directory itself."""
        for parts in list(self._wds.get(wd, ())):
            if name and not mask & (backing.IN_DELETE_SELF | backing.IN_MOVE_SELF):
                self._forget((*parts, name))
            else:
                self._forget(parts)

    def _forget(self, parts: Parts) -> None:
        """Drop the cached merge at *parts* and every one below it."""
        d = self._cache.pop(parts, None)
        if d is None:
            return
        for kid in list(d.kids):
            self._forget((*parts, kid))
        wds, d.wds = d.wds, None
        watch = _watch
        if wds is not None and watch is not None:
            for wd in wds:
                self._release_wd(watch, wd, parts)
        d.release()
        if parts:
            p = self._cache.get(parts[:-1])
            if p is not None:
                p.kids.discard(parts[-1])

    def _changed(self, parts: Sequence[str]) -> None:
        """This view changed the entry *parts* in the upper dir: the merges at and
        below it may be different now (inotify says so too, at the next request)."""
        self._forget(tuple(parts))

    def close(self) -> None:
        """Close the cached merges' fds (the view stays usable)."""
        if self._cache:
            self._forget(())

    def __del__(self) -> None:
        # The Store replaces its views (after a commit) by dropping them.
        self.close()

    def _merge_child(self, cur: _Dirs, parts: Parts, watch: _Watch | None
                     ) -> tuple[_Dirs, list[int] | None]:
        """The merge of the layers' directories named parts[-1] in the merge *cur*,
        and (with *watch*) their watches, each added before what it decides is
        read (the opaque mark); no watches if one could not be had."""
        name = parts[-1]
        nxt: list[tuple[int, int]] = []
        wds: list[int] | None = [] if watch is not None else None
        found = False
        try:
            for i, fd in cur.fds:
                st = lstat_at(fd, name)
                if st is None:
                    continue
                if is_whiteout(st):
                    break
                if not stat.S_ISDIR(st.st_mode):
                    if not found:
                        raise _err(errno.ENOTDIR, parts)
                    break
                try:
                    nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # changed under us in a lower layer
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    continue
                found = True
                nxt.append((i, nfd))
                if wds is not None:
                    wds = self._watch_one(watch, nfd, wds)
                if _fd_opaque(nfd):
                    break
        except BaseException:
            _Dirs(nxt).close()
            if wds and watch is not None:
                for wd in wds:
                    self._release_wd(watch, wd, None)
            raise
        if not found:
            raise _err(errno.ENOENT, parts)
        return _Dirs(nxt), wds

    def lookup(self, parts: Sequence[str]) -> Entry | None:
        if not parts:
            return Entry(0, os.fstat(self.layers[0]))
        try:
            with self.dirs(parts[:-1]) as d:
                return d.find(parts[-1])
        except (FileNotFoundError, NotADirectoryError):
            return None

    def need(self, parts: Sequence[str]) -> Entry:
        e = self.lookup(parts)
        if e is None:
            raise _err(errno.ENOENT, parts)
        return e

    def listdir(self, parts: Sequence[str]) -> dict[str, Entry]:
        """The merged directory's entries, in the order of the upper-most listing."""
        out: dict[str, Entry] = {}
        hidden: set[str] = set()
        with self.dirs(parts) as d:
            for i, fd in d.fds:
                for name in os.listdir(fd):
                    if name in out or name in hidden:
                        continue
                    st = lstat_at(fd, name)
                    if st is None:
                        continue
                    if is_whiteout(st):
                        hidden.add(name)
                    else:
                        out[name] = Entry(i, st)
        return out

    def is_empty_dir(self, parts: Sequence[str]) -> bool:
        return not self.listdir(parts)

    def readlink(self, parts: Sequence[str]) -> str:
        with self.dirs(parts[:-1]) as d:
            e = d.find(parts[-1])
            if e is None:
                raise _err(errno.ENOENT, parts)
            if not stat.S_ISLNK(e.st.st_mode):
                raise _err(errno.EINVAL, parts)
            return os.readlink(parts[-1], dir_fd=d.fd(e.layer))

    def open_read(self, parts: Sequence[str], flags: int = os.O_RDONLY) -> int:
        """Open the topmost copy of a file without copying it up."""
        return self.open_top(parts, flags)[0]

    def open_top(self, parts: Sequence[str], flags: int) -> tuple[int, Entry]:
        """open_read(), and where the name resolved."""
        if not parts:
            raise _err(errno.EISDIR)
        with self.dirs(parts[:-1]) as d:
            e = d.find(parts[-1])
            if e is None:
                raise _err(errno.ENOENT, parts)
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd(e.layer))
            return fd, e

    # -- copy-up ------------------------------------------------------------

    def upper_dir(self, parts: Sequence[str]) -> int:
        """Open the upper copy of directory *parts*, copying up the chain as needed,
        for a caller that changes what is in it: the view forgets what it cached
        at and below *parts*."""
        self._forget(tuple(parts))
        return self._upper_dir(parts)

    def _upper_dir(self, parts: Sequence[str]) -> int:
        try:
            d = self._resolve(tuple(parts))
        except (FileNotFoundError, NotADirectoryError):
            pass  # the walk below says which
        else:
            try:
                if d.fds[0][0] == 0:
                    return os.dup(d.fds[0][1])
            finally:
                d.release()
        fd = os.dup(self.layers[0])
        try:
            for k, name in enumerate(parts):
                st = lstat_at(fd, name)
                if st is None:
                    self._copy_up_dir(parts[: k + 1], fd)
                elif not stat.S_ISDIR(st.st_mode):
                    raise _err(errno.ENOENT if is_whiteout(st) else errno.ENOTDIR, parts[: k + 1])
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _copy_up_dir(self, parts: Sequence[str], upparent: int) -> None:
        name = parts[-1]
        with self.dirs(parts[:-1]) as d:
            e = d.find(name)
            if e is None:
                raise _err(errno.ENOENT, parts)
            if not e.is_dir:
                raise _err(errno.ENOTDIR, parts)
            self._hide(parts, e)
            os.mkdir(name, 0o700, dir_fd=upparent)
            backing.copy_meta(e.st, upparent, name, at(d.fd(e.layer), name))
        self._changed(parts)

    def copy_up(self, parts: Sequence[str]) -> Entry:
        """Make sure the entry *parts* has its own copy in the upper dir."""
        if not parts:
            return Entry(0, os.fstat(self.layers[0]))
        with self.dirs(parts[:-1]) as d:
            e = d.find(parts[-1])
            if e is None:
                raise _err(errno.ENOENT, parts)
            if e.layer == 0:
                return e
            up = self._upper_dir(parts[:-1])
            try:
                if e.is_dir:
                    self._copy_up_dir(parts, up)  # records the origin itself
                else:
                    self._hide(parts, e)
                    backing.copy_entry(d.fd(e.layer), parts[-1], e.st, up, parts[-1],
                                       tmpdir=self.work)
                    self._changed(parts)
                return Entry(0, os.stat(parts[-1], dir_fd=up, follow_symlinks=False))
            finally:
                os.close(up)

    def copy_up_tree(self, parts: Sequence[str]) -> None:
        """Give directory *parts* a complete opaque upper copy (no lower layer left
        in its merge), as a directory rename needs (overlayfs redirect_dir=off).
        Entries already in the upper dir are moved, not copied: their inodes, open
        files and hard links stay."""
        if not parts:
            return
        with self.dirs(parts) as md:
            if all(i == 0 for i, _ in md.fds):
                return
        assert self.work is not None
        name = parts[-1]
        tmp = f".branchfs-tree.{os.getpid()}.{name}"[:250]
        backing.remove_at(self.work, tmp)
        e = self.need(parts)
        if e.layer != 0:
            self._hide(parts, e)
        os.mkdir(tmp, 0o700, dir_fd=self.work)
        tfd = os.open(tmp, DIR_FLAGS, dir_fd=self.work)
        try:
            self._fill_tree(parts, tfd)
        finally:
            os.close(tfd)
        with self.dirs(parts[:-1]) as d:
            backing.copy_meta(e.st, self.work, tmp, at(d.fd(e.layer), name))
        backing.set_opaque_at(self.work, tmp)
        up = self._upper_dir(parts[:-1])
        try:
            backing.remove_at(up, name)
            os.rename(tmp, name, src_dir_fd=self.work, dst_dir_fd=up)
        finally:
            os.close(up)
        self._changed(parts)

    def _fill_tree(self, parts: Sequence[str], dst: int) -> None:
        entries = self.listdir(parts)
        with self.dirs(parts) as d:
            for name, e in entries.items():
                src = d.fd(e.layer)
                if e.layer != 0:
                    self._hide((*parts, name), e)
                if not e.is_dir:
                    if e.layer == 0:
                        os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
                    else:
                        backing.copy_entry(src, name, e.st, dst, name, tmpdir=dst)
                    continue
                os.mkdir(name, 0o700, dir_fd=dst)
                cfd = os.open(name, DIR_FLAGS, dir_fd=dst)
                try:
                    self._fill_tree((*parts, name), cfd)
                finally:
                    os.close(cfd)
                backing.copy_meta(e.st, dst, name, at(src, name))

    # -- namespace changes ------------------------------------------------

    def _new_name(self, parts: Sequence[str]) -> tuple[int, bool]:
        """Open the upper parent of a name about to be created; clear a whiteout
        there. Returns (parent fd, whether a whiteout was cleared)."""
        with self.dirs(parts[:-1]) as d:
            if d.find(parts[-1]) is not None:
                raise _err(errno.EEXIST, parts)
            below = any(i != 0 for i, _ in d.fds)
        up = self._upper_dir(parts[:-1])
        st = lstat_at(up, parts[-1])
        if st is not None:
            os.unlink(parts[-1], dir_fd=up)  # only a whiteout can be here
        elif below:
            self._hide(parts, None)  # else an ancestor hides it already
        return up, st is not None

    def _own(self, dirfd: int, name: str, uid: int | None, gid: int | None) -> None:
        if uid is not None and os.geteuid() == 0:
            os.chown(name, uid, -1 if gid is None else gid, dir_fd=dirfd, follow_symlinks=False)

    @staticmethod
    def _exact_mode(dirfd: int, name: str, mode: int, fd: int | None = None) -> None:
        """Give a new entry exactly *mode*: the caller's umask was applied by the
        kernel already, and the daemon's own umask must not take more bits away
        (O_CREAT 0620 gave 0600 under umask 022). After _own: a chown clears the
        set-id bits of a file. Through a descriptor, never a name a user could
        have swapped for a symlink meanwhile."""
        if fd is not None:
            os.fchmod(fd, mode & 0o7777)
            return
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            if not stat.S_ISLNK(os.fstat(pfd).st_mode):
                os.chmod(f"/proc/self/fd/{pfd}", mode & 0o7777)
        finally:
            os.close(pfd)

    def create(self, parts: Sequence[str], flags: int, mode: int,
               uid: int | None = None, gid: int | None = None) -> int:
        up, _ = self._new_name(parts)
        try:
            fd = os.open(parts[-1], (flags & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL
                         | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o7777, dir_fd=up)
            self._changed(parts)
            self._own(up, parts[-1], uid, gid)
            self._exact_mode(up, parts[-1], mode, fd)
            return fd
        finally:
            os.close(up)

    def mkdir(self, parts: Sequence[str], mode: int,
              uid: int | None = None, gid: int | None = None) -> None:
        up, was_whiteout = self._new_name(parts)
        try:
            os.mkdir(parts[-1], mode & 0o7777, dir_fd=up)
            self._changed(parts)
            if was_whiteout:
                backing.set_opaque_at(up, parts[-1])
            self._own(up, parts[-1], uid, gid)
            self._exact_mode(up, parts[-1], mode)
        finally:
            os.close(up)

    def mknod(self, parts: Sequence[str], mode: int, rdev: int,
              uid: int | None = None, gid: int | None = None) -> None:
        up, _ = self._new_name(parts)
        try:
            if stat.S_ISREG(mode):
                os.close(os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 mode & 0o7777, dir_fd=up))
            else:
                os.mknod(parts[-1], mode, rdev, dir_fd=up)
            self._changed(parts)
            self._own(up, parts[-1], uid, gid)
            self._exact_mode(up, parts[-1], mode)
        finally:
            os.close(up)

    def symlink(self, parts: Sequence[str], target: str,
                uid: int | None = None, gid: int | None = None) -> None:
        up, _ = self._new_name(parts)
        try:
            os.symlink(target, parts[-1], dir_fd=up)
            self._changed(parts)
            self._own(up, parts[-1], uid, gid)
        finally:
            os.close(up)

    def link(self, src: Sequence[str], dst: Sequence[str]) -> None:
        e = self.need(src)
        if e.is_dir:
            raise _err(errno.EPERM, src)
        self.copy_up(src)
        sp = self._upper_dir(src[:-1])
        try:
            dp, _ = self._new_name(dst)
            try:
                os.link(src[-1], dst[-1], src_dir_fd=sp, dst_dir_fd=dp, follow_symlinks=False)
                self._changed(dst)
            finally:
                os.close(dp)
        finally:
            os.close(sp)

    def _remove(self, parts: Sequence[str], want_dir: bool) -> None:
        if not parts:
            raise _err(errno.EBUSY)
        with self.dirs(parts[:-1]) as d:
            e = d.find(parts[-1])
            if e is None:
                raise _err(errno.ENOENT, parts)
            if want_dir and not e.is_dir:
                raise _err(errno.ENOTDIR, parts)
            if not want_dir and e.is_dir:
                raise _err(errno.EISDIR, parts)
            lower = d.lower_has(parts[-1])
        if want_dir and not self.is_empty_dir(parts):
            raise _err(errno.ENOTEMPTY, parts)
        if e.layer != 0:
            self._hide(parts, e)
        elif not lower:
            self._unhide(parts)
        up = self._upper_dir(parts[:-1])
        try:
            if e.layer == 0:
                if want_dir:
                    backing.remove_at(up, parts[-1])  # holds whiteouts at most
                else:
                    os.unlink(parts[-1], dir_fd=up)
            if lower:
                backing.make_whiteout(up, parts[-1])
        finally:
            os.close(up)
            self._changed(parts)

    def unlink(self, parts: Sequence[str]) -> None:
        self._remove(parts, want_dir=False)

    def rmdir(self, parts: Sequence[str]) -> None:
        self._remove(parts, want_dir=True)

    def rename(self, src: Sequence[str], dst: Sequence[str], flags: int = 0) -> bool:
        """rename(2)/renameat2(2); False when POSIX makes it a no-op (same name,
        or two hard links of one file)."""
        if not src or not dst:
            raise _err(errno.EBUSY)
        se = self.need(src)
        de = self.lookup(dst)
        if de is not None and flags & backing.RENAME_NOREPLACE:
            raise _err(errno.EEXIST, dst)
        if tuple(src) == tuple(dst) or (
                de is not None and (se.layer, se.st.st_dev, se.st.st_ino)
                == (de.layer, de.st.st_dev, de.st.st_ino)):
            return False
        if flags & backing.RENAME_EXCHANGE:
            if de is None:
                raise _err(errno.ENOENT, dst)
            for parts, e in ((src, se), (dst, de)):
                if e.is_dir:
                    self.copy_up_tree(parts)
                else:
                    self.copy_up(parts)
            sp = self._upper_dir(src[:-1])
            try:
                dp = self._upper_dir(dst[:-1])
                try:
                    backing.rename2(sp, src[-1], dp, dst[-1], backing.RENAME_EXCHANGE)
                finally:
                    os.close(dp)
            finally:
                os.close(sp)
                self._changed(src)
                self._changed(dst)
            return True
        if de is not None:
            if se.is_dir and not de.is_dir:
                raise _err(errno.ENOTDIR, dst)
            if not se.is_dir and de.is_dir:
                raise _err(errno.EISDIR, dst)
            if de.is_dir and not self.is_empty_dir(dst):
                raise _err(errno.ENOTEMPTY, dst)
        with self.dirs(src[:-1]) as d:
            src_lower = d.lower_has(src[-1])
        if se.is_dir:
            self.copy_up_tree(src)
        else:
            self.copy_up(src)
        dp = self._upper_dir(dst[:-1])
        try:
            with self.dirs(dst[:-1]) as d:
                dst_lower = d.lower_has(dst[-1])
                below = any(i != 0 for i, _ in d.fds)
            st = lstat_at(dp, dst[-1])
            if st is None and below:
                self._hide(dst, de)
            if st is not None and (is_whiteout(st) or stat.S_ISDIR(st.st_mode)):
                backing.remove_at(dp, dst[-1])  # a whiteout, or an empty-looking dir
            sp = self._upper_dir(src[:-1])
            try:
                os.rename(src[-1], dst[-1], src_dir_fd=sp, dst_dir_fd=dp)
                if se.is_dir and dst_lower:
                    backing.set_opaque_at(dp, dst[-1])
                if src_lower:
                    backing.make_whiteout(sp, src[-1])
                else:
                    self._unhide(src)
            finally:
                os.close(sp)
                self._changed(src)
                self._changed(dst)
        finally:
            os.close(dp)
        return True

    # -- attributes ---------------------------------------------------------

    @contextmanager
    def upper_parent(self, parts: Sequence[str]) -> Iterator[tuple[int, str]]:
        """Copy *parts* up and yield (upper parent fd, name); the root yields (root, ".")."""
        if not parts:
            yield self.layers[0], "."
            return
        self.copy_up(parts)
        up = self._upper_dir(parts[:-1])
        try:
            yield up, parts[-1]
        finally:
            os.close(up)

    @contextmanager
    def top_parent(self, parts: Sequence[str]) -> Iterator[tuple[int, str]]:
        """Yield (parent dir fd, name) of the topmost copy, without copying up."""
        if not parts:
            yield self.layers[0], "."
            return
        with self.dirs(parts[:-1]) as d:
            e = d.find(parts[-1])
            if e is None:
                raise _err(errno.ENOENT, parts)
            yield d.fd(e.layer), parts[-1]

    def set_attrs(self, parts: Sequence[str], *, size: int | None = None,
                  mode: int | None = None, owner: tuple[int, int] | None = None,
                  times: tuple[int | None, int | None] | None = None) -> os.stat_result:
        """Copy *parts* up and change what is given, in setattr's order (size, mode,
        owner, then (atime, mtime) with None keeping one); its lstat afterwards."""
        with self.upper_parent(parts) as (fd, name):
            if size is not None:
                f = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    os.ftruncate(f, size)
                finally:
                    os.close(f)
            if mode is not None:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(at(fd, name), mode & 0o7777)
            if owner is not None:
                os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
            if times is not None:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                ns = (st.st_atime_ns if times[0] is None else times[0],
                      st.st_mtime_ns if times[1] is None else times[1])
                os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def chmod(self, parts: Sequence[str], mode: int) -> None:
        self.set_attrs(parts, mode=mode)

    def chown(self, parts: Sequence[str], uid: int, gid: int) -> None:
        self.set_attrs(parts, owner=(uid, gid))

    def utime(self, parts: Sequence[str], atime_ns: int | None, mtime_ns: int | None) -> None:
        self.set_attrs(parts, times=(atime_ns, mtime_ns))

    def truncate(self, parts: Sequence[str], size: int) -> None:
        self.set_attrs(parts, size=size)

    def stat(self, parts: Sequence[str]) -> os.stat_result:
        return self.need(parts).st

    # -- xattrs: user.overlay.* is ours, hidden and refused -----------------

    def getxattr(self, parts: Sequence[str], name: str) -> bytes:
        if name.startswith(backing.PRIVATE_XATTR_PREFIX):
            raise _err(errno.ENODATA, parts)
        with self.top_parent(parts) as (fd, n):
            return os.getxattr(at(fd, n), name, follow_symlinks=False)

    def listxattr(self, parts: Sequence[str]) -> list[str]:
        with self.top_parent(parts) as (fd, n):
            names = os.listxattr(at(fd, n), follow_symlinks=False)
        return [x for x in names if not x.startswith(backing.PRIVATE_XATTR_PREFIX)]

    def setxattr(self, parts: Sequence[str], name: str, value: bytes) -> None:
        if name.startswith(backing.PRIVATE_XATTR_PREFIX):
            raise _err(errno.EPERM, parts)
        with self.upper_parent(parts) as (fd, n):
            os.setxattr(at(fd, n), name, value, follow_symlinks=False)

    def removexattr(self, parts: Sequence[str], name: str) -> None:
        if name.startswith(backing.PRIVATE_XATTR_PREFIX):
            raise _err(errno.EPERM, parts)
        with self.top_parent(parts) as (fd, n):
            os.getxattr(at(fd, n), name, follow_symlinks=False)  # ENODATA before a copy-up
        with self.upper_parent(parts) as (fd, n):
            os.removexattr(at(fd, n), name, follow_symlinks=False)

    def open_write(self, parts: Sequence[str], flags: int) -> int:
        """Copy the file up and open the upper copy with *flags*."""
        with self.upper_parent(parts) as (fd, name):
            return os.open(name, (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_NOFOLLOW
                           | os.O_CLOEXEC, dir_fd=fd)


def _fd_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, backing.OPAQUE_XATTR) == b"y"
    except OSError:
        return False
