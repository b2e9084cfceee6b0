"""Hundreds of concurrent runs: none is refused or lost, and none parks a daemon thread.

A run's end is called back from the cgroups monitor thread into the event loop
(daemon/runs.py); before, every live run held a worker thread in ``run.wait``,
and trio's default limit of 40 threads made later runs' ends wait for earlier ones.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from branching import Client, EmbeddedDaemon, Workspace

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.timeout(240)]

RUNS = 120


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_hundreds_of_concurrent_runs_end_without_a_thread_each(daemon: EmbeddedDaemon,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    gate = tmp_path / "gate"  # every run waits for it: all are alive at once
    with Workspace(root, daemon=daemon) as ws:
        ws.create("many")
        started: list[str] = []
        lock = threading.Lock()

        def start(count: int) -> None:
            with Client(daemon.socket) as c:
                for _ in range(count):
                    r = c.call("exec", workspace=ws.name, name="many", detach=True,
                               argv=["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done"])
                    with lock:
                        started.append(r["run"])

        workers = [threading.Thread(target=start, args=(RUNS // 6,)) for _ in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert len(started) == RUNS
        with Client(daemon.socket) as c:
            alive = c.call("status")["runs_active"]
            assert daemon.proc is not None
            assert threads_of(daemon.proc.pid) < 40, alive  # not one per live run
            gate.touch()
            results = [c.call("wait", run=r)["result"] for r in started]
    assert [r["exit_code"] for r in results] == [0] * RUNS
