"""Snapshot, fork and resume a conversation prefix on a vLLM engine.

    llm = make_engine(model_dir, store="/dev/shm/branchd-kv/run1")
    root = snapshot(llm, prefix_ids)              # prefilled once
    cands = candidates(llm, root, n=4, sampling)  # n= samples, each with a handle
    branches = fork(root, 4)                      # metadata copies, refcounted
    result = resume(llm, branches[0], test_output_ids, sampling)
    result.cached_tokens                          # vLLM's own count: prefix not recomputed

Same engine: the prefix is served from vLLM's prefix cache. vLLM offers no public
way to pin blocks against eviction, so a resume checks vLLM's cached-token count;
when the engine runs `BranchdConnector` with a store, blocks it evicted (or that
another engine process computed) are loaded from the store instead, and
otherwise they are recomputed; both are reported in the `ResumeResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from branching.kv.connector import PARAMS_KEY
from branching.kv.handle import PrefixHandle, block_keys, fingerprint_of, new_handle_id
from branching.kv.store import ChunkError, ChunkStore

log = logging.getLogger(__name__)

CONNECTOR = "BranchdConnector"
CONNECTOR_MODULE = "branching.kv.connector"


def engine_kwargs(store: str | None = None, capacity: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` that enable prefix caching and, with `store`,
    the connector that shares blocks through that store directory."""
    kwargs: dict[str, Any] = {"enable_prefix_caching": True}
    if store is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": CONNECTOR,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store": str(store), "capacity": capacity},
        }
    return kwargs


def make_engine(model: str | os.PathLike[str], *, store: str | None = None,
                capacity: int | None = None, **overrides: Any) -> LLM:
    """A `vllm.LLM` for token-id prompts, with prefix caching and (with `store`) the
    connector. Block size 32: vLLM's CPU attention needs a multiple of 32."""
    # vLLM's CPU backend sizes its KV cache from this variable only (GiB); 1 is
    # plenty for small models and keeps 2-core CI machines from reserving more.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs: dict[str, Any] = {
        "skip_tokenizer_init": True, "block_size": 32, "max_model_len": 8192,
        "disable_log_stats": False, **engine_kwargs(store, capacity),
    }
    kwargs.update(overrides)
    return LLM(model=str(model), **kwargs)


def engine_store(engine: LLM) -> ChunkStore | None:
    """The store the engine's connector uses, or None when it runs without one."""
    config = engine.llm_engine.vllm_config.kv_transfer_config
    if config is None or config.kv_connector != CONNECTOR:
        return None
    extra = config.kv_connector_extra_config
    return ChunkStore(extra["store"], extra.get("capacity"))


@dataclasses.dataclass
class ResumeResult:
    """One branch's request: what it generated and what vLLM says it recomputed."""

    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[float]
    prompt_tokens: int
    cached_tokens: int
    expected_cached: int
    loaded_tokens: int
    fallback: str | None
    handle: PrefixHandle

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the engine computed for this request (prefill paid)."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def evicted(self) -> bool:
        """The prefix was not (all) served from a cache: it was partly recomputed."""
        return self.cached_tokens < self.expected_cached


@dataclasses.dataclass
class Candidate:
    """One of n sampled continuations; `score` is its cumulative logprob (BestOfN's)."""

    index: int
    token_ids: list[int]
    score: float
    handle: PrefixHandle


def _params(sampling: SamplingParams, handle: PrefixHandle | None, save: bool,
            load: bool = True) -> SamplingParams:
    params = sampling.clone()
    extra = dict(params.extra_args or {})
    # the connector needs what identifies and checks the blocks, not the tokens
    # (it has them: they are the request's prompt)
    checks = None
    if handle is not None:
        checks = {"fingerprint": handle.fingerprint.to_json(), "keys": list(handle.keys),
                  "checksums": list(handle.checksums)}
    extra["kv_transfer_params"] = {PARAMS_KEY: {"handle": checks, "save": save, "load": load}}
    params.extra_args = extra
    return params


def _generate(engine: LLM, prompt: Sequence[int], params: SamplingParams) -> Any:
    return engine.generate([TokensPrompt(prompt_token_ids=list(prompt))], params,
                           use_tqdm=False)[0]


