"""A killed daemon loses nothing: branches, deltas and parents come back on restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.protocol import ExitCode

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def test_sigkilled_daemon_restarts_with_its_branches(tmp_path: Path, ws: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    first = EmbeddedDaemon(root).start()
    try:
        cli = CLI(first.socket)
        p = Path(cli("create", "keep", "-w", str(ws)).stdout.strip())
        (p / "data").write_text("precious\n")
        cli("create", "kid", "--from", "keep")
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        # the socket is dead: a clear error, not a hang or a traceback
        dead = cli("list", check=ExitCode.UNAVAILABLE)
        assert len(dead.stderr.splitlines()) == 1
    finally:
        first.stop()

    second = EmbeddedDaemon(root).start()
    try:
        cli = CLI(second.socket)
        branches = {b["name"]: b for b in cli.json("list")["branches"]}
        assert set(branches) == {"keep", "kid"}
        assert branches["kid"]["parent"] == "keep"
        assert (Path(branches["kid"]["path"]) / "data").read_text() == "precious\n"
        cli("commit", "kid")
        cli("commit", "keep")
        assert (ws / "data").read_text() == "precious\n"
    finally:
        second.stop()


def test_second_daemon_on_the_same_state_or_socket_is_refused(daemon: EmbeddedDaemon,
                                                      tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.main", "--socket", str(daemon.socket),
         "--state-dir", str(tmp_path / "s"), "--mountpoint", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == ExitCode.CONFLICT
    assert "another branchd" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.main", "--socket", str(tmp_path / "sock"),
         "--state-dir", str(daemon.state_dir), "--mountpoint", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == ExitCode.CONFLICT
    assert "another branchd" in proc.stderr
