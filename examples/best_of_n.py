#!/usr/bin/env python3
"""Every candidate patch runs to its end; the one with the best score is committed.

The same buggy project and patches as ``speculate_bugfix.py``, with ``BestOfN``:
each candidate applies its patch in its own branch and returns the number of
tests that pass as its score (a callable candidate's returned number is its
score; a command writes its score to fd 3 or ``$BRANCHING_SCORE_FILE``). The
patch that loops forever is killed by its 128M memory limit and scores
nothing. The best-scoring branch is committed, the others are discarded.

Scores may also come from outside, one per candidate (a model's logprobs, a
reviewer's grades): ``BestOfN(candidates, scores=[...])``.
"""

from __future__ import annotations

import functools
import sys

from textstats_support import (
    ENV,
    FIXES,
    PROJECT,
    apply_and_score,
    conclude,
    copy_project,
)

from branching import Limits, Workspace
from branching.patterns import BestOfN, Call


def main() -> int:
    workspace = copy_project()
    print(f"workspace: {workspace} (a copy of {PROJECT})")
    candidates = [Call(functools.partial(apply_and_score, patch), label=patch.name)
                  for patch in FIXES]
    best_of_n = BestOfN(candidates, timeout=60, env=ENV, max_parallel=len(candidates),
                        resource_limits=Limits(memory="128M", pids=64))
    print(f"running {len(candidates)} candidate patches to the end...")
    with Workspace(workspace) as ws:
        outcome = best_of_n(ws)
        left = [b.name for b in ws.branches() if b.status == "active"]

    for r in sorted(outcome.candidates, key=lambda r: -(r.score or -1)):
        mark = "->" if r.committed else "  "
        print(f"  {mark} {r.label:<22} {r.describe()}")
    if outcome.winner is None:
        print("no candidate succeeded; the workspace is unchanged")
        return 1
    print(f"\ncommitted {outcome.winner.label} (score {outcome.winner.score:g}); "
          f"branches left: {left or 'none'}")
    return conclude(workspace, left)


if __name__ == "__main__":
    sys.exit(main())
