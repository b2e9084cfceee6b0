"""Fixtures for daemon and CLI tests (the shared real daemon is in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import cgroups.delegated
from branching import EmbeddedDaemon
from branching.client import Client

NOBODY = 65534


@contextmanager
def passable_dir(prefix: str) -> Iterator[Path]:
    """A new directory every user may pass through (pytest's tmp dirs are 0700), for
    the tests that act as uid 65534; removed afterwards, never crossing into a mount
    left below it."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


@contextmanager
def tmpfs_at(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* mounted on the new directory *path* (as root), lazily unmounted
    at the end: a small disk for the tests to fill, or another filesystem to copy across."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def forget_workspaces(daemon: EmbeddedDaemon, *dirs: Path) -> None:
    """Have a daemon that outlives a test (a module's) forget the test's workspaces at or
    under *dirs*, with their branches, before the directories go: else it keeps
    workspaces whose directory is gone, which fsck reports when it stops."""
    with Client(daemon.socket) as c:
        for w in c.call("workspace-list")["workspaces"]:
            if any(w["base"] == str(d) or w["base"].startswith(f"{d}/") for d in dirs):
                c.call("workspace-remove", workspace=w["name"], force=True)


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A workspace directory with one file, f, saying "base"."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "f").write_text("base\n")
    return root


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A small workspace directory with a few files."""
    base = tmp_path / "proj"
    (base / "src").mkdir(parents=True)
    (base / "README").write_text("hello\n")
    (base / "src" / "app.py").write_text("print('v1')\n")
    return base


class CLI:
    """Runs branchctl as a user would, against one daemon."""

    def __init__(self, socket: Path) -> None:
        self.env = {**os.environ, "BRANCHD_SOCKET": str(socket)}

    def __call__(self, *args: str, check: int | None = 0,
                 cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "branching.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, cwd=cwd)
        if check is not None:
            assert proc.returncode == check, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str, check: int = 0, cwd: str | None = None) -> dict:
        return json.loads(self(*args, "--json", check=check, cwd=cwd).stdout)


@pytest.fixture
def cli(daemon: EmbeddedDaemon) -> CLI:
    return CLI(daemon.socket)


@pytest.fixture
def delegated() -> Iterator[list[str]]:
    """A cgroup of uid 65534's own in every hierarchy that runs use (v2's, and v1's
    memory, cpu, pids, blkio, freezer), as systemd delegates one to a user session:
    the directory and its interface files chowned to the user. Run by a user, none
    is made: the cgroups this process is in are that user's already (tests/user_pass.sh
    delegated them, as systemd does at login), and the user's daemons use them."""
    if os.geteuid() != 0:
        yield []
        return
    made = cgroups.delegated.delegate(NOBODY, f"branchd-test-user.{os.getpid()}")
    try:
        yield made
    finally:
        cgroups.delegated.remove(made)


@pytest.fixture
def nobody_top() -> Iterator[Path]:
    """A fresh directory of uid 65534's own (run by a user: of this user's), removed
    afterwards."""
    d = Path(tempfile.mkdtemp(prefix="branchd-unpriv-"))
    if os.geteuid() == 0:
        os.chown(d, NOBODY, NOBODY)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


def run_as_nobody(driver: str, top: Path, user_python: str, delegated: list[str],
                  timeout: float = 280) -> subprocess.CompletedProcess[str]:
    """Run the Python source *driver* as uid 65534 with *top* as its argument, its
    home and its runtime directory, from inside the *delegated* cgroups (entered as
    root, as systemd does, before becoming the user). Run by a user, the driver runs
    as this user, in the cgroups this process is in (``delegated``)."""
    (top / "driver.py").write_text(driver)
    env = {"PATH": os.defpath, "HOME": str(top), "XDG_RUNTIME_DIR": str(top),
           "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [user_python, str(top / "driver.py"), str(top)]
    if os.geteuid() == 0:
        enter = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in delegated)
        argv = ["sh", "-c", f'{enter}; exec "$@"', "sh", "setpriv", f"--reuid={NOBODY}",
                f"--regid={NOBODY}", "--clear-groups", *argv]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=str(top))
