"""Who may talk to the daemon: socket mode, SO_PEERCRED, and workspace ownership.

Another user is played by a real process that `setpriv` switched to uid 65534.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.protocol import ExitCode

from .conftest import forget_workspaces, passable_dir

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120),
              pytest.mark.root("a root daemon and another user played by setpriv")]

NOBODY = 65534


@pytest.fixture(scope="module")
def open_daemon() -> Iterator[EmbeddedDaemon]:
    """A daemon whose directory other users may traverse (pytest's tmp dirs are 0700)."""
    with passable_dir("branchd-sec-") as root:
        d = EmbeddedDaemon(root).start()
        try:
            yield d
        finally:
            d.stop()


def as_nobody(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BRANCHD_SOCKET": str(socket), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "branching.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, cwd="/")


def test_socket_mode_keeps_other_users_out(open_daemon: EmbeddedDaemon) -> None:
    proc = as_nobody(open_daemon.socket, "list")
    assert proc.returncode == ExitCode.PERMISSION, proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_peer_credentials_refuse_other_uids(open_daemon: EmbeddedDaemon) -> None:
    os.chmod(open_daemon.socket, 0o666)  # get past the file mode: SO_PEERCRED must still say no
    try:
        proc = as_nobody(open_daemon.socket, "list")
    finally:
        os.chmod(open_daemon.socket, 0o660)
    assert proc.returncode == ExitCode.PERMISSION, proc.stderr
    assert f"uid {NOBODY}" in proc.stderr


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[EmbeddedDaemon]:
    """A daemon that lets uid 65534 connect (as a socket group would: mode 0666 here)."""
    with passable_dir("branchd-shared-") as root:
        d = EmbeddedDaemon(root, args=["--allow-uid", str(NOBODY)]).start()
        os.chmod(d.socket, 0o666)
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture
def dirs(shared_daemon: EmbeddedDaemon) -> Iterator[tuple[Path, Path]]:
    """A workspace only root may use (0700) and one that nobody owns; forgotten by the
    shared daemon before they go (a workspace whose directory is gone is what fsck
    reports when the daemon stops)."""
    with passable_dir("branchd-ws-") as top:
        private, theirs = top / "private", top / "theirs"
        private.mkdir(mode=0o700)
        (private / "secret").write_text("root's\n")
        theirs.mkdir()
        (theirs / "f").write_text("nobody's\n")
        os.chown(theirs, NOBODY, NOBODY)
        os.chown(theirs / "f", NOBODY, NOBODY)
        try:
            yield private, theirs
        finally:
            forget_workspaces(shared_daemon, private, theirs)


def test_allowed_user_works_in_their_own_workspace(shared_daemon: EmbeddedDaemon,
                                                   dirs: tuple[Path, Path]) -> None:
    _, theirs = dirs
    made = as_nobody(shared_daemon.socket, "create", "mine", "-w", str(theirs))
    assert made.returncode == 0, made.stderr
    write = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "sh", "-c", f"echo changed > {made.stdout.strip()}/f"], capture_output=True, text=True)
    assert write.returncode == 0, write.stderr
    done = as_nobody(shared_daemon.socket, "commit", "mine", "-w", str(theirs))
    assert done.returncode == 0, done.stderr
    assert (theirs / "f").read_text() == "changed\n"


def test_allowed_user_cannot_branch_commit_or_read_others_workspace(
        shared_daemon: EmbeddedDaemon, dirs: tuple[Path, Path]) -> None:
    private, _ = dirs
    proc = as_nobody(shared_daemon.socket, "create", "sneak", "-w", str(private))
    assert proc.returncode == ExitCode.PERMISSION, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    # root branches it; nobody may neither commit, discard, diff nor read through the mount
    env = {**os.environ, "BRANCHD_SOCKET": str(shared_daemon.socket)}
    path = subprocess.run([sys.executable, "-m", "branching.cli", "create", "roots",
                           "-w", str(private)], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    for verb in ("commit", "discard", "diff"):
        proc = as_nobody(shared_daemon.socket, verb, "roots")
        assert proc.returncode == ExitCode.PERMISSION, (verb, proc.stderr)
    read = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "cat", f"{path}/secret"],
                          capture_output=True, text=True)
    assert read.returncode != 0 and "Permission denied" in read.stderr
    assert (Path(path) / "secret").read_text() == "root's\n"  # still there for root
