"""Helpers of the pattern tests: waiting, live pids, tree snapshots, a child's environment."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

SETTLE = 30.0  # seconds to wait for the daemon to reap killed runs before calling it a leak


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def alive(pid_dir: Path) -> list[int]:
    """The pids recorded in ``pid_dir`` whose processes still run (zombies count as gone)."""
    out = []
    for f in pid_dir.iterdir():
        pid = int(f.read_text())
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def files(path: Path) -> dict[str, str]:
    """A tree's regular files and their text, to compare a workspace before and after."""
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*"))
            if p.is_file()}


def env_with_tests_path() -> dict[str, str]:
    here = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [here, str(Path(here).parents[1]), os.environ.get("PYTHONPATH", "")])}


def popen_interruptible(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    """Start ``argv`` with SIGINT at its default disposition. A process started
    from a non-interactive shell's background job (``cmd &``) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C
    tests would hang for a reason that is not the program's."""
    return subprocess.Popen(argv, text=True, preexec_fn=_sigint_default, **kw)


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_once_started(proc: subprocess.Popen[str], pids: Path, n: int = 2) -> str:
    """Ctrl-C ``proc`` once ``n`` candidates wrote their pids; return its stderr.
    The process is killed (and reaped) if it does not end by itself."""
    try:
        wait_for(lambda: len(list(pids.iterdir())) == n, "candidates to start")
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=SETTLE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err
