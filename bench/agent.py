"""The agent workload: what a coding agent does in a fresh branch, timed step by step, with
every step's output checked (a fast wrong answer must not pass as a fast row)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.trees import EDIT_MARKER, module_path

STEPS = ("extract", "edit", "git status", "compileall", "grep")


class WorkloadError(Exception):
    """A step of the agent workload produced a wrong result."""


def _git_env(home: Path) -> dict[str, str]:
    return dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(home), GIT_OPTIONAL_LOCKS="1")


def edited_modules(modules: int, edits: int) -> list[str]:
    """The modules the workload edits: spread evenly over the package."""
    return [module_path(i * modules // edits) for i in range(edits)]


def _edit(path: Path) -> None:
    """Change a constant and add a comment, saved the way editors save: temp file, rename."""
    text = path.read_text().replace("VALUE = 0", "VALUE = 1", 1) + EDIT_MARKER + "\n"
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(branch: Path, tarball: Path, modules: int, edits: int, home: Path) -> dict[str, float]:
    """Run the workload in ``branch`` (empty but for the base's README); seconds per step."""
    src = branch / "src"
    edited = edited_modules(modules, edits)
    times: dict[str, float] = {}

    def step(name: str, argv: list[str] | None = None) -> subprocess.CompletedProcess[str] | None:
        t0 = time.perf_counter()
        out = None
        if argv is None:
            for rel in edited:
                _edit(src / rel)
        else:
            out = subprocess.run(argv, cwd=src, env=_git_env(home), capture_output=True,
                                 text=True, check=False)
        times[name] = time.perf_counter() - t0
        if out is not None and out.returncode != 0 and name != "grep":
            raise WorkloadError(f"{name} exited {out.returncode}: {out.stderr.strip()[:500]}")
        return out

    src.mkdir()
    step("extract", ["tar", "-xf", str(tarball)])
    step("edit")
    status = step("git status", ["git", "-c", "safe.directory=*", "-c", "core.fsmonitor=false",
                                 "status", "--porcelain"])
    assert status is not None
    changed = sorted(line[3:] for line in status.stdout.splitlines())
    if changed != sorted(edited) or not all(
        line.startswith(" M ") for line in status.stdout.splitlines()
    ):
        raise WorkloadError(f"git status lists {changed[:5]}..., expected {sorted(edited)[:5]}...")
    step("compileall", [sys.executable, "-m", "compileall", "-q", "agentpkg"])
    pyc = list((src / "agentpkg").rglob("*.pyc"))
    sources = list((src / "agentpkg").rglob("*.py"))
    if len(pyc) != len(sources):
        raise WorkloadError(f"compileall wrote {len(pyc)} .pyc files for {len(sources)} modules")
    grep = step("grep", ["grep", "-rl", EDIT_MARKER, "."])
    assert grep is not None
    hits = sorted(line.removeprefix("./") for line in grep.stdout.splitlines())
    if hits != sorted(edited):
        raise WorkloadError(f"grep found {hits[:5]}..., expected {sorted(edited)[:5]}...")
    times["total"] = sum(times.values())
    return times
