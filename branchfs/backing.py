"""Low-level access to the backing directories, always relative to directory fds.

Every name handled here may come from a FUSE request or from a directory an
untrusted user can write, so components are opened one at a time with
O_NOFOLLOW: a symlink planted anywhere in a path makes the walk fail instead
of leading outside the workspace. Also here: the overlayfs upper-directory
conventions (whiteout = char device 0/0, opaque dir = xattr
``user.overlay.opaque="y"``), copying one entry with its metadata
(FICLONE, then copy_file_range, then read/write; holes kept), and inotify,
which tells the views' caches what changed in the directories they hold.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import stat
import struct
from collections.abc import Iterator, Sequence

OPAQUE_XATTR = "user.overlay.opaque"
PRIVATE_XATTR_PREFIX = "user.overlay."

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FICLONE = 0x40049409
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128
_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)

# inotify(7): changes of a directory's entries, of its own attributes (the opaque
# xattr), and its end (deleted, moved, its watch dropped).
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
_IN_MASK = (IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
            | IN_MOVE_SELF | IN_ONLYDIR)
_IN_EVENT = struct.Struct("iIII")


def at(dirfd: int, name: str) -> str:
    """A path naming *name* inside the directory *dirfd* without resolving anything
    but the final component (for calls that have no dir_fd parameter)."""
    return f"/proc/self/fd/{dirfd}/{name}"


def open_dir(rootfd: int, parts: Sequence[str]) -> int:
    """Open the directory *parts* below *rootfd*, never following a symlink."""
    fd = os.dup(rootfd)
    try:
        for name in parts:
            nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.ELOOP:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        raise
    return fd


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque_at(dirfd: int, name: str) -> bool:
    try:
        return os.getxattr(at(dirfd, name), OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def set_opaque_at(dirfd: int, name: str) -> None:
    os.setxattr(at(dirfd, name), OPAQUE_XATTR, b"y", follow_symlinks=False)


def clear_opaque_at(dirfd: int, name: str) -> None:
    try:
        os.removexattr(at(dirfd, name), OPAQUE_XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise


def make_whiteout(dirfd: int, name: str) -> None:
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dirfd)


def remove_at(dirfd: int, name: str) -> None:
    """Remove whatever *name* is (a directory with all its content); absent is fine."""
    st = lstat_at(dirfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
    try:
        for child in os.listdir(fd):
            remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dirfd)


def rename2(olddir: int, old: str, newdir: int, new: str, flags: int) -> None:
    """renameat2(2), for RENAME_NOREPLACE and RENAME_EXCHANGE."""
    if _libc.renameat2(olddir, os.fsencode(old), newdir, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def identity(fd: int) -> str:
    """Which file *fd* is, as a string that differs from that of a file made later
    at the same place: (st_dev, st_ino) does not, as ext4 gives a directory made
    again at once the inode number of the one just removed. The file handle of
    name_to_handle_at(2) holds the inode's generation too; where a filesystem has
    none, the inode number is the best there is."""
    st = os.fstat(fd)
    h = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", ctypes.byref(h), ctypes.byref(mount_id),
                               AT_EMPTY_PATH) != 0:
        return f"{st.st_dev}:{st.st_ino}"
    return f"{st.st_dev}:{h.handle_type}:{bytes(h.f_handle[:h.handle_bytes]).hex()}"


def xattr_names(path: str) -> list[str]:
    """The xattr names of *path* (not followed); none where xattrs are not allowed."""
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def user_xattrs(path: str) -> Iterator[tuple[str, bytes]]:
    """The xattrs of *path* (not followed) worth copying, without our private ones."""
    for name in xattr_names(path):
        if name.startswith(PRIVATE_XATTR_PREFIX):
            continue
        try:
            yield name, os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise


def copy_data(src: int, dst: int) -> None:
    """Copy a regular file's data: reflink if the filesystem can, else only the
    data extents (holes stay holes) with copy_file_range, else read/write."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                             errno.EBADF, errno.EPERM):
            raise
    size = os.fstat(src).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dst, start, end)
        pos = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    off = start
    while off < end:
        n = min(_CHUNK * 64, end - off)
        try:
            done = os.copy_file_range(src, dst, n, off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            done = 0
        if done == 0:  # unsupported or short: plain copy of the rest of this extent
            while off < end:
                buf = os.pread(src, min(_CHUNK, end - off), off)
                if not buf:
                    return
                off += _pwrite_all(dst, buf, off)
            return
        off += done


def _pwrite_all(fd: int, buf: bytes, off: int) -> int:
    """Write all of *buf* at *off* (a nearly full disk takes part of a write and
    refuses the rest with ENOSPC at the next call); returns len(buf)."""
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n
    return len(buf)


def copy_meta(st: os.stat_result, dstdir: int, name: str, xattrs_from: str | None) -> None:
    """Give the entry *name* in *dstdir* the owner, mode, xattrs and times of *st*.

    Never through a symlink, not even one swapped in for *name* meanwhile (the
    daemon, root, works in directories users write): a symlink is changed with
    the calls that do not follow; anything else is opened with O_NOFOLLOW,
    checked to be of *st*'s type, and changed through that descriptor."""
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFLNK:
        if os.geteuid() == 0:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dstdir, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dstdir,
                 follow_symlinks=False)
        return
    # regular files and directories are opened for real; the others (a fifo would
    # block, a device must not be opened) by O_PATH, changed through /proc/self/fd/N,
    # which reaches that fd's inode without walking a name again
    flags = os.O_RDONLY if kind in (stat.S_IFREG, stat.S_IFDIR) else os.O_PATH
    if kind == stat.S_IFDIR:
        flags |= os.O_DIRECTORY
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dstdir)
    try:
        if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
            raise OSError(errno.ESTALE, f"{name} was replaced by another kind of file")
        set_meta(fd, st, xattrs_from, by_path=flags == os.O_PATH)
    finally:
        os.close(fd)


