"""Fixtures for the pattern tests: one real branchd for the session, a workspace per test.

After every test the workspace must hold no active branch and the daemon no
running process: a pattern that leaks either fails the test that caused it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pattern_helpers import wait_for

from branching import EmbeddedDaemon, Workspace


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
