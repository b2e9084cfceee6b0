"""Snapshot, fork and resume a conversation prefix on a vLLM engine.

    llm = make_engine(model_dir, store="/dev/shm/branchd-kv/run1")
    root = snapshot(llm, prefix_ids)              # prefilled once
    cands = candidates(llm, root, n=4, sampling)  # n= samples, each with a handle
    branches = fork(root, 4)                      # metadata copies, refcounted
    result = resume(llm, branches[0], test_output_ids, sampling)
    result.cached_tokens                          # vLLM's own count: prefix not recomputed

Same engine: the prefix is served from vLLM's prefix cache; `snapshot(..., pin=True)`
keeps its blocks there (the connector holds them in vLLM's block pool) while some
handle on it is not released, up to the engine's `pin_share`. A resume checks vLLM's
cached-token count; when the engine runs `BranchdConnector` with a store, blocks it
evicted (or that another engine process computed) are loaded from the store instead,
and otherwise they are recomputed; both are reported in the `ResumeResult`. With a
store the prefix's partial last block is saved too, so a resume computes only its
new tokens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from branching.kv.handle import (
    PrefixHandle,
    block_keys,
    fingerprint_of,
    handle_of,
    new_handle_id,
)
from branching.kv.requests import (
    Eviction,
    ResumeResult,
    Snapshot,
    evict_request,
    evict_result,
    finish_snapshot,
    kv_transfer_config,
    prompt_of,
    resume_request,
    resume_result,
    sampled_logprobs,
    start_snapshot,
    store_of,
    transfer_params,
    with_logprobs,
)
from branching.kv.store import ChunkStore


def engine_kwargs(store: str | None = None, capacity: int | None = None,
                  pin_share: float | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` that enable prefix caching and, with `store`,
    the connector that shares blocks through that store directory (and pins at most
    `pin_share` of the engine's blocks)."""
    kwargs: dict[str, Any] = {"enable_prefix_caching": True}
    if store is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(store, capacity, pin_share)
    return kwargs


def make_engine(model: str | os.PathLike[str], *, store: str | None = None,
                capacity: int | None = None, pin_share: float | None = None,
                **overrides: Any) -> LLM:
    """A `vllm.LLM` for token-id prompts, with prefix caching and (with `store`) the
    connector. Block size 32: vLLM's CPU attention needs a multiple of 32."""
    # vLLM's CPU backend sizes its KV cache from this variable only (GiB); 1 is
    # plenty for small models and keeps 2-core CI machines from reserving more.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs: dict[str, Any] = {
        "skip_tokenizer_init": True, "block_size": 32, "max_model_len": 8192,
        "disable_log_stats": False, **engine_kwargs(store, capacity, pin_share),
    }
    kwargs.update(overrides)
    return LLM(model=str(model), **kwargs)


def engine_store(engine: LLM) -> ChunkStore | None:
    """The store the engine's connector uses, or None when it runs without one."""
    return store_of(engine.llm_engine.vllm_config)


@dataclasses.dataclass
class Candidate:
    """One of n sampled continuations; `score` is its cumulative logprob (BestOfN's)."""

    index: int
    token_ids: list[int]
    score: float
    handle: PrefixHandle


def _generate(engine: LLM, prompt: TokensPrompt, params: SamplingParams) -> Any:
    return engine.generate([prompt], params, use_tqdm=False)[0]


def snapshot(engine: LLM, prefix: Sequence[int], *, cache_salt: str | None = None,
             pin: bool = False) -> PrefixHandle:
    """Prefill `prefix` once; with a store, also save its blocks there (checksummed).
    With `cache_salt`, the prefix's blocks are shared only by requests of that salt
    (vLLM's prefix cache and the store alike); the handle and its forks carry it.
    With `pin`, its blocks stay in the engine's cache while any handle on it is held
    (`take_snapshot` says whether the engine pinned them)."""
    return take_snapshot(engine, prefix, cache_salt=cache_salt, pin=pin).handle


def take_snapshot(engine: LLM, prefix: Sequence[int], *, cache_salt: str | None = None,
                  pin: bool = False) -> Snapshot:
    """`snapshot`, with the engine's answer to `pin`: `pinned`, or `pin_refused` (why)."""
    handle, prompt, params = start_snapshot(engine.llm_engine.vllm_config, prefix,
                                            cache_salt, pin)
    return finish_snapshot(handle, _generate(engine, prompt, params))


def fork(handle: PrefixHandle, n: int) -> list[PrefixHandle]:
    """`n` handles on the same prefix, one per branch: a metadata copy, each refcounted."""
    children = [dataclasses.replace(handle, handle_id=new_handle_id(), parent=handle.handle_id)
                for _ in range(n)]
    if handle.store is not None:
        store = ChunkStore(handle.store)
        for child in children:
            store.retain(child.handle_id, child.chunk_keys)
    return children


