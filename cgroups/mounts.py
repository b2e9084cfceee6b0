"""Preparing the daemon's FUSE mountpoint so that mount events reach candidates' namespaces.

A candidate with `bind=` runs in its own mount namespace whose mounts are
slaves of the host's. Propagation happens per parent mount: a mount or
unmount at a path reaches a namespace only if the mount *containing* that
path is shared. Hosts booted without systemd (containers, this CI) have a
private root, so the daemon makes its mountpoint directory a shared bind
mount of itself before mounting FUSE on it; then unmounting FUSE, and any
mount made below it later, reach running candidates too.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess

from .errors import CgroupError

log = logging.getLogger(__name__)
_OCTAL = re.compile(r"\\([0-7]{3})")


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CgroupError(f"mount {' '.join(args)} failed: {proc.stderr.strip()}")


def share_mountpoint(path: str) -> None:
    """Make the directory `path` a shared mount (a bind of itself); call before mounting FUSE."""
    _mount("--bind", path, path)
    _mount("--make-shared", path)
    log.debug("made %s a shared mount point", path)


def release_mountpoint(path: str) -> None:
    """Undo `share_mountpoint` once FUSE is unmounted from `path`."""
    proc = subprocess.run(["umount", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CgroupError(f"umount {path} failed: {proc.stderr.strip()}")


def mounted(path: str) -> bool:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes
    with open("/proc/self/mounts") as f:
        return any(_OCTAL.sub(lambda m: chr(int(m[1], 8)), line.split()[1]) == path for line in f)


def detach(path: str) -> None:
    """Lazily unmount everything stacked at `path`: a dead FUSE mount left by a killed
    daemon and the shared bind mount beneath it. Never raises; logs what stays."""
    for _ in range(8):  # a FUSE mount over a shared bind: a few layers at most
        if not mounted(path):
            return
        tool = ["umount", "-l"] if os.geteuid() == 0 else ["fusermount3", "-u", "-z"]
        proc = subprocess.run([*tool, path], capture_output=True, text=True)
        if proc.returncode != 0:
            log.warning("cannot detach %s: %s", path, proc.stderr.strip())
            return
