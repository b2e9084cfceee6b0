"""Which cgroup hierarchies this host has, and where this process sits in them.

Read from /proc/self/mountinfo and /proc/self/cgroup only; nothing is created here.
The Manager picks, per limit, the v2 controller where the v2 tree offers it and
the v1 hierarchy otherwise, so one code path serves pure v2, hybrid and v1 hosts.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# The v1 hierarchies we use: limits (memory, cpu, pids, blkio), accounting
# (cpuacct) and stopping a tree without races (freezer).
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Layout:
    """The cgroup layout as seen by this process.

    kind is "v2" (unified tree only), "hybrid" (v1 controllers and a v2 tree),
    "v1" (no v2 tree) or "none". `v2_dir` is this process's own cgroup in the v2
    tree (None without one), `v2_controllers` what that cgroup offers its children
    (cgroup.controllers), `v1` maps a controller to this process's own cgroup
    directory in that v1 hierarchy.
    """

    kind: str
    v2_dir: str | None = None
    v2_controllers: frozenset[str] = frozenset()
    v1: tuple[tuple[str, str], ...] = field(default=())

    def v1_dir(self, controller: str) -> str | None:
        return dict(self.v1).get(controller)


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        pre, post = left.split(), right.split()
        if len(pre) < 5 or len(post) < 3 or post[0] not in ("cgroup", "cgroup2"):
            continue
        root, point = _unescape(pre[3]), _unescape(pre[4])
        found.append((post[0], root, point, set(post[2].split(","))))
    return found


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as three octal digits
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), path)


def _inside(point: str, root: str, path: str) -> str | None:
    """The directory of cgroup `path` in a mount of `root` at `point`, if visible there."""
    rel = os.path.relpath(path, root)
    if rel == ".":
        return point
    if rel.startswith(".."):
        return None
    return os.path.join(point, rel)


def detect(mountinfo: str | None = None, proc_cgroup: str | None = None) -> Layout:
    """The layout of this host (the arguments are for reading another process's view)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    if proc_cgroup is None:
        with open("/proc/self/cgroup") as f:
            proc_cgroup = f.read()

    own_v2: str | None = None
    own_v1: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if hier == "0" and not names:
            own_v2 = path
        else:
            for name in names.split(","):
                own_v1[name] = path

    v2_dir = None
    v1: dict[str, str] = {}
    for fstype, root, point, opts in _mounts(mountinfo):
        if fstype == "cgroup2":
            if own_v2 is not None and v2_dir is None:
                v2_dir = _inside(point, root, own_v2)
            continue
        for name in V1_CONTROLLERS:
            if name in opts and name in own_v1 and name not in v1:
                where = _inside(point, root, own_v1[name])
                if where is not None:
                    v1[name] = where

    controllers: frozenset[str] = frozenset()
    if v2_dir is not None:
        try:
            with open(os.path.join(v2_dir, "cgroup.controllers")) as f:
                controllers = frozenset(f.read().split())
        except OSError as exc:
            log.debug("cannot read cgroup.controllers in %s: %s", v2_dir, exc)
            v2_dir = None

    if v2_dir is not None:
        kind = "hybrid" if v1 else "v2"
    else:
        kind = "v1" if v1 else "none"
    return Layout(kind, v2_dir, controllers, tuple(sorted(v1.items())))
