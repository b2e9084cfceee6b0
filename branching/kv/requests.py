"""What a KV-fork request to vLLM carries and what its answer says, whatever the engine.

The in-process API (`fork.py`, a `vllm.LLM`) and the HTTP routes (`routes.py`, the
`AsyncLLM` of `vllm serve`) both build their prompts and `kv_transfer_params` here and
read vLLM's output here; only the call that runs the request differs. A snapshot is
`start_snapshot` (handle, refs in the store), the request, `finish_snapshot`
(checksums, and whether the engine pinned the prefix); a resume is `resume_request`,
the request, `resume_result`; `evict_request` and `evict_result` empty the engine's
prefix cache of every block no handle pins.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from branching.kv.connector import PARAMS_KEY
from branching.kv.handle import (
    PrefixHandle,
    block_keys,
    fingerprint_of,
    new_handle_id,
    tail_key,
)
from branching.kv.store import ChunkError, ChunkStore

log = logging.getLogger(__name__)

CONNECTOR = "BranchdConnector"
CONNECTOR_MODULE = "branching.kv.connector"


def kv_transfer_config(store: str | os.PathLike[str], capacity: int | None = None,
                       pin_share: float | None = None) -> dict[str, Any]:
    """The engine's `kv_transfer_config` (`--kv-transfer-config` of `vllm serve`, as
    JSON) naming `BranchdConnector` with its store directory, the store's capacity
    (bytes) and the share of the engine's KV blocks that pinned prefixes may hold
    (default `connector.DEFAULT_PIN_SHARE`)."""
    extra: dict[str, Any] = {"store": str(store), "capacity": capacity}
    if pin_share is not None:
        extra["pin_share"] = pin_share
    return {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def store_of(vllm_config: Any) -> ChunkStore | None:
    """The store an engine's connector uses, or None when it runs without one."""
    config = vllm_config.kv_transfer_config
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
    text: str = ""
    pinned: bool = False  # the handle's full blocks were pinned in the engine


    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the engine computed for this request (prefill paid)."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def evicted(self) -> bool:
        """The prefix was not (all) served from a cache: it was partly recomputed."""
        return self.cached_tokens < self.expected_cached


def transfer_params(sampling: SamplingParams, handle: PrefixHandle | None, save: bool,
                    load: bool = True, pin: bool = False, tail: bool = False,
                    evict: bool = False) -> SamplingParams:
    """`sampling` with the connector's `kv_transfer_params`: what identifies and checks
    the handle's blocks (not its tokens: the connector has them, they are the prompt),
    whether to save this prompt's full blocks (and, with `tail`, its partial last one),
    whether to load any, whether to pin the saved full blocks in the engine while some
    handle in the store holds them, and (`evict`) to evict every unpinned cached block."""
    params = sampling.clone()
    extra = dict(params.extra_args or {})
    checks: dict[str, Any] | None = None
    if handle is not None:
        checks = {"fingerprint": handle.fingerprint.to_json(), "keys": list(handle.keys),
                  "checksums": list(handle.checksums), "tail": None}
        if handle.tail_key is not None and handle.tail_checksum is not None:
            checks["tail"] = {"key": handle.tail_key, "checksum": handle.tail_checksum,
                              "tokens": handle.tail_tokens}
    extra["kv_transfer_params"] = {PARAMS_KEY: {
        "handle": checks, "save": save, "load": load, "pin": pin, "tail": tail,
        "evict": evict}}
    params.extra_args = extra
    return params


def with_logprobs(sampling: SamplingParams) -> SamplingParams:
    """vLLM only reports cumulative logprobs when asked for some."""
    if sampling.logprobs is not None:
        return sampling
    sampling = sampling.clone()
    sampling.logprobs = 0
    return sampling


def prompt_of(handle: PrefixHandle, new_tokens: Sequence[int] = ()) -> TokensPrompt:
    """The handle's tokens then `new_tokens`, under the handle's cache salt."""
    prompt = TokensPrompt(prompt_token_ids=list(handle.token_ids) + list(new_tokens))
    if handle.cache_salt:
        prompt["cache_salt"] = handle.cache_salt
    return prompt


@dataclasses.dataclass
class Snapshot:
    """A snapshot's handle, and whether the engine pinned its prefix (asked with `pin`):
    `pin_refused` says why not (over the engine's `pin_share`, say)."""

    handle: PrefixHandle
    pinned: bool = False
    pin_refused: str | None = None


def start_snapshot(vllm_config: Any, prefix: Sequence[int], cache_salt: str | None = None,
                   pin: bool = False) -> tuple[PrefixHandle, TokensPrompt, SamplingParams]:
    """A new root handle on `prefix` (its refs taken in the store before the blocks are
    written, its partial last block's too), and the one-token request whose prefill
    computes (and saves, and with `pin` pins) them."""
    fingerprint = fingerprint_of(vllm_config)
    store = store_of(vllm_config)
    tail = tail_key(prefix, fingerprint.block_size, cache_salt) if store else None
    handle = PrefixHandle(
        handle_id=new_handle_id(),
        fingerprint=fingerprint,
        token_ids=tuple(prefix),
        keys=tuple(block_keys(prefix, fingerprint.block_size, cache_salt)),
        store=str(store.path) if store else None,
        cache_salt=cache_salt or None,
        tail_key=tail,
        tail_tokens=len(prefix) % fingerprint.block_size if tail else None,
    )
    if store is not None:
        store.retain(handle.handle_id, handle.chunk_keys)
    params = transfer_params(SamplingParams(max_tokens=1, detokenize=False), handle,
                             save=store is not None, pin=pin, tail=True)
    return handle, prompt_of(handle), params


