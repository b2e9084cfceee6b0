#!/usr/bin/env python3
"""Candidate patches race to fix a bug, each in its own copy-on-write branch.

The README's main example (``bash bootstrap.sh example`` runs it). A small
project, ``buggy_project/`` (the ``textstats`` library), has a bug its unit
tests catch. Four candidate patches (``patches/fix/``) stand in for an agent's
ideas: two are wrong, one loops forever while eating memory, one is right.
``Speculate`` applies every patch in its own branch of the workspace at once,
runs the test suite there under a memory limit and a timeout, commits the first
branch whose tests pass and kills and discards the others: the workspace ends
with the fix and no trace of the other attempts.

The project is copied into a temporary workspace first; this copy is never
modified. Exits 0 when a fix was committed and the tests pass in the workspace.
"""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path

from textstats_support import (
    ENV,
    FIXES,
    PROJECT,
    apply_patch,
    conclude,
    copy_project,
    run_tests,
)

from branching import Limits, Workspace
from branching.patterns import Call, CandidateResult, Speculate

_print_lock = threading.Lock()


def fix_and_test(patch: Path, path: Path) -> bool:
    """One candidate, run inside its branch at ``path``: apply ``patch``, run the tests."""
    apply_patch(patch, path)
    passed, total = run_tests(path)
    print(f"{patch.name}: {passed}/{total} tests pass")
    return total > 0 and passed == total


def show(kind: str, r: CandidateResult) -> None:
    """Progress, as the candidates start and end (called from the pattern's threads)."""
    with _print_lock:
        if kind == "start":
            print(f"  started   {r.label:<22} in branch {r.branch}", flush=True)
        elif kind == "finish":
            print(f"  {r.status:<9} {r.label:<22} {_what(r)}", flush=True)


def _what(r: CandidateResult) -> str:
    if r.status == "cancelled":
        return "killed and discarded: another candidate won"
    return r.describe()


def main() -> int:
    workspace = copy_project()
    print(f"workspace: {workspace} (a copy of {PROJECT})")
    passed, total = run_tests(workspace, log=False)
    print(f"before: {passed}/{total} tests pass\n")

    candidates = [Call(functools.partial(fix_and_test, patch), label=patch.name)
                  for patch in FIXES]
    speculate = Speculate(
        candidates,
        timeout=60,
        resource_limits=Limits(memory="256M", pids=64),
        max_parallel=len(candidates),  # all race at once, even on a 2-core machine
        env=ENV,
        on_event=show,
    )
    print(f"racing {len(candidates)} candidate patches:")
    with Workspace(workspace) as ws:
        outcome = speculate(ws)
        left = [b.name for b in ws.branches() if b.status == "active"]

    print("\noutcome:")
    for r in outcome.candidates:
        mark = "->" if r.committed else "  "
        print(f"  {mark} {r.label:<22} {_what(r)}")
    if not outcome.committed:
        print("no candidate fixed the bug; the workspace is unchanged")
        return 1
    assert outcome.winner is not None
    print(f"\ncommitted {outcome.winner.label} from branch {outcome.winner.branch}; "
          f"branches left: {left or 'none'}")
    return conclude(workspace, left, show_diff_header=True)


if __name__ == "__main__":
    sys.exit(main())
