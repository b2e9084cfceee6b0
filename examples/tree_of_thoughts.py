#!/usr/bin/env python3
"""A two-level change found by ``TreeOfThoughts`` over nested branches.

Level 1 fixes the bug in ``top_words`` (the patches in ``patches/fix/``); level
2, in branches nested inside a level-1 branch, adds a feature on top of that
fix (``patches/feature/``: a ``longest_words`` function with its tests). A node
scores the number of tests passing in its branch; the search expands the best
fix first, and its first feature branch where the *whole* suite passes is the
goal. That branch is committed into its level-1 branch, which is committed into
the workspace; every other branch, at either level, is discarded.
"""

from __future__ import annotations

import functools
import sys

from textstats_support import (
    ENV,
    FEATURES,
    FIXES,
    PROJECT,
    apply_and_score,
    conclude,
    copy_project,
    run_tests,
)

from branching import Limits, Workspace
from branching.patterns import Call, CandidateResult, TreeOfThoughts


def features(node: CandidateResult) -> list[Call]:
    """The children of a level-1 fix: each feature patch, in a branch nested in the fix's."""
    return [Call(functools.partial(apply_and_score, patch), label=f"{node.label} + {patch.name}")
            for patch in FEATURES]


def all_pass(node: CandidateResult) -> bool:
    """The goal: a level-2 node in whose branch every test passes."""
    if node.depth < 2 or node.path is None:
        return False
    passed, total = run_tests(node.path, log=False)
    return passed == total


def main() -> int:
    workspace = copy_project()
    print(f"workspace: {workspace} (a copy of {PROJECT})")
    search = TreeOfThoughts(
        [Call(functools.partial(apply_and_score, patch), label=patch.name) for patch in FIXES],
        max_depth=2, expand=features, goal=all_pass,
        timeout=60, env=ENV, max_parallel=len(FIXES),
        resource_limits=Limits(memory="128M", pids=64),
    )
    with Workspace(workspace) as ws:
        outcome = search(ws)
        left = [b.name for b in ws.branches() if b.status == "active"]

    for r in outcome.candidates:
        mark = "->" if r.committed else "  "
        indent = "    " * (r.depth - 1)
        print(f"  {mark} {indent}{r.label:<{50 - len(indent)}} {r.describe()}")
    if outcome.winner is None:
        print("no path through the tree passed every test; the workspace is unchanged")
        return 1
    print(f"\ncommitted {outcome.winner.label}; branches left: {left or 'none'}")
    return conclude(workspace, left)


if __name__ == "__main__":
    sys.exit(main())
