"""A small Python project with a venv and an editable install, for the workspace-path tests.

Self-contained (it needs only branching): tests/daemon/test_unprivileged.py copies
this file to where uid 65534 can read it and imports it there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from branching import Command

GOOD = "def add(a, b):\n    return a + b\n"
BROKEN = "def add(a, b):\n    return a - b\n"


def make_project(root: Path, python: str = sys.executable) -> Path:
    """``root`` with package mylib (src layout), a venv and ``pip install -e .`` done."""
    (root / "src" / "mylib").mkdir(parents=True)
    (root / "src" / "mylib" / "__init__.py").write_text(GOOD + textwrap.dedent("""
        def check():
            import sys
            sys.exit(0 if add(2, 2) == 4 else 1)
        """))
    (root / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "mylib"
        version = "1.0"
        [project.scripts]
        mylib-check = "mylib:check"
        """))
    install_editable(root, ".venv", python)
    return root


# ``pip install -e .`` offline: setuptools (the suite's) builds the editable wheel,
# pip (the suite's, run for the target venv) installs it: a .pth naming src/ and
# console scripts whose shebang names the venv's python, as pip -e makes them.
INSTALL_EDITABLE = """
set -e
{py} -m venv --without-pip {venv}
{py} -c "from setuptools import build_meta; build_meta.build_editable('{dist}')" >/dev/null
{py} -m pip --python {venv}/bin/python install -q --no-index --no-deps \
    --disable-pip-version-check {dist}/*.whl
rm -r {dist}
"""


def install_editable(root: Path, venv: str, python: str = sys.executable) -> None:
    """A venv made by ``python`` with the project in ``root`` installed editable."""
    subprocess.run(["sh", "-c", editable_script(venv, python)], cwd=root, check=True)


def editable_script(venv: str, python: str = sys.executable) -> str:
    return INSTALL_EDITABLE.format(py=python, venv=venv, dist=f"/tmp/dist-{os.getpid()}")


def candidates(root: Path) -> list[Command]:
    lib = root / "src" / "mylib" / "__init__.py"
    check = f"{root}/.venv/bin/mylib-check"
    return [
        Command(f"sed -i 's/a + b/a - b/' {lib} && {check}", label="break"),
        Command(f"echo '# reviewed' >> {lib} && {check}", label="good"),
    ]


