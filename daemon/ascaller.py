"""Doing file reads for a client with the client's own permissions.

A root daemon reads files for its clients (``diff --patch``); what it reads must
be what the client itself could read. Linux keeps the filesystem credentials
(fsuid, fsgid, supplementary groups) per thread, so the reads run on a fresh
thread that first takes the caller's: the kernel then checks every path
component and every open as it would for the caller, through FUSE's
default_permissions, the kernel overlay and the workspace's own filesystem
alike. The thread ends with the call, so no other work ever runs with those
credentials. ``setgroups`` goes through ``syscall(2)``: glibc's wrapper changes
every thread of the process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "ppc64le": 81,
                  "s390x": 206}
_SYS_FACCESSAT2 = 439  # one number on every architecture (Linux 5.8)
_AT_FDCWD = -100
_AT_EACCESS = 0x200
_CAP_CHOWN, _CAP_SETGID, _CAP_SETUID = 0, 6, 7
_libc = ctypes.CDLL(None, use_errno=True)


def acts_for_others() -> bool:
    """Whether this process may act as another user: give them their run records
    (CAP_CHOWN), take their credentials for reads and drop to them for runs
    (CAP_SETGID, CAP_SETUID), as root may. An unprivileged daemon acts only as itself."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return all(caps >> c & 1 for c in (_CAP_CHOWN, _CAP_SETGID, _CAP_SETUID))
    return False


def call_as(uid: int, gid: int, groups: list[int], fn: Callable[[], T]) -> T:
    """``fn()`` with the filesystem credentials of *uid*/*gid*/*groups* (blocks: call it
    from a worker thread). The daemon's own uid runs it directly."""
    if uid == os.geteuid():
        return fn()
    out: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            _become(uid, gid, groups)
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=body, name=f"as-uid-{uid}")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def access_error(path: str, mode: int) -> int:
    """0 if this thread's filesystem credentials give *mode* (``os.R_OK`` and the rest)
    on *path*, else the errno (EACCES, ENOENT, ...). The kernel decides, as for any
    open: the search bit of every component, ACLs, supplementary groups, a read-only
    mount. Call it inside ``call_as``: glibc's ``faccessat`` checks the real uid, or
    emulates AT_EACCESS with the effective one, and neither is the caller's."""
    if _libc.syscall(_SYS_FACCESSAT2, _AT_FDCWD, os.fsencode(path), mode, _AT_EACCESS) == 0:
        return 0
    err = ctypes.get_errno()
    if err != errno.ENOSYS:
        return err
    # before Linux 5.8: the path walk as the caller, then the mode bits
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno or errno.EACCES
    uid, gid = _libc.setfsuid(-1 & 0xFFFFFFFF), _libc.setfsgid(-1 & 0xFFFFFFFF)
    if uid == 0:
        return 0
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid == gid or st.st_gid in _thread_groups():
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return 0 if bits & mode == mode else errno.EACCES


def _thread_groups() -> list[int]:
    """This thread's supplementary groups (os.getgroups may answer for another thread)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                return [int(g) for g in line.split()[1:]]
    return []


def _become(uid: int, gid: int, groups: list[int]) -> None:
    number = _SYS_SETGROUPS.get(platform.machine())
    if number is None:
        raise OSError(f"no setgroups syscall number known for {platform.machine()}")
    arr = (ctypes.c_uint * len(groups))(*groups)
    if _libc.syscall(number, len(groups), arr) != 0:
        raise OSError(ctypes.get_errno(), "setgroups for the caller's reads failed")
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    # setfs*id return the previous value and cannot fail loudly: ask again (-1 changes nothing)
    if _libc.setfsuid(-1 & 0xFFFFFFFF) != uid or _libc.setfsgid(-1 & 0xFFFFFFFF) != gid:
        raise OSError("could not take the caller's filesystem credentials")
