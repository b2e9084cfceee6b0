"""Every ```python block of the README runs as written, against the shared daemon.

A block gets what its text assumes and nothing more: ``~/proj`` is a small project
in a home of its own (``$HOME``), with a ``.venv`` (the suite's own environment,
which has pytest) and a test that passes, and ``$BRANCHD_SOCKET`` names the daemon.
Blocks that are not meant to run as they are (an overview with placeholder names)
are fenced as ``text``, never as ``python``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from branching import EmbeddedDaemon

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.S | re.M)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3, "the README's python blocks were not found"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_block_runs(block: str, daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    home = tmp_path / "home"
    proj = home / "proj"
    proj.mkdir(parents=True)
    (proj / "README").write_text("hello\n")
    (proj / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    (proj / ".venv").symlink_to(sys.prefix)
    env = {**os.environ, "HOME": str(home), "BRANCHD_SOCKET": str(daemon.socket),
           "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-c", block], cwd=home, env=env, capture_output=True,
                       text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
