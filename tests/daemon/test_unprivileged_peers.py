"""Clients whose uid is not an unprivileged daemon's, and the other way round.

A daemon run as uid 65534 cannot act as anyone else: it cannot give root a run
record, take root's credentials for reads, nor drop to root (or to any uid) for
a run. Root's ``exec`` and ``run`` are refused with one line saying so (exit 7,
permission), before anything is made; root's other requests work, its patch read
as the daemon (root may read all of that); ``--allow-uid`` of another user is
refused when such a daemon starts. A root daemon runs an allowed user's command
as that user, and root's as root.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.protocol import ExitCode

from .conftest import CLI, NOBODY, passable_dir

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120),
              pytest.mark.root("acts as root and as uid 65534 in one test")]

DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from branching import Workspace

    top = Path(sys.argv[1])
    root = top / "proj"
    root.mkdir()
    (root / "f").write_text("base\\n")
    with Workspace(root) as ws:
        b = ws.create("mine")
        (b.path / "f").write_text("changed\\n")
        (top / "socket").write_text(str(ws.client.socket_path))
        while not (top / "done").exists():
            time.sleep(0.05)
    """)

USER_ENV = {"PATH": os.defpath, "PYTHONDONTWRITEBYTECODE": "1"}


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def nobody_env(top: Path, **more: str) -> dict[str, str]:
    return {**USER_ENV, "HOME": str(top), "XDG_RUNTIME_DIR": str(top), **more}


@pytest.fixture
def users_daemon(nobody_top: Path, user_python: str) -> Iterator[Path]:
    """An embedded daemon of uid 65534's (a Workspace in its driver), with a branch
    ``mine`` that changed ``f``; its socket."""
    top = nobody_top
    (top / "driver.py").write_text(DRIVER)
    proc = subprocess.Popen(as_nobody(user_python, str(top / "driver.py"), str(top)),
                            env=nobody_env(top), cwd=str(top), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (top / "socket").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout
            time.sleep(0.05)
        yield Path((top / "socket").read_text())
    finally:
        (top / "done").touch()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def test_root_may_not_run_commands_in_an_unprivileged_daemon(
        users_daemon: Path, nobody_top: Path, user_python: str) -> None:
    cli = CLI(users_daemon)
    refused = cli("exec", "mine", "--", "id", "-u", check=ExitCode.PERMISSION)
    assert refused.stderr == (
        "branchctl: error: this daemon runs as uid 65534 without the privileges to act as "
        "another user: it runs commands as uid 65534 only, not as uid 0 (run branchctl as "
        "uid 65534, or run branchd as root)\n"), refused.stderr
    assert cli.json("info", "mine")["runs"] == []  # refused before anything was made
    # run: the branch it made is discarded, and the refusal is its exit code
    run = cli("run", "-w", str(nobody_top / "proj"), "--", "true", check=ExitCode.PERMISSION)
    assert "runs commands as uid 65534 only, not as uid 0" in run.stderr, run.stderr
    assert [b["name"] for b in cli.json("list")["branches"]] == ["mine"]
    # what needs no acting as root works; the patch is read as the daemon
    assert "+changed" in cli.json("diff", "mine", "--patch")["patch"]
    cli("create", "roots", "-w", str(nobody_top / "proj"))
    cli("discard", "roots")
    # the daemon's own user runs commands, as ever
    mine = subprocess.run(as_nobody(user_python, "-m", "branching.cli", "--socket",
                                    str(users_daemon), "exec", "mine", "--", "id", "-u"),
                          env=nobody_env(nobody_top), capture_output=True, text=True,
                          timeout=60)
    assert (mine.returncode, mine.stdout) == (0, f"{NOBODY}\n"), mine.stderr


def test_an_unprivileged_daemon_refuses_to_allow_another_uid(
        nobody_top: Path, user_python: str) -> None:
    top = nobody_top
    proc = subprocess.run(
        as_nobody(user_python, "-m", "daemon.main", "--state-dir", str(top / "state"),
                  "--mountpoint", str(top / "mnt"), "--socket", str(top / "sock"),
                  "--allow-uid", str(NOBODY), "--allow-uid", "4242"),
        env=nobody_env(top), capture_output=True, text=True, timeout=60)
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.splitlines()[-1] == (
        "branchd: error: --allow-uid 4242: this daemon runs as uid 65534 without the "
        "privileges to act as another user (to check files or run commands as them); run "
        "branchd as root to serve other users")
    assert not (top / "mnt").exists() and not (top / "sock").exists()


def test_a_root_daemon_runs_each_callers_command_as_that_caller(user_python: str) -> None:
    with passable_dir("branchd-peers-") as top:
        ws = top / "ws"
        ws.mkdir()
        os.chown(ws, NOBODY, NOBODY)
        d = EmbeddedDaemon(top / "daemon", args=["--allow-uid", str(NOBODY),
                                                  "--socket-mode", "0666"])
        (top / "daemon").mkdir(mode=0o755)
        d.start()
        try:
            env = nobody_env(top, BRANCHD_SOCKET=str(d.socket))
            theirs = [user_python, "-m", "branching.cli"]
            subprocess.run(as_nobody(*theirs, "create", "b", "-w", str(ws)), env=env,
                           check=True, capture_output=True, timeout=60)
            got = subprocess.run(as_nobody(*theirs, "exec", "b", "--", "id", "-u"),
                                 env=env, capture_output=True, text=True, timeout=60)
            assert (got.returncode, got.stdout) == (0, f"{NOBODY}\n"), got.stderr
            assert CLI(d.socket)("exec", "b", "--", "id", "-u").stdout == "0\n"
        finally:
            d.stop()
