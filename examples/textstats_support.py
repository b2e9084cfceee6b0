"""What the textstats examples share: the buggy project, its patches, running its tests.

The examples copy ``buggy_project/`` into a temporary directory and use that
as the workspace, so this repository's copy is never modified.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE / "buggy_project"
FIXES = sorted((HERE / "patches" / "fix").glob("*.diff"))
FEATURES = sorted((HERE / "patches" / "feature").glob("*.diff"))
# Candidates must not leave bytecode behind: it would be committed with the fix.
ENV = {"PYTHONDONTWRITEBYTECODE": "1"}


def copy_project() -> Path:
    """A fresh copy of the buggy project in a temporary directory."""
    workspace = Path(tempfile.mkdtemp(prefix="textstats-")) / "textstats"
    shutil.copytree(PROJECT, workspace)
    return workspace


def apply_patch(patch: Path, path: Path) -> None:
    """Apply a unified diff in ``path``; raises CalledProcessError if it does not apply."""
    subprocess.run(["git", "apply", "-p1", str(patch)], cwd=path, check=True)


def run_tests(path: Path, log: bool = True) -> tuple[int, int]:
    """Run the project's unittest suite in ``path``: (tests passed, tests run).

    ``log``: copy the test report to stderr (in a candidate: its log).
    """
    proc = subprocess.run([sys.executable, "-m", "unittest", "-q"], cwd=path,
                          capture_output=True, text=True, env={**os.environ, **ENV})
    if log:
        sys.stderr.write(proc.stderr)
    return count_tests(proc.stderr)


def count_tests(report: str) -> tuple[int, int]:
    """(tests passed, tests run) as a unittest report says."""
    ran = re.search(r"^Ran (\d+) tests?", report, re.M)
    total = int(ran.group(1)) if ran else 0
    bad = sum(int(n) for n in re.findall(r"(?:failures|errors)=(\d+)", report))
    return total - bad, total


def diff_trees(old: Path, new: Path) -> str:
    """A unified diff of the text files that differ between two trees."""
    out = []
    names = {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    names |= {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    for name in sorted(names):
        a, b = old / name, new / name
        a_text = a.read_text().splitlines(keepends=True) if a.exists() else []
        b_text = b.read_text().splitlines(keepends=True) if b.exists() else []
        if a_text != b_text:
            out += difflib.unified_diff(a_text, b_text,
                                        f"a/{name}" if a.exists() else "/dev/null",
                                        f"b/{name}" if b.exists() else "/dev/null")
    return "".join(out)


def conclude(workspace: Path, left: list[str], *, show_diff_header: bool = False) -> int:
    """Print what the winner changed and whether the tests now pass; 0 only if they all
    do and no branch is left. A successful run removes its temporary workspace."""
    if show_diff_header:
        print("\nthe workspace's diff against the original project:")
    print(diff_trees(PROJECT, workspace))
    passed, total = run_tests(workspace, log=False)
    print(f"after: {passed}/{total} tests pass")
    ok = passed == total and not left
    if ok:
        forget(workspace)
        shutil.rmtree(workspace.parent)
    return 0 if ok else 1


def forget(workspace: Path) -> None:
    """Have the daemon forget the workspace before its directory goes (else it keeps a
    workspace whose directory is gone, which ``branchctl fsck`` reports); an embedded
    daemon went with its state when the Workspace closed."""
    from branching.client import Client
    from branching.errors import BranchError

    try:
        with Client() as c:
            c.call("workspace-remove", workspace=str(workspace))
    except BranchError:
        pass


def apply_and_score(patch: Path, path: Path) -> float:
    """One candidate, run inside its branch: apply ``patch``; its score is the tests passed."""
    apply_patch(patch, path)
    passed, total = run_tests(path)
    print(f"{patch.name}: {passed}/{total} tests pass")
    return float(passed)
