"""An embedded daemon dies with its owner: an agent killed with SIGKILL leaves nothing.

The owner is a real process (a Python script) that opens a Workspace (so starts
an embedded daemon), makes a branch, starts a long run in it, and is then
killed with SIGKILL. The daemon watches its owner through a pidfd and stops as
on SIGTERM: no mount, no overlay, no cgroup, no run and no entry process left,
and no temporary directory (the daemon removes the one made for it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

OWNER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from branching import Workspace
    ws = Workspace(sys.argv[1])
    b = ws.create("left")
    (b.path / "f").write_text("x")
    run = ws.client.call("exec", workspace=ws.name, name="left", argv=["sleep", "300"],
                         detach=True)
    d = ws._embedded
    print(json.dumps({"daemon": d.proc.pid, "mnt": str(d.mountpoint), "run": run["pid"],
                      "branch": str(b.path), "root": str(d.root)}), flush=True)
    time.sleep(300)
    """)


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out.update(int(c) for c in f.read().split())
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigkill_of_the_owner_leaves_no_daemon_mount_cgroup_or_process(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(root)], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
        daemon = info["daemon"]
        # the run and the entry processes waiting in the pool, which the daemon refills
        # after a run's hand-over, on its own thread: wait for it
        deadline = time.monotonic() + 30
        while len(left := children(daemon)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert info["run"] in left and len(left) > 1
        with open(f"/proc/{info['run']}/cgroup") as f:
            cgroups = [line.strip().split(":", 2)[2] for line in f]
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 60
        while any(alive(p) for p in (daemon, *left)):
            assert time.monotonic() < deadline, "the daemon or its processes outlived the owner"
            time.sleep(0.05)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    with open("/proc/self/mounts") as f:
        mounts = f.read()
    assert info["mnt"] not in mounts and info["branch"] not in mounts
    # its temporary root, which the dead owner would have removed, is gone too
    assert not os.path.exists(info["root"]), os.listdir(info["root"])
    own_run = [c for c in cgroups if "/run." in c]
    assert own_run, cgroups
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for c in own_run:
            assert not (hierarchy / c.lstrip("/")).exists(), c
