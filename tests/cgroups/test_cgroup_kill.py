"""Stopping whole trees on each code path: v2 cgroup.kill, the v1 freezer dance, the layout found.

`any_layout` runs every test on this host's layout, on its v1 hierarchies
alone (freezer) and on its v2 tree alone (cgroup.kill, cgroup.freeze).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from cgroup_helpers import DOUBLE_FORK, gone, py, read_pid, wait_for

from cgroups import Layout, Limits, Manager
from cgroups.cgroup import read_keyed

pytestmark = pytest.mark.cgroup

BOMB = "b() { b & b & wait; }; while :; do b; done"


def test_kill_group_kills_double_forked_daemon(
    make_manager: Callable[..., Manager], any_layout: Layout, tmp_path: os.PathLike[str]
) -> None:
    manager = make_manager(any_layout)
    pidfile = os.path.join(tmp_path, "daemon.pid")
    run = manager.spawn(py(DOUBLE_FORK) + [pidfile, "stay"], cwd="/", group="branch-a")
    other = manager.spawn(["sleep", "60"], cwd="/", group="branch-b")
    daemon = read_pid(pidfile)
    assert os.getsid(daemon) != run.pid  # it left the run's session: only the cgroup holds it
    assert manager.runs("branch-a") == [run]
    assert run.cgroup is not None
    expected = "freezer" if any_layout.kind == "v1" else "cgroup.kill"
    assert run.cgroup.kill_method == expected

    assert manager.kill_group("branch-a", "discard") >= 2
    result = run.wait(10)
    assert result is not None and result.killed and result.signal == signal.SIGKILL
    assert result.ended_by == "discard"
    assert gone(daemon) and gone(run.pid)
    assert manager.runs("branch-a") == []
    # the other group lives on
    assert other.poll() is None and not gone(other.pid)


def test_run_end_kills_what_it_left_behind(
    make_manager: Callable[..., Manager], any_layout: Layout, tmp_path: os.PathLike[str]
) -> None:
    manager = make_manager(any_layout)
    pidfile = os.path.join(tmp_path, "daemon.pid")
    run = manager.spawn(py(DOUBLE_FORK) + [pidfile, "leave"], cwd="/")
    result = run.wait(10)
    assert result is not None and result.exit_code == 0 and not result.killed
    assert result.ended_by == "exit"  # killing what it left is no kill of the run
    daemon = read_pid(pidfile)
    assert gone(daemon)
    assert run.cgroup is not None and not any(os.path.exists(d) for d in run.cgroup.dirs)


def test_timeout_kills_the_tree(
    make_manager: Callable[..., Manager], any_layout: Layout, tmp_path: os.PathLike[str]
) -> None:
    manager = make_manager(any_layout)
    pidfile = os.path.join(tmp_path, "daemon.pid")
    # the shell's double fork takes a millisecond, far less than the timeout
    # (python's would take long enough on a loaded machine to race with it)
    double_fork = '(setsid sleep 1000 & echo $! > "$1"); exec sleep 1000'
    run = manager.spawn(["sh", "-c", double_fork, "sh", pidfile], cwd="/", limits=Limits(timeout=1))
    daemon = read_pid(pidfile)
    assert not gone(daemon)
    result = run.wait(30)
    assert result is not None and result.timed_out and not result.killed
    assert result.ended_by == "timeout"
    assert result.signal == signal.SIGKILL and result.duration >= 1
    assert gone(daemon)


def test_kill_one_run_spares_its_group(
    make_manager: Callable[..., Manager], any_layout: Layout
) -> None:
    manager = make_manager(any_layout)
    a = manager.spawn(["sleep", "60"], cwd="/", group="g")
    b = manager.spawn(["sleep", "60"], cwd="/", group="g")
    a.kill()
    result = a.wait(10)
    assert result is not None and result.killed and result.ended_by == "kill"
    assert b.poll() is None and not gone(b.pid)
    a.kill()  # a no-op once ended
    assert manager.kill_group("g") == 1


def test_ended_by_names_the_first_cause(
    make_manager: Callable[..., Manager], any_layout: Layout
) -> None:
    manager = make_manager(any_layout)
    first = manager.spawn(["sleep", "60"], cwd="/")
    first.kill("commit")
    first.kill("discard")  # a later reason does not replace the first
    result = first.wait(10)
    assert result is not None and result.killed and result.ended_by == "commit"
    selfkill = manager.spawn(["sh", "-c", "kill -TERM $$"], cwd="/")
    result = selfkill.wait(10)
    assert result is not None and result.signal == signal.SIGTERM
    assert result.ended_by == "signal" and not result.killed
    left = manager.spawn(["sleep", "60"], cwd="/")
    manager.close()
    result = left.wait(10)
    assert result is not None and result.killed and result.ended_by == "shutdown"


@pytest.mark.timeout(60)
def test_fork_bomb_is_killed(make_manager: Callable[..., Manager], any_layout: Layout) -> None:
    manager = make_manager(any_layout)
    if manager.unenforced(Limits(pids=64)):
        pytest.skip("no pids controller on this path")
    # python waits (it never forks again) while its shell child bombs
    bomb = manager.spawn(
        py(f"import subprocess, time; subprocess.Popen(['sh', '-c', {BOMB!r}]); time.sleep(1000)"),
        cwd="/",
        limits=Limits(pids=64),
        stderr=subprocess.DEVNULL,
    )
    assert bomb.cgroup is not None
    d = bomb.cgroup.v1.get("pids") or bomb.cgroup.v2
    assert d is not None
    wait_for(lambda: read_keyed(os.path.join(d, "pids.events")).get("max", 0) > 0, "pids.max hit")
    bomb.kill()
    result = bomb.wait(10)
    assert result is not None and result.killed
    assert not any(os.path.exists(d) for d in bomb.cgroup.dirs)


def test_freeze_and_thaw(
    make_manager: Callable[..., Manager], any_layout: Layout, tmp_path: os.PathLike[str]
) -> None:
    manager = make_manager(any_layout)
    counter = os.path.join(tmp_path, "counter")
    code = (
        "import os, sys\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1\n"
        "    with open(sys.argv[1] + '.tmp', 'w') as f: f.write(str(n))\n"
        "    os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
    )
    run = manager.spawn(py(code) + [counter], cwd="/")

    def count() -> int:
        with open(counter) as f:
            return int(f.read())

    wait_for(lambda: os.path.exists(counter), "the counter")
    run.freeze()
    frozen_at = count()
    time.sleep(0.2)
    assert count() == frozen_at  # a frozen run makes no progress
    run.thaw()
    wait_for(lambda: count() > frozen_at, "progress after thaw")
    run.kill()
    assert run.wait(10) is not None