def set_meta(fd: int, st: os.stat_result, xattrs_from: str | None, *,
             by_path: bool = False) -> None:
    """Owner, mode, xattrs and times of *st* onto the open file *fd* (not a symlink);
    *by_path*: an O_PATH fd, changed through its /proc/self/fd link."""
    target: int | str = f"/proc/self/fd/{fd}" if by_path else fd
    if os.geteuid() == 0:
        os.chown(target, st.st_uid, st.st_gid)  # before the mode: chown clears setuid
    os.chmod(target, stat.S_IMODE(st.st_mode))
    if xattrs_from is not None:
        for xname, value in user_xattrs(xattrs_from):
            try:
                os.setxattr(target, xname, value)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_entry(srcdir: int, srcname: str, st: os.stat_result, dstdir: int, dstname: str,
               tmpdir: int | None = None) -> None:
    """Copy one non-directory entry (file, symlink, device, fifo, socket) with its
    metadata as *dstname* (only a regular file may replace an existing name).

    A regular file is written as an unnamed O_TMPFILE in *tmpdir* (same
    filesystem as *dstdir*; default *dstdir* itself), given its metadata through
    its descriptor, then linked under a random name and renamed into place: it
    appears complete or not at all, and no name of it can be swapped for a
    symlink before its mode is set (where the filesystem has no O_TMPFILE, the
    file is created under a random name instead, still changed only by fd)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        if tmpdir is None:
            tmpdir = dstdir
        sfd = os.open(srcname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=srcdir)
        try:
            dfd, tmp = _new_file(tmpdir)
            try:
                copy_data(sfd, dfd)
                set_meta(dfd, st, at(srcdir, srcname))
                if tmp is None:
                    tmp = _link_tmpfile(dfd, tmpdir)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        os.rename(tmp, dstname, src_dir_fd=tmpdir, dst_dir_fd=dstdir)
        return
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(srcname, dir_fd=srcdir), dstname, dir_fd=dstdir)
    elif stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "copy_entry copies no directories", srcname)
    else:
        os.mknod(dstname, mode, st.st_rdev, dir_fd=dstdir)
    copy_meta(st, dstdir, dstname, at(srcdir, srcname))


def _temp_name() -> str:
    return f".branchfs-tmp.{secrets.token_hex(8)}"


def _new_file(dirfd: int) -> tuple[int, str | None]:
    """A new, empty, private file on *dirfd*'s filesystem: an unnamed O_TMPFILE (name
    None), or where that is not supported, a file under a random name."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dirfd), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    name = _temp_name()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dirfd), name


def _link_tmpfile(fd: int, dirfd: int) -> str:
    """Give the O_TMPFILE *fd* a random name in *dirfd*; that name."""
    while True:
        name = _temp_name()
        try:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dirfd, follow_symlinks=True)
            return name
        except FileExistsError:
            continue


class Inotify:
    """A non-blocking inotify instance watching directories (by fd) for changes
    of their entries and attributes. ``read()`` returns what is queued as
    (watch descriptor, mask, name or ""); an event is queued by the change's
    own system call, so whatever changed before ``read()`` is in it."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add(self, dirfd: int) -> int:
        """Watch the directory *dirfd*; the same directory always gets the same wd."""
        wd = _libc.inotify_add_watch(self.fd, f"/proc/self/fd/{dirfd}".encode(), _IN_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}")
        return int(wd)

    def remove(self, wd: int) -> None:
        """Stop watching; a watch the kernel already dropped is fine."""
        _libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int, str]]:
        out: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off < len(buf):
                wd, mask, _cookie, size = _IN_EVENT.unpack_from(buf, off)
                off += _IN_EVENT.size
                name = os.fsdecode(buf[off:off + size].split(b"\0", 1)[0])
                off += size
                out.append((wd, mask, name))

    def close(self) -> None:
        os.close(self.fd)
