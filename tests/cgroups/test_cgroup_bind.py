"""Private mount namespaces: a branch bound over the workspace's real path, per run.

Plain directories stand in for the FUSE branch views (the daemon's tests do
the FUSE integration); a tmpfs stands in for the FUSE mount where mount
propagation matters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cgroup_helpers import wait_for

from cgroups import Manager, SpawnError
from cgroups.spawn import Bind

pytestmark = pytest.mark.cgroup


@pytest.fixture
def manager(manager: Manager) -> Manager:
    if why := manager.bind_unavailable:
        pytest.skip(why)
    return manager


def mount_points(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line.split()[4] for line in f]


def tmpfs_at(pid: int | str, point: str) -> bool:
    """A tmpfs is mounted at `point` in the mount namespace of `pid`."""
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields, _, fs = line.partition(" - ")
            if fields.split()[4] == point and fs.split()[0] == "tmpfs":
                return True
    return False


def output(path: Path) -> str:
    return path.read_text()


def test_groups_see_only_their_own_branch(manager: Manager, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    views = tmp_path / "views"  # as <mountpoint>/<workspace>/<branch>
    ws.mkdir()
    (ws / "base.txt").write_text("base\n")
    for b in ("a", "b"):
        shutil.copytree(ws, views / b)

    b_run = manager.spawn(
        ["sh", "-c", "echo B > marker.txt && exec sleep 60"],
        cwd=str(ws), group="B", bind=Bind(str(views / "b"), str(ws)), hide=[str(views)],
    )  # fmt: skip
    wait_for(lambda: (views / "b" / "marker.txt").exists(), "B's write")
    assert str(ws) not in mount_points("self")  # B's bind stays in B's namespace

    out = tmp_path / "a.out"
    with open(out, "wb") as f:
        a_run = manager.spawn(
            ["sh", "-c", f"ls; cat base.txt; ls {views} | wc -l; echo A > a.txt; cat marker.txt"],
            cwd=str(ws), group="A", stdout=f.fileno(), stderr=subprocess.STDOUT,
            bind=Bind(str(views / "a"), str(ws)), hide=[str(views)],
        )  # fmt: skip
    result = a_run.wait(30)
    assert result is not None
    lines = output(out).splitlines()
    assert lines[:3] == ["base.txt", "base", "0"]  # own branch; the views are hidden
    assert "marker.txt" in lines[3] and result.exit_code != 0  # B's write is not visible
    assert (views / "a" / "a.txt").read_text() == "A\n"
    assert not (views / "b" / "a.txt").exists()
    assert not (ws / "a.txt").exists() and not (ws / "marker.txt").exists()
    assert b_run.poll() is None
    # B's namespace still shows B's branch at the workspace path
    assert str(ws) in mount_points(b_run.pid)


def test_venv_with_absolute_shebangs_runs_from_the_branch(manager: Manager, tmp_path: Path) -> None:
    ws = tmp_path / "project"
    (ws / "venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, ws / "venv" / "bin" / "python")
    tool = ws / "venv" / "bin" / "tool"
    script = f"#!{ws}/venv/bin/python\nprint('{{}}')\nopen('{ws}/out.txt', 'w').write('written')\n"
    tool.write_text(script.format("base"))
    tool.chmod(0o755)
    branch = tmp_path / "branch"
    shutil.copytree(ws, branch, symlinks=True)
    (branch / "venv" / "bin" / "tool").write_text(script.format("branch"))

    out = tmp_path / "out"
    with open(out, "wb") as f:
        run = manager.spawn(
            [str(tool)], cwd=str(ws), bind=Bind(str(branch), str(ws)), stdout=f.fileno()
        )
    result = run.wait(30)
    assert result is not None and result.exit_code == 0
    assert output(out) == "branch\n"  # the branch's copy of the tool ran
    assert (branch / "out.txt").read_text() == "written"
    assert not (ws / "out.txt").exists()


def test_relative_writes_from_a_cwd_under_the_target(manager: Manager, tmp_path: Path) -> None:
    ws, branch = tmp_path / "ws", tmp_path / "branch"
    (ws / "sub").mkdir(parents=True)
    (branch / "sub").mkdir(parents=True)
    run = manager.spawn(
        ["sh", "-c", "echo x > here.txt"], cwd=str(ws / "sub"), bind=Bind(str(branch), str(ws))
    )
    result = run.wait(30)
    assert result is not None and result.exit_code == 0
    assert (branch / "sub" / "here.txt").exists() and not (ws / "sub" / "here.txt").exists()


@pytest.mark.parametrize("shared", [True, False])
def test_mount_events_reach_candidates_only_under_a_shared_mountpoint(
    manager: Manager, tmpfs: Callable[..., str], tmp_path: Path, shared: bool
) -> None:
    # This host's root mount is private: a FUSE mount (here a tmpfs) on a plain
    # directory is private too, and neither a later mount below it nor its
    # unmount reaches a running candidate; on a mountpoint prepared with
    # share_mountpoint both do.
    mnt = tmpfs("fuse", shared_parent=shared)
    os.makedirs(os.path.join(mnt, "ws", "br"))
    late = os.path.join(mnt, "ws", "late")
    os.mkdir(late)
    ws = tmp_path / "ws"
    ws.mkdir()
    run = manager.spawn(["sleep", "60"], cwd=str(ws),
                        bind=Bind(os.path.join(mnt, "ws", "br"), str(ws)))
    assert tmpfs_at(run.pid, mnt)

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "late", late], check=True)
    assert tmpfs_at(run.pid, late) == shared
    subprocess.run(["umount", late], check=True)
    subprocess.run(["umount", "-l", mnt], check=True)
    assert tmpfs_at(run.pid, mnt) != shared
    # the branch stays bound at the workspace path until the run ends
    assert str(ws) in mount_points(run.pid)
    run.kill()
    assert run.wait(10) is not None


def test_bind_failure_is_a_spawn_error(manager: Manager, tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="cannot open the branch"):
        manager.spawn(
            ["true"], cwd=str(tmp_path), bind=Bind(str(tmp_path / "missing"), str(tmp_path)),
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    assert manager.runs() == []


def test_a_target_swapped_for_a_symlink_is_not_mounted_over(manager: Manager,
                                                            tmp_path: Path) -> None:
    ws, branch, system = tmp_path / "ws", tmp_path / "branch", tmp_path / "system"
    for d in (ws, branch, system):
        d.mkdir()
    (branch / "f").write_text("forged\n")
    (system / "f").write_text("system\n")
    held = os.open(ws, os.O_PATH | os.O_DIRECTORY)
    try:
        os.rename(ws, tmp_path / "ws.real")  # after the caller opened it: the attacker's swap
        os.symlink(system, ws)
        with pytest.raises(SpawnError, match="moved or replaced"):
            manager.spawn(["cat", f"{ws}/f"], cwd="/", bind=Bind(str(branch), str(ws), held))
        os.unlink(ws)  # the same swap through an intermediate directory component
        os.rename(tmp_path / "ws.real", ws)
        with pytest.raises(SpawnError, match="moved or replaced"):
            manager.spawn(["true"], cwd="/", bind=Bind(str(branch), str(system), held))
        out = tmp_path / "out"
        with open(out, "wb") as f:
            run = manager.spawn(["cat", f"{ws}/f"], cwd="/", stdout=f.fileno(),
                                bind=Bind(str(branch), str(ws), held))
        result = run.wait(30)
        assert result is not None and result.exit_code == 0
        assert out.read_text() == "forged\n"  # the real directory: bound as asked
    finally:
        os.close(held)
    assert (system / "f").read_text() == "system\n"
