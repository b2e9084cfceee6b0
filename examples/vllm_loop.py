#!/usr/bin/env python3
"""The whole agent loop with vLLM: candidates from one n= request, one branch each,
the best passing candidate committed, and its conversation resumed without prefill.

1. A vLLM engine (CPU build here, a tiny random-weight Llama built on the fly) holds
   the agent's conversation so far: the prefix. `snapshot` prefills it once and
   saves its KV blocks, checksummed, to a shared-memory store.
2. `candidates(..., n=4)` samples four continuations in one request (the prompt is
   computed once), each scored by its cumulative logprob and carrying its own
   prefix handle.
3. A random model cannot write code. So, plainly: the model's output is constrained
   (`allowed_token_ids`) to one "choice" token per candidate patch file in
   examples/patches/fix/, and the sampled token picks the patch. The patches are
   hand-written; the model only chooses among them, and its logprob is the score.
4. `BestOfN` runs each chosen patch in its own copy-on-write branch of the buggy
   project; a candidate whose tests fail does not count; of those that pass, the
   highest logprob commits. The other branches vanish, and their handles are
   released (store chunks nobody references are freed).
5. The winner's conversation continues: the test output (turned into token ids by a
   toy byte tokenizer, since the model has no tokenizer) is appended and the next
   step asked for. vLLM reports that the whole prefix came from its cache: only the
   new tokens were computed.

    python examples/vllm_loop.py
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from textstats_support import ENV, FIXES, PROJECT, apply_patch, copy_project, run_tests

if TYPE_CHECKING:
    from vllm import LLM

    from branching.kv.fork import Candidate
    from branching.kv.store import ChunkStore

CHOICE_BASE = 10  # token id of the choice for FIXES[0]; FIXES[i] is CHOICE_BASE + i


def toy_tokens(text: str) -> list[int]:
    """Token ids for text, one per byte (the tiny model has no tokenizer)."""
    return [3 + b for b in text.encode()]


def patch_passes(patch: Path, path: Path) -> float:
    """One candidate, inside its branch: apply the patch; fail unless every test passes."""
    apply_patch(patch, path)
    passed, total = run_tests(path)
    print(f"  {patch.name}: {passed}/{total} tests pass")
    if passed != total:
        raise AssertionError(f"{patch.name}: {total - passed} tests fail")
    return float(passed)


def main() -> int:
    # The engine core in this process: one process to start and to clean up. vLLM is
    # imported here, not at the top: each candidate's child process imports this
    # script to find patch_passes, and must not pay for (or run) vLLM.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vLLM's import warns about torch deprecations
        from branching.kv.fork import make_engine
        from branching.kv.store import ChunkStore
        from branching.kv.tiny import build_tiny_llama
    tmp = Path(tempfile.mkdtemp(prefix="vllm-loop-"))
    store_dir = Path("/dev/shm") / f"branchd-kv-example-{os.getpid()}"
    try:
        model = build_tiny_llama(tmp / "tiny")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = make_engine(model, store=str(store_dir), dtype="float32",
                                 max_model_len=4096, enforce_eager=True)
        return loop(engine, ChunkStore(store_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(store_dir, ignore_errors=True)


def loop(engine: LLM, store: ChunkStore) -> int:
    from vllm import SamplingParams

    from branching import Workspace
    from branching.kv.fork import candidates, release, resume, snapshot
    from branching.patterns import BestOfN, Call

    readme = (PROJECT / "README.md").read_text()
    source = "".join(p.read_text() for p in sorted((PROJECT / "textstats").glob("*.py")))
    prefix = toy_tokens("You are fixing this project.\n" + readme + source
                        + "\nThe tests fail. Which patch?")
    root = snapshot(engine, prefix)
    print(f"prefix: {len(prefix)} tokens, prefilled once; "
          f"{len(root.checksums)} blocks saved to {store.path}")

    choices = [CHOICE_BASE + i for i in range(len(FIXES))]
    sampling = SamplingParams(max_tokens=1, temperature=1.0, seed=7, detokenize=False,
                              allowed_token_ids=choices)
    cands = candidates(engine, root, len(FIXES), sampling)
    chosen: dict[Path, Candidate] = {}
    for c in sorted(cands, key=lambda c: -c.score):
        patch = FIXES[c.token_ids[0] - CHOICE_BASE]
        print(f"candidate {c.index}: chose {patch.name}  logprob {c.score:.3f}")
        chosen.setdefault(patch, c)  # the same patch sampled twice runs once
    for c in cands:
        if c not in chosen.values():
            release(c.handle)

    patches = list(chosen)
    workspace = copy_project()
    print(f"\nworkspace {workspace}: {len(patches)} distinct patches, one branch each")
    best = BestOfN([Call(functools.partial(patch_passes, p), label=p.name) for p in patches],
                   scores=[chosen[p].score for p in patches], timeout=60, env=ENV,
                   max_parallel=len(patches))
    with Workspace(workspace) as ws:
        outcome = best(ws)
    shutil.rmtree(workspace.parent, ignore_errors=True)
    for r in outcome.candidates:
        print(f"  {'->' if r.committed else '  '} {r.label:<22} {r.describe()}")
    for patch in patches:
        if outcome.winner is None or patch.name != outcome.winner.label:
            release(chosen[patch].handle)  # the losers' branches and handles go
    if outcome.winner is None:
        print("no candidate passed its tests; nothing committed")
        return 1
    winner = next(chosen[p] for p in patches if p.name == outcome.winner.label)
    print(f"committed {outcome.winner.label} (logprob {outcome.winner.score:.3f})")

    test_output = toy_tokens(f"Applied {outcome.winner.label}. All tests pass. Next step?")
    turn = resume(engine, winner.handle, test_output,
                  SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, detokenize=False))
    # the chosen token's KV was never computed; the prefix's partial last block comes
    # from the store unless the chosen token filled that block
    rest = turn.computed_tokens - len(test_output) - 1
    print(f"next turn: prompt {turn.prompt_tokens} tokens, {turn.cached_tokens} not computed "
          f"({turn.loaded_tokens} of them loaded from the store: the prefix's partial last "
          f"block), {turn.computed_tokens} computed = the {len(test_output)} tokens of test "
          f"output and the chosen token" + (f" and {rest} of the prefix's last block" if rest
                                            else ""))
    release(winner.handle)
    release(root)
    usage = store.usage()
    print(f"store after release: {usage.chunks} chunks, {usage.bytes} bytes")
    return 0 if turn.computed_tokens <= len(test_output) + 32 else 1


if __name__ == "__main__":
    sys.exit(main())