def snapshot(engine: LLM, prefix: Sequence[int]) -> PrefixHandle:
    """Prefill `prefix` once; with a store, also save its blocks there (checksummed)."""
    fingerprint = fingerprint_of(engine.llm_engine.vllm_config)
    store = engine_store(engine)
    handle = PrefixHandle(
        handle_id=new_handle_id(),
        fingerprint=fingerprint,
        token_ids=tuple(prefix),
        keys=tuple(block_keys(prefix, fingerprint.block_size)),
        store=str(store.path) if store else None,
    )
    if store is not None:
        store.retain(handle.handle_id, handle.keys)
    _generate(engine, prefix, _params(SamplingParams(max_tokens=1, detokenize=False),
                                      handle, save=store is not None))
    if store is None:
        return handle
    try:
        checksums = store.checksums(handle.keys)
    except ChunkError as e:
        log.warning("prefix %s not saved whole (%s): same-engine resume only",
                    handle.handle_id, e)
        return handle
    return dataclasses.replace(handle, checksums=tuple(checksums))


def fork(handle: PrefixHandle, n: int) -> list[PrefixHandle]:
    """`n` handles on the same prefix, one per branch: a metadata copy, each refcounted."""
    children = [dataclasses.replace(handle, handle_id=new_handle_id(), parent=handle.handle_id)
                for _ in range(n)]
    if handle.store is not None:
        store = ChunkStore(handle.store)
        for child in children:
            store.retain(child.handle_id, child.keys)
    return children


def release(handle: PrefixHandle) -> int:
    """A discarded branch gives its handle back; returns the store bytes freed."""
    if handle.store is None:
        return 0
    return ChunkStore(handle.store).release(handle.handle_id)


def resume(engine: LLM, handle: PrefixHandle, new_tokens: Sequence[int],
           sampling: SamplingParams, *, save: bool = False) -> ResumeResult:
    """Continue the branch: the prefix from cache (or store), only `new_tokens` computed.

    With `save`, this turn's prompt blocks go to the store too, so that the returned
    handle (prefix + new tokens + output) can resume in another engine.
    """
    prompt = list(handle.token_ids) + list(new_tokens)
    if sampling.logprobs is None:
        sampling = sampling.clone()
        sampling.logprobs = 0  # vLLM only reports cumulative logprobs when asked for some
    out = _generate(engine, prompt, _params(sampling, handle, save))
    completion = out.outputs[0]
    report = (out.kv_transfer_params or {}).get(PARAMS_KEY) or {}
    block = handle.fingerprint.block_size
    expected = min(handle.cached_tokens, (len(prompt) - 1) // block * block)
    child = handle.child(list(new_tokens) + list(completion.token_ids))
    if save and handle.store is not None:
        ChunkStore(handle.store).retain(child.handle_id, block_keys(prompt, block))
    result = ResumeResult(
        token_ids=list(completion.token_ids),
        cumulative_logprob=completion.cumulative_logprob,
        logprobs=_sampled_logprobs(completion),
        prompt_tokens=len(prompt),
        cached_tokens=int(out.num_cached_tokens or 0),
        expected_cached=expected,
        loaded_tokens=int(report.get("loaded_tokens", 0)),
        fallback=report.get("fallback"),
        handle=child,
    )
    if result.evicted:
        log.warning("branch %s: %d of %d prefix tokens recomputed (%s)", handle.handle_id,
                    expected - result.cached_tokens, expected,
                    result.fallback or "evicted from vLLM's prefix cache")
    return result


def _sampled_logprobs(completion: Any) -> list[float]:
    if not completion.logprobs:
        return []
    return [float(step[tok].logprob)
            for tok, step in zip(completion.token_ids, completion.logprobs, strict=True)]


def candidates(engine: LLM, handle: PrefixHandle, n: int, sampling: SamplingParams,
               new_tokens: Sequence[int] = ()) -> list[Candidate]:
    """`n` continuations of the prefix from one request (`n=`: prompt computed once),
    each scored by its cumulative logprob and carrying its own handle."""
    params = sampling.clone()
    params.n = n
    if params.logprobs is None:
        params.logprobs = 0
    prompt = list(handle.token_ids) + list(new_tokens)
    out = _generate(engine, prompt, _params(params, handle, save=False))
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
    """The baseline: `prompt` computed from scratch (vLLM's prefix cache emptied, the
    store not consulted). Needs an idle engine: resetting the cache waits for none."""
    fingerprint = fingerprint_of(engine.llm_engine.vllm_config)
    engine.reset_prefix_cache()
    if sampling.logprobs is None:
        sampling = sampling.clone()
        sampling.logprobs = 0
    out = _generate(engine, prompt, _params(sampling, None, save=False, load=False))
    completion = out.outputs[0]
    handle = PrefixHandle(new_handle_id(), fingerprint, tuple(prompt),
                          tuple(block_keys(prompt, fingerprint.block_size)))
    return ResumeResult(
        token_ids=list(completion.token_ids),
        cumulative_logprob=completion.cumulative_logprob,
        logprobs=_sampled_logprobs(completion),
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
    return _generate(engine, prompt, _params(sampling, None, save=False, load=False))
