"""Who may talk to the daemon: socket mode, SO_PEERCRED, and workspace ownership.

Another user is played by a real process that `setpriv` switched to uid 65534.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.protocol import ExitCode

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

NOBODY = 65534


@pytest.fixture(scope="module")
def open_daemon() -> Iterator[EmbeddedDaemon]:
    """A daemon whose directory other users may traverse (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="branchd-sec-"))
    root.chmod(0o755)
    d = EmbeddedDaemon(root).start()
    try:
        yield d
    finally:
        d.stop()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


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
