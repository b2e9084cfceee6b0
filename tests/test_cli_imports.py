"""branchctl imports only what the command it runs needs.

That is what keeps a command's start in tens of milliseconds; the time itself is
measured by the benchmark's ``branchd-cli`` column, never asserted here. Each
command runs for real against the shared daemon under ``python -X importtime``,
whose report names every module the process imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from branching import EmbeddedDaemon

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

# What no branch-management command needs: the patterns and their progress display,
# the library's Workspace and embedded daemon, cgroups, the daemon's own stack, and
# shutil (with bz2 and lzma: a few milliseconds of every start, for `resolve --file`).
HEAVY = frozenset({"asyncio", "branching.embedded", "branching.patterns", "branching.workspace",
                   "cgroups", "psutil", "pyfuse3", "rich", "shutil", "trio"})


class Branchctl:
    """Runs ``branchctl`` (as ``python -m branching.cli``) and reports what it imported."""

    def __init__(self, socket: Path) -> None:
        self.env = {**os.environ, "BRANCHD_SOCKET": str(socket)}

    def __call__(self, *args: str) -> tuple[str, set[str]]:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "branching.cli", *args],
                              env=self.env, capture_output=True, text=True, timeout=60)
        lines = proc.stderr.splitlines()
        modules = {line.rsplit("|", 1)[1].strip() for line in lines
                   if line.startswith("import time:") and "imported package" not in line}
        errors = [line for line in lines if not line.startswith("import time:")]
        assert proc.returncode == 0, (args, proc.returncode, errors)
        assert {"click", "branching.client"} <= modules, "the importtime report was not read"
        return proc.stdout, modules


@pytest.fixture
def branchctl(daemon: EmbeddedDaemon) -> Branchctl:
    return Branchctl(daemon.socket)


def test_branch_commands_import_nothing_heavy(branchctl: Branchctl, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "README").write_text("hello\n")
    runs = [("create", "imp1", "-w", str(ws), "--json"), ("list", "--json"), ("list",),
            ("info", "imp1"), ("diff", "imp1", "--patch"), ("commit", "imp1"),
            ("create", "imp2", "-w", str(ws)), ("discard", "imp2", "--json"),
            ("status",), ("workspace", "list")]
    for args in runs:
        out, modules = branchctl(*args)
        if args[0] == "create" and "--json" in args:
            assert Path(json.loads(out)["path"], "README").read_text() == "hello\n"
        if args == ("list", "--json"):
            backends = {b.get("backend") for b in json.loads(out)["branches"]} - {None}
        if args == ("list",):  # the column is there when the daemon says how it serves
            assert ("BACKEND" in out.splitlines()[0]) == bool(backends), out
        assert not modules & HEAVY, (args, sorted(modules & HEAVY))


def test_exec_imports_cgroups_for_its_limits_and_nothing_else_heavy(
        branchctl: Branchctl, tmp_path: Path) -> None:
    branchctl("create", "imp3", "-w", str(tmp_path))
    try:
        _, modules = branchctl("exec", "imp3", "--pids", "16", "--", "true")
    finally:
        branchctl("discard", "imp3")
    assert "cgroups" in modules
    assert not modules & (HEAVY - {"cgroups"}), sorted(modules & HEAVY)


def test_help_lists_every_command_without_loading_the_patterns(branchctl: Branchctl) -> None:
    out, modules = branchctl("--help")
    helping = HEAVY - {"shutil"}  # click fits help to the terminal's width with shutil
    assert not modules & helping, sorted(modules & helping)
    for line in ("create     Create a branch and print its path.",
                 "speculate  Run every candidate at once in its own branch; the first to"):
        assert line in out
    out, modules = branchctl("best-of-n", "--help")
    assert "--max-parallel" in out and not modules & helping, sorted(modules & helping)
