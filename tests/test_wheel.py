"""The project as a user gets it: ``pip install`` of the built wheel into a fresh venv.

tests/run.sh builds that venv from Debian's /usr/bin/python3 with ``pip install .``
(a wheel built from this tree, not an editable install) and names its interpreter
in $BRANCHD_USER_PYTHON. Its ``branchctl`` and ``branchd`` scripts and the
``branching`` package must work from anywhere, with this checkout out of reach.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def clean_env() -> dict[str, str]:
    """What a login shell has: nothing of this suite's venv or of the checkout."""
    return {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def test_the_installed_wheel_has_working_commands_and_package(user_python: str,
                                                               tmp_path: Path) -> None:
    bindir = Path(user_python).parent
    env = clean_env()
    where = subprocess.run(
        [user_python, "-c", "import branching, branchfs, daemon, cgroups; "
         "print(branching.__file__); print(daemon.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.split()
    assert all("site-packages" in p and not p.startswith(str(REPO)) for p in where), where
    for script in ("branchctl", "branchd"):
        proc = subprocess.run([str(bindir / script), "--help"], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (script, proc.stderr)
    # a whole branch life through the installed branchctl, with its own embedded daemon
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "a.txt").write_text("old\n")
    proc = subprocess.run([str(bindir / "branchctl"), "run", "-w", str(ws), "--no-progress",
                           "--", "sh", "-c", "echo new > a.txt"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert (ws / "a.txt").read_text() == "new\n"
    assert not any(m.startswith(str(tmp_path)) for m in mounts()), "left a mount behind"


def mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f]


def test_the_wheel_carries_no_test_code(user_python: str) -> None:
    site = subprocess.run([user_python, "-c", "import branching, os; "
                           "print(os.path.dirname(os.path.dirname(branching.__file__)))"],
                          capture_output=True, text=True, env=clean_env(), check=True,
                          cwd="/").stdout.strip()
    assert not os.path.exists(os.path.join(site, "tests")), site