def release(handle: PrefixHandle) -> int:
    """A discarded branch gives its handle back; returns the store bytes freed. The last
    handle on a pinned prefix unpins it (at the engine's next scheduler step)."""
    if handle.store is None:
        return 0
    return ChunkStore(handle.store).release(handle.handle_id)


def discard(branch: Any) -> int:
    """Discard a workspace branch (`Branch.abort`) and release the handle it carries
    (`attach`), if any; returns the store bytes freed."""
    handle = handle_of(branch)
    branch.abort()
    return release(handle) if handle is not None else 0


def evict(engine: LLM) -> Eviction:
    """Evict every block of the engine's prefix cache that no request uses and no held
    handle pins (the pins of released handles are dropped first): what vLLM's
    `reset_prefix_cache` does when nothing is pinned, which it refuses otherwise.
    Needs the connector (`make_engine(..., store=...)`): without it nothing is pinned,
    and `reset_prefix_cache` is the way."""
    if engine_store(engine) is None:
        raise ValueError("evict needs an engine running BranchdConnector (a store)")
    prompt, params = evict_request()
    return evict_result(_generate(engine, prompt, params))


def resume(engine: LLM, handle: PrefixHandle, new_tokens: Sequence[int],
           sampling: SamplingParams, *, save: bool = False) -> ResumeResult:
    """Continue the branch: the prefix from cache (or store), only `new_tokens` computed.

    With `save`, this turn's prompt blocks go to the store too, so that the returned
    handle (prefix + new tokens + output) can resume in another engine.
    """
    prompt, params = resume_request(handle, new_tokens, sampling, save)
    return resume_result(_generate(engine, prompt, params), handle, new_tokens, save)


def candidates(engine: LLM, handle: PrefixHandle, n: int, sampling: SamplingParams,
               new_tokens: Sequence[int] = ()) -> list[Candidate]:
    """`n` continuations of the prefix from one request (`n=`: prompt computed once),
    each scored by its cumulative logprob and carrying its own handle."""
    params = with_logprobs(sampling).clone()
    params.n = n
    out = _generate(engine, prompt_of(handle, new_tokens), transfer_params(params, handle, False))
    return [
        Candidate(
            index=i,
            token_ids=list(c.token_ids),
            score=float(c.cumulative_logprob),
            handle=handle.child(list(new_tokens) + list(c.token_ids)),
        )
        for i, c in enumerate(out.outputs)
    ]


def prefill(engine: LLM, prompt: Sequence[int], sampling: SamplingParams) -> ResumeResult:
    """The baseline: `prompt` computed from scratch (vLLM's prefix cache not read, even
    where blocks are pinned, and the store not consulted)."""
    fingerprint = fingerprint_of(engine.llm_engine.vllm_config)
    cold = with_logprobs(sampling).clone()
    cold.skip_reading_prefix_cache = True
    out = _generate(engine, TokensPrompt(prompt_token_ids=list(prompt)),
                    transfer_params(cold, None, save=False, load=False))
    completion = out.outputs[0]
    handle = PrefixHandle(new_handle_id(), fingerprint, tuple(prompt),
                          tuple(block_keys(prompt, fingerprint.block_size)))
    return ResumeResult(
        token_ids=list(completion.token_ids),
        cumulative_logprob=completion.cumulative_logprob,
        logprobs=sampled_logprobs(completion),
        prompt_tokens=len(prompt),
        cached_tokens=int(out.num_cached_tokens or 0),
        expected_cached=0,
        loaded_tokens=0,
        fallback=None,
        handle=handle.child(completion.token_ids),
    )


def prompt_tokens_by_source(engine: LLM) -> dict[str, int]:
    """vLLM's own counters of prompt tokens since the engine started, by where they
    came from: local_compute (prefill paid), local_cache_hit, external_kv_transfer."""
    counts: dict[str, int] = {}
    for metric in engine.get_metrics():
        if metric.name == "vllm:prompt_tokens_by_source":
            source = metric.labels.get("source", "")
            counts[source] = counts.get(source, 0) + int(getattr(metric, "value", 0))
    return counts


def plain_request(engine: LLM, prompt: Sequence[int], sampling: SamplingParams) -> Any:
    """A request as plain vLLM serves it: its prefix cache alone, the store not
    consulted (the baseline the forks are measured against). Returns vLLM's output."""
    return _generate(engine, TokensPrompt(prompt_token_ids=list(prompt)),
                     transfer_params(sampling, None, save=False, load=False))
