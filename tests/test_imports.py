"""The public names import, and branchctl starts without the heavy machinery."""

from __future__ import annotations

import subprocess
import sys

import branching


def test_every_public_name_resolves() -> None:
    for name in branching.__all__:
        assert getattr(branching, name) is not None


def test_cli_import_leaves_patterns_psutil_and_rich_unloaded() -> None:
    code = ("import sys, branching.cli; "
            "print(sorted(m for m in ('branching.patterns', 'psutil', 'rich', 'asyncio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
