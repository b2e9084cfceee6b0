"""v2 delegation: enabling controllers down our subtree, and moving the daemon into a leaf.

This host's unified tree offers one controller, hugetlb (every other one is
bound to v1), so that is the controller these tests delegate: the v2 limits
themselves (memory.max, cpu.max, pids.max, io.weight) cannot be run here.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from cgroup_helpers import PREFIX, layout_for, py, remove_tree

from cgroups.cgroup import write

pytestmark = pytest.mark.cgroup

# A daemon-like process: it enters cgroup T (non-root, so the no-internal-process
# rule applies), then asks for hugetlb in T's subtree_control as a Manager does.
DELEGATE = """
import json, os, sys
from cgroups import Layout, Manager
from cgroups.cgroup import Cgroup
own = sys.argv[1]
with open(os.path.join(own, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
m = Manager(sys.argv[2], layout=Layout("v2", v2_dir=own, v2_controllers=frozenset({"hugetlb"})))
enabled = m._enable_own_v2(own, frozenset({"hugetlb"}))
base = Cgroup.create(own, {}, "base", enabled)
base.enable(enabled)
with open("/proc/self/cgroup") as f:
    me = f.read().strip()
with open(os.path.join(base.v2, "cgroup.subtree_control")) as f:
    base_control = f.read().split()
base.remove()
m.close()
print(json.dumps({"enabled": sorted(enabled), "cgroup": me, "base": base_control,
                  "warnings": m.warnings}))
"""


@pytest.fixture
def delegated_root() -> Iterator[str]:
    """A test cgroup T under the unified root, with hugetlb available to it."""
    layout = layout_for("v2-only")
    assert layout.v2_dir is not None
    if "hugetlb" not in layout.v2_controllers:
        pytest.skip("the v2 tree here offers no controller to delegate")
    root_control = os.path.join(layout.v2_dir, "cgroup.subtree_control")
    with open(root_control) as f:
        was_enabled = "hugetlb" in f.read().split()
    path = os.path.join(layout.v2_dir, f"{PREFIX}-delegation")
    os.mkdir(path)
    try:
        if not was_enabled:
            write(root_control, "+hugetlb")
        yield path
    finally:
        remove_tree(path)
        if not was_enabled:
            write(root_control, "-hugetlb")


def test_daemon_moves_into_a_leaf_to_delegate(delegated_root: str) -> None:
    proc = subprocess.run(
        [*py(DELEGATE), delegated_root, f"{PREFIX}-delegate"],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["enabled"] == ["hugetlb"]
    assert report["warnings"] == []
    # it moved itself out of T, into T/supervisor, so T could delegate
    assert report["cgroup"].endswith(f"/{os.path.basename(delegated_root)}/supervisor")
    assert report["base"] == ["hugetlb"]
    with open(os.path.join(delegated_root, "cgroup.subtree_control")) as f:
        assert f.read().split() == ["hugetlb"]


def test_delegation_refused_while_others_share_our_cgroup(
    delegated_root: str, started: list[int]
) -> None:
    # another process in T: moving ourselves out is not enough, the Manager says so
    other = subprocess.Popen(["sleep", "60"])
    started.append(other.pid)
    with open(os.path.join(delegated_root, "cgroup.procs"), "w") as f:
        f.write(str(other.pid))
    proc = subprocess.run(
        [*py(DELEGATE), delegated_root, f"{PREFIX}-refused"],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["enabled"] == []
    assert report["base"] == []
    assert (
        len(report["warnings"]) == 1
        and "cannot enable the v2 controllers hugetlb" in (report["warnings"][0])
    )
    other.kill()
    other.wait()
