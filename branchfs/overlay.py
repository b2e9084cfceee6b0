"""The kernel fast path: serving a branch's delta through an overlayfs mount.

A branch's upper dir is in overlayfs upper-dir format (``docs/format.md``), so
a privileged process can mount it as the upper layer of a kernel overlay whose
lower layers are the branch chain: each ancestor's upper dir, then the base.
Reads and writes then never reach Python. This module builds the options,
mounts and detaches with the libc calls (no helper program: no PATH lookup,
no parsing of its output), and probes whether this host allows it at all.

Layers are named by ``/proc/self/fd/N`` of directory fds the caller holds:
the kernel resolves them once at mount time, so a base path with ``,``, ``:``
or a symlink in it needs no escaping and cannot be redirected.

The options are fixed: ``userxattr`` because the format keeps its marks in
``user.overlay.*`` (it implies ``redirect_dir=nofollow``: renaming a directory
that has lower content fails with EXDEV and ``mv`` copies, as the FUSE backend
does); ``index=off`` and ``uuid=off`` so that nothing ties the delta to one
mount or one filesystem; ``metacopy=off`` so that a copied-up file holds its
data and can be committed by a rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator, Sequence

from . import backing

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
FSTYPE = "overlay"
OPTIONS = "userxattr,index=off,metacopy=off,uuid=off"
PRIVATE_PREFIX = "user.overlay."
OPAQUE = "user.overlay.opaque"
# The kernel's limit on lower layers (OVL_MAX_STACK), and mount(2) copies one
# page of options; deeper chains stay on FUSE.
MAX_LOWER = 500
MAX_DATA = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class OverlayError(OSError):
    """An overlay mount the kernel refused; the message names the call and the target."""


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def options(upper: int, work: int, lowers: Sequence[int]) -> str:
    """Mount data for an overlay of the directory fds: *lowers* top first."""
    if not lowers:
        raise ValueError("an overlay needs at least one lower layer")
    if len(lowers) > MAX_LOWER:
        raise OverlayError(errno.ELOOP, f"{len(lowers)} lower layers exceed {MAX_LOWER}")
    lower = ":".join(fd_path(fd) for fd in lowers)
    data = f"upperdir={fd_path(upper)},workdir={fd_path(work)},{OPTIONS},lowerdir={lower}"
    if len(data) >= MAX_DATA:  # mount(2) would cut it silently
        raise OverlayError(errno.E2BIG, f"{len(lowers)} lower layers do not fit in the "
                           f"{MAX_DATA} bytes of one mount call's options")
    return data


def mount(target: str, upper: int, work: int, lowers: Sequence[int]) -> None:
    """Mount an overlay at *target*. Call it from a thread that does not serve a
    FUSE mount *target* lies in: resolving the path asks that mount."""
    data = options(upper, work, lowers).encode()
    if _libc.mount(FSTYPE.encode(), os.fsencode(target), FSTYPE.encode(), 0, data) != 0:
        err = ctypes.get_errno()
        raise OverlayError(err, f"mount -t overlay on {target}: {os.strerror(err)}")


def detach(target: str, *, follow: bool = False) -> bool:
    """Lazily unmount what is mounted at *target* (processes using it keep it until
    they let go); False when nothing was mounted there or the path is gone.
    *follow*: *target* is a ``/proc/self/fd/N`` link to the mount's root."""
    flags = MNT_DETACH if follow else MNT_DETACH | UMOUNT_NOFOLLOW
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT, errno.ESTALE, errno.ENOTDIR):
        return False
    raise OverlayError(err, f"umount {target}: {os.strerror(err)}")


def mounted_below(root: str) -> list[str]:
    """Mount points of overlays at or below *root*, deepest first (as they must be
    detached), from this process's mount table."""
    out = []
    for point, fstype in _mounts():
        if fstype == FSTYPE and (point == root or point.startswith(root.rstrip("/") + "/")):
            out.append(point)
    return sorted(out, key=lambda p: p.count("/"), reverse=True)


def mount_ids() -> set[int]:
    """The ids of the overlay mounts attached in this process's mount namespace."""
    out = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index(b"-") + 1] == FSTYPE.encode():
                out.add(int(fields[0]))
    return out


def overlay_mounts() -> list[tuple[int, str]]:
    """(mount id, mount point) of each overlay attached in this mount namespace."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == FSTYPE:
                out.append((int(fields[0]), _unescape(fields[4])))
    return out


def mount_id(fd: int) -> int:
    """The id of the mount *fd* lies in."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, f"no mnt_id for fd {fd}")


def _mounts() -> Iterator[tuple[str, str]]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            yield _unescape(fields[4]), fields[sep + 1]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as 3-digit octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def drop_kernel_xattrs(dirfd: int, name: str) -> None:
    """Remove from *name* (not followed) the ``user.overlay.*`` xattrs a kernel
    overlay writes (origin, impure, uuid...): they describe the layers of one
    mount and must never reach the base or another layer. The opaque mark is
    the format's own and stays."""
    path = f"{fd_path(dirfd)}/{name}"
    for xname in backing.xattr_names(path):
        if xname.startswith(PRIVATE_PREFIX) and xname != OPAQUE:
            try:
                os.removexattr(path, xname, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # gone already: a replayed step
                    raise


def remove_workdir(parent: int, name: str) -> None:
    """Remove the work dir *name* in *parent* (a dir fd) of an overlay that is gone: the
    kernel leaves ``work/`` (mode 0) and ``index/`` in it, empty."""
    wd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent)
    try:
        for sub in os.listdir(wd):
            os.chmod(sub, 0o700, dir_fd=wd)
            os.rmdir(sub, dir_fd=wd)
    finally:
        os.close(wd)
    os.rmdir(name, dir_fd=parent)


def probe(scratch: str) -> str | None:
    """None when an overlay in the upper-dir format can be mounted here (tried for
    real in *scratch*, a fresh directory on the state's filesystem, removed
    afterwards), else the reason it cannot."""
    os.makedirs(scratch, exist_ok=True)
    try:
        names = ("lower", "upper", "work", "mnt")
        for name in names:
            os.mkdir(os.path.join(scratch, name), 0o700)
        open(os.path.join(scratch, "lower", "f"), "w").close()
        fds = [os.open(os.path.join(scratch, n), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
               for n in names[:3]]
        target = os.path.join(scratch, "mnt")
        try:
            mount(target, fds[1], fds[2], [fds[0]])
        except OSError as exc:
            return str(exc)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            # A whiteout is what the format needs most: delete a lower file through it.
            os.unlink(os.path.join(target, "f"))
        except OSError as exc:
            return f"an overlay mounted but refused a change: {exc}"
        finally:
            detach(target)
        return None
    except OSError as exc:
        return f"cannot prepare {scratch}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
