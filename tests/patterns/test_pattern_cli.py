"""branchctl run / speculate / best-of-n / reflexion, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pattern_helpers import alive, files, interrupt_once_started, popen_interruptible, wait_for

from branching import EmbeddedDaemon

pytestmark = [pytest.mark.mount, pytest.mark.cgroup]

# The pattern commands on the lead's real branchctl group and main(); added here
# only if cli.py does not register them yet.
_MAIN = """
import sys
from branching.cli import cli, main
from branching.cli_patterns import COMMANDS
for command in COMMANDS:
    if command.name not in cli.commands:
        cli.add_command(command)
sys.exit(main(sys.argv[1:]))
"""


def branchctl(daemon: EmbeddedDaemon, *args: str, cwd: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _MAIN, "--socket", str(daemon.socket), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_run_commits_on_exit_0(daemon: EmbeddedDaemon, base: Path) -> None:
    p = branchctl(daemon, "run", "-w", str(base), "--", "sh", "-c", "echo ran > value.txt")
    assert p.returncode == 0, p.stderr
    assert (base / "value.txt").read_text() == "ran\n"
    assert "committed" in p.stderr  # stdout is the command's own


def test_run_discards_on_failure(daemon: EmbeddedDaemon, base: Path) -> None:
    before = files(base)
    p = branchctl(daemon, "run", "--", "echo nope > value.txt; exit 4", cwd=base)
    assert p.returncode == 1
    assert files(base) == before and "nothing committed" in p.stderr


def test_speculate_json(daemon: EmbeddedDaemon, base: Path) -> None:
    p = branchctl(daemon, "speculate", "-w", str(base), "--json", "--memory", "256M",
                  "--timeout", "60", "-j", "1", "-c", "exit 1", "-c", "echo two > value.txt")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["committed"] and out["winner"] == 1
    assert [c["status"] for c in out["candidates"]] == ["failed", "passed"]
    assert [c["committed"] for c in out["candidates"]] == [False, True]
    assert (base / "value.txt").read_text() == "two\n"


def test_best_of_n_scores_from_fd3(daemon: EmbeddedDaemon, base: Path) -> None:
    # attempt 2 scores highest: 10 - (attempt - 2)^2
    script = ('echo $BRANCHING_ATTEMPT > value.txt; '
              'echo $((10 - (BRANCHING_ATTEMPT - 2) * (BRANCHING_ATTEMPT - 2))) >&3')
    p = branchctl(daemon, "best-of-n", "-w", str(base), "-n", "4", "--json", "--", script)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [c["score"] for c in out["candidates"]] == [9.0, 10.0, 9.0, 6.0]
    assert (base / "value.txt").read_text() == "2\n"


def test_reflexion_with_critique(daemon: EmbeddedDaemon, base: Path) -> None:
    p = branchctl(daemon, "reflexion", "-w", str(base), "--retries", "2",
                  "--critique", "echo use-the-force", "--",
                  'case "$BRANCHING_FEEDBACK" in *force*) echo done > value.txt;; *) exit 1;; esac')
    assert p.returncode == 0, p.stderr
    assert (base / "value.txt").read_text() == "done\n"


def test_usage_errors(daemon: EmbeddedDaemon, base: Path) -> None:
    p = branchctl(daemon, "best-of-n", "-w", str(base), "-n", "0", "--", "true")
    assert p.returncode == 2
    p = branchctl(daemon, "speculate", "-w", str(base), "--memory", "lots", "-c", "true")
    assert p.returncode == 2 and "lots" in p.stderr


def test_progress_on_stderr(daemon: EmbeddedDaemon, base: Path) -> None:
    p = branchctl(daemon, "speculate", "-w", str(base), "--progress", "-j", "1",
                  "-c", "exit 1", "-c", "echo ok > value.txt")
    assert p.returncode == 0, p.stderr
    assert "#1 exit 1: running" in p.stderr and "#1 exit 1: failed (exit 1" in p.stderr
    assert "committed #2" in p.stderr and "committed #2" in p.stdout


def test_ctrl_c_exits_130_and_leaves_nothing(daemon: EmbeddedDaemon, base: Path,
                                              pids: Path) -> None:
    before = files(base)
    hang = f"echo $$ > {pids}/$BRANCHING_ATTEMPT; echo x > value.txt; exec sleep 3600"
    proc = popen_interruptible(
        [sys.executable, "-c", _MAIN, "--socket", str(daemon.socket), "speculate",
         "-w", str(base), "-j", "2", "-c", hang, "-c", hang],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = interrupt_once_started(proc, pids)
    assert proc.returncode == 130, err
    wait_for(lambda: not alive(pids), "the candidates' processes to die")
    assert files(base) == before
