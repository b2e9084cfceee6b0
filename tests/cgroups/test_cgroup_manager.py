"""The Manager's contract: placement before the candidate runs, fds/env/cwd, warnings,
errors, threads, and cleanup (close, stale trees, layouts without cgroups)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import trio
import trio.testing
from cgroup_helpers import PREFIX, gone, layout_for, need_root, py, wait_for

from cgroups import CgroupError, Layout, Limits, Manager, RunResult, SpawnError

pytestmark = pytest.mark.cgroup


def run_output(manager: Manager, argv: list[str], tmp_path: Path, **kw: object) -> str:
    out = tmp_path / "out"
    with open(out, "wb") as f:
        run = manager.spawn(argv, stdout=f.fileno(), **kw)  # type: ignore[arg-type]
    result = run.wait(30)
    assert result is not None and result.exit_code == 0, result
    return out.read_text()


def test_candidate_starts_inside_its_cgroups(
    make_manager: Callable[..., Manager], any_layout: Layout, tmp_path: Path
) -> None:
    # cat's own first look at /proc/self/cgroup already shows the run's cgroup in
    # every hierarchy: no instant of the candidate ran outside it
    manager = make_manager(any_layout)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        run = manager.spawn(["cat", "/proc/self/cgroup"], cwd="/", stdout=f.fileno())
    assert run.wait(30) is not None
    lines = out.read_text().splitlines()
    assert run.cgroup is not None
    placed = [line for line in lines if line.endswith(f"/{manager.name}/{run.id}")]
    # one line per hierarchy; co-mounted controllers share a line and a directory
    assert len(placed) == len(run.cgroup.dirs) >= 1


def test_fds_env_cwd(manager: Manager, tmp_path: Path) -> None:
    (tmp_path / "in").write_text("from stdin\n")
    out, err = tmp_path / "o", tmp_path / "e"
    with open(tmp_path / "in", "rb") as i, open(out, "wb") as o, open(err, "wb") as e:
        run = manager.spawn(
            ["sh", "-c", "cat; pwd; echo \"$ONLY:${HOME-unset}\"; echo oops >&2; exit 7"],
            cwd=str(tmp_path), env={"ONLY": "this", "PATH": "/usr/bin:/bin"},
            stdin=i.fileno(), stdout=o.fileno(), stderr=e.fileno(),
        )  # fmt: skip
    result = run.wait(30)
    assert isinstance(result, RunResult)
    assert result.exit_code == 7 and result.returncode == 7 and result.signal is None
    assert out.read_text() == f"from stdin\n{tmp_path}\nthis:unset\n"
    assert err.read_text() == "oops\n"
    d = result.to_dict()
    assert d["returncode"] == 7 and d["exit_code"] == 7 and d["cpu_time"] is not None


def test_own_session_and_process_group(manager: Manager, tmp_path: Path) -> None:
    run = manager.spawn(["sleep", "60"], cwd="/")
    assert os.getsid(run.pid) == run.pid and os.getpgid(run.pid) == run.pid
    run.kill()
    assert run.wait(10) is not None


def test_missing_command_and_cwd(manager: Manager, tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="cannot enter"):
        manager.spawn(["true"], cwd=str(tmp_path / "missing"))
    run = manager.spawn(["no-such-command-xyz"], cwd="/", stderr=subprocess.DEVNULL)
    result = run.wait(30)
    assert result is not None and result.exit_code == 127  # "not found", as a shell says it
    with pytest.raises(SpawnError, match="empty"):
        manager.spawn([], cwd="/")
    assert manager.runs() == []


def test_placement_failure_kills_the_shim(
    make_manager: Callable[..., Manager], tmp_path: Path
) -> None:
    # A layout pointing at a plain directory: mkdir works there but there is no
    # cgroup.procs to write, a real placement failure (no fake involved).
    fake_root = tmp_path / "not-a-cgroup"
    fake_root.mkdir()
    manager = make_manager(Layout("v1", v1=(("pids", str(fake_root)),)))
    marker = f"6{os.getpid()}"  # an argument no other process has
    with pytest.raises(SpawnError, match="cannot place"):
        manager.spawn(["sleep", marker], cwd="/")
    for p in psutil.process_iter(["cmdline"]):
        assert marker not in (p.info["cmdline"] or []) or gone(p.pid)
    assert manager.runs() == []
    assert os.listdir(fake_root / manager.name) == []  # the run's directory was removed


def test_unenforceable_limits_warn_once(
    make_manager: Callable[..., Manager], caplog: pytest.LogCaptureFixture
) -> None:
    v2 = layout_for("v2-only")
    if {"memory", "pids"} <= v2.v2_controllers:
        pytest.skip("this host's v2 tree enforces everything")
    manager = make_manager(v2)
    limits = Limits(memory="1G", pids=100)
    with caplog.at_level(logging.WARNING, logger="cgroups"):
        for _ in range(2):
            run = manager.spawn(["true"], cwd="/", limits=limits)
            result = run.wait(30)
            assert result is not None and result.exit_code == 0  # it still runs
    reasons = manager.unenforced(limits)
    assert reasons and all("cannot be enforced" in r for r in reasons)
    assert manager.warnings == reasons
    assert len([r for r in caplog.records if "cannot be enforced" in r.getMessage()]) == len(
        reasons
    )


def session(sid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True)
    return found.stdout.split()


def test_no_cgroups_at_all(make_manager: Callable[..., Manager], tmp_path: Path) -> None:
    manager = make_manager(Layout("none"))
    assert any("race-free" in w for w in manager.warnings)
    assert manager.unenforced(Limits(memory="1G", cpus=1, pids=1, io_weight=1)) != []
    run = manager.spawn(["sh", "-c", "sleep 60 & sleep 60"], cwd="/", group="g")
    wait_for(lambda: len(session(run.pid)) == 3, "the tree")
    assert manager.kill_group("g") == 3  # shell, its background sleep, its foreground sleep
    result = run.wait(10)
    assert result is not None and result.killed and result.signal == 9
    assert result.peak_memory is None and result.cpu_time is None


def test_threads_spawn_and_wait_concurrently(manager: Manager) -> None:
    results: list[RunResult | None] = []
    lock = threading.Lock()

    def one() -> None:
        for _ in range(5):
            r = manager.spawn(["true"], cwd="/", group=threading.current_thread().name)
            res = r.wait(30)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=one, name=f"t{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 30
    assert all(r is not None and r.exit_code == 0 for r in results)
    assert manager.runs() == []


def test_close_kills_and_removes_everything(
    make_manager: Callable[..., Manager], any_layout: Layout
) -> None:
    manager = make_manager(any_layout)
    runs = [manager.spawn(["sleep", "60"], cwd="/", group=f"g{i}") for i in range(3)]
    base = [os.path.dirname(d) for d in runs[0].cgroup.dirs]  # type: ignore[union-attr]
    manager.close()
    for run in runs:
        result = run.poll()
        assert result is not None and result.killed
    assert not any(os.path.exists(d) for d in base)
    with pytest.raises(CgroupError, match="closed"):
        manager.spawn(["true"], cwd="/")
    manager.close()  # idempotent


def test_name_is_exclusive(make_manager: Callable[..., Manager]) -> None:
    manager = make_manager()
    with pytest.raises(ValueError, match="already exists"):
        Manager(manager.name, layout=manager.layout)
    with pytest.raises(ValueError, match="invalid manager name"):
        Manager("../escape", layout=manager.layout)


def test_stale_tree_of_a_crashed_daemon_is_removed(
    make_manager: Callable[..., Manager], started: list[int]
) -> None:
    layout = layout_for("v2-only")
    assert layout.v2_dir is not None
    name = f"{PREFIX}-stale"
    stale = os.path.join(layout.v2_dir, name, "old.1")
    os.makedirs(stale)
    proc = subprocess.Popen(["sleep", "60"])
    started.append(proc.pid)
    with open(os.path.join(stale, "cgroup.procs"), "w") as f:
        f.write(str(proc.pid))
    manager = make_manager(layout, name=name)
    assert proc.wait(10) == -9  # the previous owner's candidate is gone
    assert not os.path.exists(stale)
    run = manager.spawn(["true"], cwd="/")
    assert run.wait(10) is not None


def test_result_of_v1_only_layout_measures_with_cpuacct(
    make_manager: Callable[..., Manager],
) -> None:
    layout = layout_for("v1-only")
    if layout.v1_dir("cpuacct") is None:
        pytest.skip("no cpuacct hierarchy")
    manager = make_manager(replace(layout))
    run = manager.spawn(py("sum(range(10**6))"), cwd="/")
    result = run.wait(30)
    assert result is not None and result.exit_code == 0
    assert result.cpu_time is not None and result.cpu_time > 0


def test_without_root_runs_unlimited_and_says_so(tmp_path: Path, user_python: str) -> None:
    # a real unprivileged process (setpriv to nobody), not a simulated permission error
    need_root()
    code = (
        "import json, sys\n"
        "from cgroups import Limits, Manager\n"
        f"m = Manager({PREFIX + '-nobody'!r})\n"
        "r = m.spawn(['true'], cwd='/', limits=Limits(memory='1G', timeout=30)).wait(30)\n"
        "m.close()\n"
        "print(json.dumps({'warnings': m.warnings, 'exit': r.exit_code, 'killed': r.killed}))\n"
    )
    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", user_python, "-c",
         code], cwd="/",
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit"] == 0 and not report["killed"]
    assert any("cannot use the cgroup" in w for w in report["warnings"])
    assert any(w.startswith("memory limit cannot be enforced") for w in report["warnings"])


@pytest.mark.trio
async def test_from_trio(manager: Manager) -> None:
    # the daemon's way: spawn on the trio thread, wait in a worker thread, kill from trio
    run = manager.spawn(["sleep", "60"], cwd="/", group="branch")
    async with trio.open_nursery() as nursery:
        done: list[RunResult | None] = []

        async def waiter() -> None:
            done.append(await trio.to_thread.run_sync(run.wait, abandon_on_cancel=True))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()  # the waiter sits in run.wait
        assert manager.kill_group("branch") == 1
    assert done and done[0] is not None and done[0].killed
