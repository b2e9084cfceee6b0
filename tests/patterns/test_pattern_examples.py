"""The examples run as a user runs them, and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from branching import EmbeddedDaemon

pytestmark = [pytest.mark.mount, pytest.mark.cgroup, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, daemon: EmbeddedDaemon) -> str:
    before = sorted(p.name for p in (EXAMPLES / "buggy_project").rglob("*"))
    env = {**__import__("os").environ, "BRANCHD_SOCKET": str(daemon.socket)}
    p = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                       timeout=180, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    # the repository's copy of the project is never modified
    assert sorted(p.name for p in (EXAMPLES / "buggy_project").rglob("*")) == before
    return p.stdout


@pytest.mark.timeout(200)
def test_speculate_bugfix(daemon: EmbeddedDaemon) -> None:
    out = run_example("speculate_bugfix.py", daemon)
    assert "committed 4-count-then-word.diff" in out
    assert "+    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]" in out
    assert "after: 5/5 tests pass" in out and "branches left: none" in out


@pytest.mark.timeout(200)
def test_best_of_n(daemon: EmbeddedDaemon) -> None:
    out = run_example("best_of_n.py", daemon)
    assert "committed 4-count-then-word.diff (score 5)" in out
    assert "oom" in out  # the looping patch was killed by its memory limit
    assert "after: 5/5 tests pass" in out


@pytest.mark.timeout(200)
def test_tree_of_thoughts(daemon: EmbeddedDaemon) -> None:
    out = run_example("tree_of_thoughts.py", daemon)
    assert "committed 4-count-then-word.diff + 2-longest-sorted.diff" in out
    assert "+++ b/textstats/longest.py" in out
    assert "after: 7/7 tests pass" in out and "branches left: none" in out


@pytest.mark.timeout(200)
def test_langgraph_best_patch(daemon: EmbeddedDaemon) -> None:
    pytest.importorskip("langgraph", reason="pip install 'branchd[langgraph]'")
    out = run_example("langgraph_best_patch.py", daemon)
    assert "3-selection-loop.diff    oom-killed" in out
    assert "committed 4-count-then-word.diff (score 5)" in out
    assert "after: 5/5 tests pass" in out and "branches left: none" in out
