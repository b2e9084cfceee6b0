"""Limits really enforced on this host: memory (OOM), pids (fork bomb), CPU quota.

Each test reads the kernel's own counters (memory.oom_control / memory.events,
pids.events, cpu.stat) besides the RunResult, so that a limit that was written
but not enforced fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from cgroup_helpers import py, wait_for

from cgroups import Limits, Manager
from cgroups.cgroup import read_keyed, write

pytestmark = pytest.mark.cgroup

BOMB = "b() { b & b & wait; }; while :; do b; done"


def _needs(manager: Manager, limit: str) -> None:
    if manager.unenforced(Limits.from_dict({limit: {"memory": 64 << 20}.get(limit, 1)})):
        pytest.skip(f"{limit} cannot be enforced on this host")


def test_memory_hog_is_oom_killed_and_nothing_else(manager: Manager, tmp_path: object) -> None:
    _needs(manager, "memory")
    sibling = manager.spawn(["sleep", "60"], cwd="/", group="sibling")
    hog = manager.spawn(
        py("x = 'x' * (512 << 20); print('allocated')"),
        cwd="/",
        group="hog",
        limits=Limits(memory="64M"),
        stdout=subprocess.DEVNULL,
    )
    result = hog.wait(30)
    assert result is not None
    assert result.oom_killed
    assert result.signal == signal.SIGKILL and result.returncode == 128 + 9
    assert not result.timed_out and not result.killed and result.ended_by == "oom"
    assert result.peak_memory is not None and result.peak_memory <= 64 << 20
    # the sibling run and this process are untouched
    assert sibling.poll() is None
    assert os.path.exists(f"/proc/{sibling.pid}")
    sibling.kill()
    done = sibling.wait(10)
    assert done is not None and done.killed and not done.oom_killed


def test_memory_within_limit_runs_to_the_end(manager: Manager) -> None:
    _needs(manager, "memory")
    run = manager.spawn(py("x = 'x' * (16 << 20)"), cwd="/", limits=Limits(memory="256M"))
    result = run.wait(30)
    assert result is not None and result.exit_code == 0 and not result.oom_killed
    # the 16M string was charged to the run's cgroup
    assert result.peak_memory is not None and result.peak_memory >= 16 << 20


@pytest.mark.timeout(60)
def test_fork_bomb_stops_at_pids_max(manager: Manager) -> None:
    _needs(manager, "pids")
    # python waits (it never forks again) while its shell child bombs
    bomb = manager.spawn(
        py(f"import subprocess, time; subprocess.Popen(['sh', '-c', {BOMB!r}]); time.sleep(1000)"),
        cwd="/",
        limits=Limits(pids=64, timeout=30),  # the bound, should the test fail
        stderr=subprocess.DEVNULL,
    )
    assert bomb.cgroup is not None
    d = bomb.cgroup.v1.get("pids") or bomb.cgroup.v2
    assert d is not None
    # the kernel refused forks at the limit ("max" counts refusals) ...
    wait_for(lambda: read_keyed(os.path.join(d, "pids.events")).get("max", 0) > 0, "pids.max hit")
    # ... and never let the tree grow past it
    with open(os.path.join(d, "pids.current")) as f:
        assert int(f.read()) <= 64
    assert bomb.poll() is None  # the limit stopped the bomb, not its own end
    bomb.kill()
    result = bomb.wait(30)
    assert result is not None and result.killed and result.signal == signal.SIGKILL
    assert not any(os.path.exists(x) for x in bomb.cgroup.dirs)


@pytest.mark.timeout(60)
def test_cpu_burner_gets_its_quota(manager: Manager) -> None:
    _needs(manager, "cpus")
    burner = manager.spawn(py("while True: pass"), cwd="/", limits=Limits(cpus=0.1, timeout=30))
    assert burner.cgroup is not None
    cpu_dir = burner.cgroup.v1.get("cpu") or burner.cgroup.v2
    assert cpu_dir is not None
    # The highest scheduling weight, so that on a busy machine the quota and
    # not the competition is what holds the burner back.
    for knob, weight in (("cpu.shares", "262144"), ("cpu.weight", "10000")):
        if os.path.exists(os.path.join(cpu_dir, knob)):
            write(os.path.join(cpu_dir, knob), weight)
    # the scheduler throttled it: this is enforcement, whatever the machine's speed
    wait_for(
        lambda: read_keyed(os.path.join(cpu_dir, "cpu.stat")).get("nr_throttled", 0) > 0,
        "CFS throttling",
    )
    used, start = burner.cgroup.cpu_time(), time.monotonic()
    assert used is not None
    time.sleep(2)
    now = burner.cgroup.cpu_time()
    assert now is not None
    share = (now - used) / (time.monotonic() - start)
    burner.kill()
    assert burner.wait(10) is not None
    # a tenth of a core, in a generous band (unthrottled it would be up to 1.0)
    assert 0 < share < 0.3, share


def test_io_weight_is_set_or_warned(manager: Manager) -> None:
    run = manager.spawn(["true"], cwd="/", limits=Limits(io_weight=200))
    assert run.wait(10) is not None
    if manager.unenforced(Limits(io_weight=200)):
        assert sum("io_weight" in w for w in manager.warnings) == 1
    else:
        assert not any("io_weight" in w for w in manager.warnings)
