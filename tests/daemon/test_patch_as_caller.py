"""``diff --patch`` shows a client only what that client could read.

As uid 65534 against a root daemon (``--allow-uid 65534``), on both backends:
the user's workspace holds root's 0600 file and root's 0700 directory; the
user deletes the one and renames the other in a branch; the patch must not
carry their contents, while the user's own changes still show.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon

from .conftest import forget_workspaces, passable_dir

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120),
              pytest.mark.root("a root daemon reading as uid 65534 (setpriv), on both backends")]

NOBODY = 65534
SECRET = "root's secret\n"


@pytest.fixture(scope="module", params=["fuse", "overlay"])
def shared(request: pytest.FixtureRequest) -> Iterator[EmbeddedDaemon]:
    with passable_dir("branchd-patch-") as root:
        d = EmbeddedDaemon(root, args=["--allow-uid", str(NOBODY), "--socket-mode", "0666",
                                       "--backend", request.param]).start()
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture
def theirs(shared: EmbeddedDaemon) -> Iterator[Path]:
    with passable_dir("branchd-patch-ws-") as top:
        ws = top / "ws"
        ws.mkdir()
        (ws / "secret").write_text(SECRET)
        (ws / "secret").chmod(0o600)
        (ws / "priv").mkdir(mode=0o700)
        (ws / "priv" / "f").write_text(SECRET)
        (ws / "mine").write_text("mine\n")
        os.chown(ws, NOBODY, NOBODY)
        os.chown(ws / "mine", NOBODY, NOBODY)
        try:
            yield ws
        finally:
            forget_workspaces(shared, ws)


def nobody(*argv: str, socket: Path | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = ["env", f"BRANCHD_SOCKET={socket}"] if socket else []
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *env, *argv], capture_output=True, text=True,
                          timeout=60, cwd="/")


def test_the_patch_carries_nothing_the_caller_cannot_read(
        shared: EmbeddedDaemon, theirs: Path, user_python: str) -> None:
    cli = [user_python, "-I", "-m", "branching.cli"]
    made = nobody(*cli, "create", "p", "-w", str(theirs), socket=shared.socket)
    assert made.returncode == 0, made.stderr
    b = made.stdout.strip()
    # (on the overlay backend the directory rename is EXDEV and mv's copy fallback cannot
    # read root's directory: a documented difference; the deletion is the overlay case)
    edit = nobody("sh", "-c", f"rm -f {b}/secret && {{ mv {b}/priv {b}/priv2 || true; }} && "
                  f"echo changed > {b}/mine")
    assert edit.returncode == 0, edit.stderr
    proc = nobody(*cli, "diff", "p", "-w", str(theirs), "--patch", socket=shared.socket)
    assert proc.returncode == 0, proc.stderr
    assert "secret" in proc.stdout  # the change is listed ...
    assert SECRET.strip() not in proc.stdout  # ... but not root's contents
    assert "+changed" in proc.stdout and "-mine" in proc.stdout  # the user's own still show
    # root itself sees everything
    root = subprocess.run([*cli[:1], "-m", "branching.cli", "diff", "p", "-w", str(theirs),
                           "--patch"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "BRANCHD_SOCKET": str(shared.socket)})
    assert root.returncode == 0, root.stderr
    assert SECRET.strip() in root.stdout
    done = nobody(*cli, "discard", "p", "-w", str(theirs), socket=shared.socket)
    assert done.returncode == 0, done.stderr
