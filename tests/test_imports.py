"""Every public name of ``branching`` resolves (what branchctl imports: test_cli_imports.py)."""

from __future__ import annotations

import branching


def test_every_public_name_resolves() -> None:
    for name in branching.__all__:
        assert getattr(branching, name) is not None