def finish_snapshot(handle: PrefixHandle, out: Any) -> Snapshot:
    """After the snapshot's request (vLLM's output `out`): the handle with its blocks'
    checksums, or as it was (same-engine resume only) when the store lacks some of
    them, without its tail when the store lacks that; and the engine's pin report."""
    report = (out.kv_transfer_params or {}).get(PARAMS_KEY) or {}
    pinned, refused = bool(report.get("pinned")), report.get("pin_refused")
    if refused:
        log.warning("prefix %s not pinned: %s", handle.handle_id, refused)
    if handle.store is None:
        return Snapshot(handle, pinned, refused)
    store = ChunkStore(handle.store)
    try:
        checksums = store.checksums(handle.keys)
    except ChunkError as e:
        log.warning("prefix %s not saved whole (%s): same-engine resume only",
                    handle.handle_id, e)
        return Snapshot(dataclasses.replace(handle, tail_key=None, tail_tokens=None),
                        pinned, refused)
    handle = dataclasses.replace(handle, checksums=tuple(checksums))
    if handle.tail_key is not None:
        try:
            [crc] = store.checksums([handle.tail_key])
            handle = dataclasses.replace(handle, tail_checksum=crc)
        except ChunkError as e:
            log.warning("prefix %s: partial last block not saved (%s): it is recomputed "
                        "on resume", handle.handle_id, e)
            handle = dataclasses.replace(handle, tail_key=None, tail_tokens=None)
            store.retain(handle.handle_id, handle.chunk_keys)
    return Snapshot(handle, pinned, refused)


def evict_request() -> tuple[TokensPrompt, SamplingParams]:
    """A one-token request whose connector evicts every cached block of the engine
    that no handle pins (after dropping the pins no handle in the store holds)."""
    params = transfer_params(SamplingParams(max_tokens=1, detokenize=False), None,
                             save=False, load=False, evict=True)
    return TokensPrompt(prompt_token_ids=[0]), params


@dataclasses.dataclass
class Eviction:
    evicted_blocks: int  # cached blocks no request or pin held, now uncached
    pinned_blocks: int  # blocks still pinned by handles that hold them


def evict_result(out: Any) -> Eviction:
    report = (out.kv_transfer_params or {}).get(PARAMS_KEY) or {}
    return Eviction(int(report.get("evicted_blocks", 0)), int(report.get("pinned_blocks", 0)))


def resume_request(handle: PrefixHandle, new_tokens: Sequence[int], sampling: SamplingParams,
                   save: bool = False) -> tuple[TokensPrompt, SamplingParams]:
    """The request that continues the branch: the handle's prefix then `new_tokens`."""
    return prompt_of(handle, new_tokens), transfer_params(with_logprobs(sampling), handle, save)


def resume_result(out: Any, handle: PrefixHandle, new_tokens: Sequence[int],
                  save: bool = False) -> ResumeResult:
    """vLLM's `RequestOutput` of `resume_request` read as a `ResumeResult`: its own
    cached-token count, the connector's report, and the child handle (refs taken in
    the store for this turn's blocks with `save`)."""
    completion = out.outputs[0]
    report = (out.kv_transfer_params or {}).get(PARAMS_KEY) or {}
    prompt_len = len(handle.token_ids) + len(new_tokens)
    block = handle.fingerprint.block_size
    # vLLM computes at least the prompt's last token; its own cache serves full blocks,
    # the store the handle's tail too
    expected = min(len(handle.keys) * block, (prompt_len - 1) // block * block)
    if handle.tail_key is not None and prompt_len > handle.cached_tokens:
        expected = handle.cached_tokens
    child = handle.child(list(new_tokens) + list(completion.token_ids))
    if save and handle.store is not None:
        prompt = list(handle.token_ids) + list(new_tokens)
        tail = [child.tail_key] if child.tail_key is not None else []
        ChunkStore(handle.store).retain(child.handle_id,
                                        block_keys(prompt, block, handle.cache_salt) + tail)
    result = ResumeResult(
        token_ids=list(completion.token_ids),
        cumulative_logprob=completion.cumulative_logprob,
        logprobs=sampled_logprobs(completion),
        prompt_tokens=prompt_len,
        cached_tokens=int(out.num_cached_tokens or 0),
        expected_cached=expected,
        loaded_tokens=int(report.get("loaded_tokens", 0)),
        fallback=report.get("fallback"),
        handle=child,
        text=completion.text or "",
        pinned=bool(report.get("pinned")),
    )
    if result.evicted:
        log.warning("branch %s: %d of %d prefix tokens recomputed (%s)", handle.handle_id,
                    expected - result.cached_tokens, expected,
                    result.fallback or "evicted from vLLM's prefix cache")
    return result


def sampled_logprobs(completion: Any) -> list[float]:
    """The logprob of each sampled token (vLLM returns them per step, by token)."""
    if not completion.logprobs:
        return []
    return [float(step[tok].logprob)
            for tok, step in zip(completion.token_ids, completion.logprobs, strict=True)]
