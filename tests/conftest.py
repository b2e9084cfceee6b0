"""Suite-wide fixtures, and a guard: a test run must leave no FUSE or overlay mount behind.

Every fixture unmounts what it mounted; the guard checks it once at the end of
the session, detaches any leftover (so the machine stays usable) and fails the run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from branching import EmbeddedDaemon


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedDaemon]:
    """One real daemon (real FUSE mount) shared by the tests that need no daemon of their
    own; each test uses its own workspace directory. Stopped even when tests fail."""
    d = EmbeddedDaemon(tmp_path_factory.mktemp("branchd"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def branch_mounts() -> set[str]:
    """FUSE mounts, and the kernel overlays the daemon mounts on branch directories."""
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f
                if line.split()[2].startswith("fuse") or line.split()[2] == "overlay"}


_before: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(branch_mounts())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # only this run's mounts: they live under its temporary directory
    base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    left = {m for m in branch_mounts() - _before if m.startswith(base + "/")}
    if not left:
        return
    for mnt in sorted(left, key=len, reverse=True):  # overlays before the FUSE below them
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)
    print(f"\nFAILED: the tests left mounts behind: {', '.join(sorted(left))}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


USER_PYTHON_ENV = "BRANCHD_USER_PYTHON"


@pytest.fixture(scope="session")
def user_python() -> str:
    """An interpreter an ordinary user can run, with branchd installed in it.

    The suite's own venv lives where uid 65534 cannot reach (its interpreter is
    under /root here); tests/run.sh builds this one from Debian's /usr/bin/python3
    at a world-readable path, with the project installed (not editable), and names
    it in $BRANCHD_USER_PYTHON."""
    path = os.environ.get(USER_PYTHON_ENV)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"${USER_PYTHON_ENV} names no interpreter: run tests/run.sh, which builds it")
    return path
