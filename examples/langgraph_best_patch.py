#!/usr/bin/env python3
"""A LangGraph graph that forks the workspace, tries patches in parallel, commits the best.

    fork ──Send──▶ candidate ×4 (in parallel) ──▶ pick ──▶ commit

No network and no model: the candidates are the fixed patches of ``patches/fix/``
on a copy of ``buggy_project/`` (as in ``speculate_bugfix.py``), one of them a
loop that eats memory until its cgroup's limit kills it. The graph's state holds
branches only as ``BranchRef`` dicts, plain data that a checkpointer could store:
each node opens the branch it needs again (``BranchRef.aopen``). The nodes are
async and the candidates' runs (``Branch.arun``) go on at once on asyncio's loop.

``pip install 'branchd[langgraph]'``; exits 0 when the best patch is committed and
the workspace's tests pass.
"""

from __future__ import annotations

import asyncio
import operator
import os
import sys
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from textstats_support import ENV, FIXES, PROJECT, conclude, copy_project, count_tests

from branching import BranchRef, Limits, Workspace

LIMITS = Limits(memory="128M", pids=64, timeout=60)


class State(TypedDict, total=False):
    fork: dict[str, str]  # a BranchRef: the branch the candidates start from
    # each candidate's branch, patch and score; appended to by the parallel candidates
    tried: Annotated[list[dict[str, Any]], operator.add]
    best: dict[str, Any] | None


class Attempt(TypedDict):  # what Send gives one candidate
    fork: dict[str, str]
    patch: str


def make_graph(ws: Workspace) -> Any:
    async def fork(state: State) -> State:
        b = await ws.acreate("fork")
        return {"fork": b.ref().to_dict()}

    def fan_out(state: State) -> list[Send]:
        return [Send("candidate", Attempt(fork=state["fork"], patch=str(p))) for p in FIXES]

    async def candidate(attempt: Attempt) -> State:
        parent = await BranchRef.from_dict(attempt["fork"]).aopen()
        b = await parent.acreate()
        r = await b.arun(f"git apply -p1 {attempt['patch']} && {sys.executable} -m unittest -q",
                         limits=LIMITS, env={**os.environ, **ENV})
        passed, total = count_tests(r.stderr)
        why = "oom-killed" if r.oom_killed else "timed out" if r.timed_out else "ran"
        name = attempt["patch"].rsplit("/", 1)[-1]
        print(f"  {name:<24} {why}: {passed}/{total} tests pass", flush=True)
        return {"tried": [{"ref": b.ref().to_dict(), "patch": name, "score": passed}]}

    async def pick(state: State) -> State:
        tried = sorted(state["tried"], key=lambda t: (-t["score"], t["patch"]))
        best = tried[0] if tried and tried[0]["score"] > 0 else None
        for t in tried:  # the others are of no more use
            if t is not best:
                await (await BranchRef.from_dict(t["ref"]).aopen()).adiscard()
        return {"best": best}

    async def commit(state: State) -> State:
        forked = await BranchRef.from_dict(state["fork"]).aopen()
        best = state.get("best")
        if best is None:
            await forked.adiscard()
            return {}
        await (await BranchRef.from_dict(best["ref"]).aopen()).acommit()  # into the fork
        await forked.acommit()  # and the fork into the workspace
        print(f"committed {best['patch']} (score {best['score']})")
        return {}

    g = StateGraph(State)
    g.add_node("fork", fork)
    g.add_node("candidate", candidate)
    g.add_node("pick", pick)
    g.add_node("commit", commit)
    g.add_edge(START, "fork")
    g.add_conditional_edges("fork", fan_out, ["candidate"])
    g.add_edge("candidate", "pick")
    g.add_edge("pick", "commit")
    g.add_edge("commit", END)
    return g.compile()


async def amain() -> int:
    workspace = copy_project()
    print(f"workspace: {workspace} (a copy of {PROJECT})")
    with Workspace(workspace) as ws:
        print(f"trying {len(FIXES)} patches in parallel:")
        final = await make_graph(ws).ainvoke({"tried": []})
        left = [b.name for b in await ws.abranches() if b.status == "active"]
    print(f"branches left: {left or 'none'}")
    if final.get("best") is None:
        print("no patch passed a test; the workspace is unchanged")
        return 1
    return conclude(workspace, left)


if __name__ == "__main__":
    sys.exit(asyncio.run(amain()))
