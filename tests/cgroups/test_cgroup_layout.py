"""Layout detection from mountinfo and /proc/self/cgroup texts of each kind of host."""

from __future__ import annotations

import os

from cgroups import detect
from cgroups.layout import V1_CONTROLLERS

V1_MOUNTS = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
"""
V1_PROC = """\
9:name=systemd:/system.slice/branchd.service
8:pids:/system.slice/branchd.service
6:freezer:/
4:memory:/system.slice/branchd.service
1:cpu,cpuacct:/system.slice
"""
V2_MOUNT = "41 31 0:38 / {point} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_hybrid(tmp_path: os.PathLike[str]) -> None:
    unified = os.path.join(tmp_path, "unified")
    os.makedirs(os.path.join(unified, "system.slice/branchd.service"))
    with open(os.path.join(unified, "system.slice/branchd.service/cgroup.controllers"), "w") as f:
        f.write("hugetlb\n")
    layout = detect(
        V1_MOUNTS + V2_MOUNT.format(point=unified),
        V1_PROC + "0::/system.slice/branchd.service\n",
    )
    assert layout.kind == "hybrid"
    assert layout.v2_dir == os.path.join(unified, "system.slice/branchd.service")
    assert layout.v2_controllers == {"hugetlb"}
    assert layout.v1_dir("memory") == "/sys/fs/cgroup/memory/system.slice/branchd.service"
    # co-mounted controllers share one directory
    cpu = "/sys/fs/cgroup/cpu,cpuacct/system.slice"
    assert layout.v1_dir("cpu") == layout.v1_dir("cpuacct") == cpu
    assert layout.v1_dir("freezer") == "/sys/fs/cgroup/freezer"
    assert layout.v1_dir("blkio") is None  # not mounted


def test_v1_only() -> None:
    layout = detect(V1_MOUNTS, V1_PROC)
    assert layout.kind == "v1"
    assert layout.v2_dir is None
    assert layout.v1_dir("pids") == "/sys/fs/cgroup/pids/system.slice/branchd.service"


def test_pure_v2(tmp_path: os.PathLike[str]) -> None:
    own = os.path.join(tmp_path, "user.slice/app.scope")
    os.makedirs(own)
    with open(os.path.join(own, "cgroup.controllers"), "w") as f:
        f.write("cpuset cpu io memory pids\n")
    layout = detect(V2_MOUNT.format(point=tmp_path), "0::/user.slice/app.scope\n")
    assert layout.kind == "v2"
    assert layout.v2_dir == own
    assert layout.v2_controllers == {"cpuset", "cpu", "io", "memory", "pids"}
    assert layout.v1 == ()


def test_none() -> None:
    layout = detect("22 27 0:21 / /proc rw,relatime - proc proc rw\n", "0::/\n")
    assert layout.kind == "none"
    assert layout.v2_dir is None and layout.v1 == ()


def test_container_mount_root_and_escapes(tmp_path: os.PathLike[str]) -> None:
    # a container sees only its own subtree, mounted with that subtree as root,
    # at a mount point whose name mountinfo escapes
    point = os.path.join(tmp_path, "cg root")
    os.makedirs(os.path.join(point, "app"))
    with open(os.path.join(point, "app", "cgroup.controllers"), "w") as f:
        f.write("memory pids\n")
    escaped = point.replace(" ", "\\040")
    mounts = f"41 31 0:38 /docker/abc {escaped} rw - cgroup2 cgroup2 rw\n"
    layout = detect(mounts, "0::/docker/abc/app\n")
    assert layout.v2_dir == os.path.join(point, "app")
    # a cgroup outside the mounted subtree is not reachable through it
    assert detect(mounts, "0::/elsewhere\n").kind == "none"


def test_this_host_matches_its_mounts() -> None:
    # checked against /proc/self/mounts, a file detect() does not read
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    has_v2 = any(m[2] == "cgroup2" for m in mounts)
    has_v1 = any(m[2] == "cgroup" and set(m[3].split(",")) & set(V1_CONTROLLERS) for m in mounts)
    expected = {(True, True): "hybrid", (False, True): "v2", (True, False): "v1"}
    layout = detect()
    assert layout.kind == expected.get((has_v1, has_v2), "none")
    for _, d in layout.v1:
        assert os.path.exists(os.path.join(d, "cgroup.procs"))
