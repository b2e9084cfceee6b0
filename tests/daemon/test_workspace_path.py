"""Runs see their branch at the workspace's own path: venvs and editable installs work.

A small project the test writes, with a virtualenv and a real editable install
of its package (pip, offline, with the suite's setuptools): its console script's
shebang, the venv's pyvenv.cfg and the editable install's .pth all name the
workspace's absolute path, as in every real Python project. A candidate that
breaks the package must fail its check in its branch, and must not be committed.
Run as root here; tests/daemon/test_unprivileged.py does the same as uid 65534.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from branching import EmbeddedDaemon, Speculate, Workspace

from .project import BROKEN, candidates, editable_script, make_project

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

def test_the_project_is_what_the_test_says(tmp_path: Path) -> None:
    # the set-up itself: the check passes on the base, and fails once broken
    root = make_project(tmp_path / "proj")
    assert subprocess.run([root / ".venv/bin/mylib-check"]).returncode == 0
    pth = "".join(p.read_text() for p in (root / ".venv").rglob("*.pth"))
    assert str(root) in pth or "__editable__" in pth  # the install names the workspace
    lib = root / "src/mylib/__init__.py"
    lib.write_text(BROKEN)
    assert subprocess.run([root / ".venv/bin/mylib-check"]).returncode == 1


def test_breaking_candidate_fails_in_its_branch_and_is_not_committed(
        daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    with Workspace(root, daemon=daemon) as ws:
        outcome = Speculate(candidates(root), first_wins=False)(ws)
    assert outcome.committed and outcome.winner is not None
    assert outcome.winner.label == "good"
    assert not outcome.candidates[0].success  # "break" failed its check in its own branch
    text = (root / "src/mylib/__init__.py").read_text()
    assert "a + b" in text and "# reviewed" in text
    assert subprocess.run([root / ".venv/bin/mylib-check"]).returncode == 0


def test_breaking_candidate_from_the_cli(daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    env = {**os.environ, "BRANCHD_SOCKET": str(daemon.socket)}
    args = [sys.executable, "-m", "branching.cli", "speculate", "-w", str(root), "--in-order"]
    for c in candidates(root):
        args += ["-c", str(c.argv)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    text = (root / "src/mylib/__init__.py").read_text()
    assert "a + b" in text and "# reviewed" in text


def test_a_venv_made_in_a_branch_works_in_the_base_after_commit(
        daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    with Workspace(root, daemon=daemon) as ws, ws.branch("venv2") as b:
        r = b.run(editable_script(".venv2"), cwd=root)
        assert r.ok, r.stderr
        assert not (root / ".venv2").exists()  # made in the branch only
    # committed: its shebangs and .pth name the workspace, not the branch's path
    shebang = (root / ".venv2/bin/mylib-check").read_text().splitlines()[0]
    assert shebang == f"#!{root}/.venv2/bin/python"
    assert subprocess.run([root / ".venv2/bin/mylib-check"]).returncode == 0


def test_a_nested_branch_sees_itself_at_the_workspace_path(
        daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    with Workspace(root, daemon=daemon) as ws:
        outer = ws.create("outer")
        outer.run(["sh", "-c", f"sed -i 's/a + b/a - b/' {root}/src/mylib/__init__.py"])
        inner = outer.create("inner")
        assert inner.run([f"{root}/.venv/bin/mylib-check"]).returncode == 1  # outer's break
        # a fix of another size: within the second of outer's edit, a source of the same
        # size would pass for the one the first check compiled (.pyc keeps whole seconds)
        inner.run(["sh", "-c", f"sed -i 's/a - b/(a + b)/' {root}/src/mylib/__init__.py"])
        assert inner.run([f"{root}/.venv/bin/mylib-check"]).ok
        assert outer.run([f"{root}/.venv/bin/mylib-check"]).returncode == 1
        outer.abort()
    assert "a + b" in (root / "src/mylib/__init__.py").read_text()


def test_callables_lambda_and_closure(daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "n.txt").write_text("1\n")
    limit = 5

    def closure(path: Path) -> bool:  # a closure over `limit`: plain pickle refuses it
        return int((path / "n.txt").read_text()) > limit

    with Workspace(root, daemon=daemon) as ws:
        outcome = Speculate([closure, lambda p: (p / "n.txt").write_text("9\n") and p == root],
                            first_wins=False)(ws)
    assert outcome.committed and outcome.winner is not None and outcome.winner.index == 1
    assert (root / "n.txt").read_text() == "9\n"


def test_callable_from_a_stdin_script_does_not_rerun_the_script(
        daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    runs = tmp_path / "script-ran"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from branching import Speculate, Workspace
        with open({str(runs)!r}, "a") as f:
            f.write("ran\\n")   # an unguarded script: a re-run in a child would show here

        def bad(path):
            return False

        def good(path):
            (path / "fixed.txt").write_text("yes\\n")

        with Workspace({str(root)!r}) as ws:
            outcome = Speculate([bad, good], first_wins=False)(ws)
        print(outcome.committed, outcome.winner.label)
        """)
    env = {**os.environ, "BRANCHD_SOCKET": str(daemon.socket)}
    proc = subprocess.run([sys.executable, "-"], input=script, env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "good"]
    assert runs.read_text() == "ran\n"
    assert (root / "fixed.txt").read_text() == "yes\n"
