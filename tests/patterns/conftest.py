"""Fixtures for the pattern tests: one real branchd for the session, a workspace per test.

After every test the workspace must hold no active branch and the daemon no
running process: a pattern that leaks either fails the test that caused it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from branching import EmbeddedDaemon, Workspace

SETTLE = 30.0  # seconds to wait for the daemon to reap killed runs before calling it a leak


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedDaemon]:
    d = EmbeddedDaemon(tmp_path_factory.mktemp("branchd"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """The workspace directory: two files the candidates may change."""
    path = tmp_path / "proj"
    path.mkdir()
    (path / "README").write_text("hello\n")
    (path / "value.txt").write_text("0\n")
    return path


@pytest.fixture
def pids(tmp_path: Path) -> Path:
    """A directory outside the workspace where candidates leave their pid (see ``alive``)."""
    path = tmp_path / "pids"
    path.mkdir()
    return path


@pytest.fixture
def ws(daemon: EmbeddedDaemon, base: Path) -> Iterator[Workspace]:
    with Workspace(base, daemon=daemon.socket) as w:
        yield w
        left = [b.name for b in w.branches() if b.status == "active"]
        assert not left, f"branches left behind: {left}"
        wait_for(lambda: w.client.call("status")["runs_active"] == 0, "runs to end")


def wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + SETTLE
    while not predicate():  # type: ignore[operator]
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
