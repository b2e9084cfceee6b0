"""KV fork on a real CPU vLLM engine: prefix-cache hits per branch, n= prefilled once,
resume across engine processes through the connector, and every fallback."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (requirements/kv.txt)")

from vllm import SamplingParams  # noqa: E402

from branching.kv.fork import (  # noqa: E402
    candidates,
    fork,
    prefill,
    prompt_tokens_by_source,
    release,
    resume,
    snapshot,
)
from branching.kv.handle import PrefixHandle, block_keys, new_handle_id  # noqa: E402
from branching.kv.store import ChunkStore  # noqa: E402

pytestmark = [pytest.mark.kv, pytest.mark.slow, pytest.mark.timeout(300)]

BLOCK = 32


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0,
                          detokenize=False)


def prefix_of(seed: int, length: int = 256) -> list[int]:
    return [(i * (2 * seed + 3) + seed) % 500 + 3 for i in range(length)]


def assert_close(a: list[float], b: list[float], tol: float = 1e-4) -> None:
    assert len(a) == len(b) > 0
    assert all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True)), (a, b)


def test_branches_compute_only_their_new_tokens(engine: Any) -> None:
    root = snapshot(engine, prefix_of(1))
    branches = fork(root, 4)
    before = prompt_tokens_by_source(engine)
    for i, branch in enumerate(branches):
        new = [10 + i, 20 + i, 30 + i]  # each branch's own test output
        result = resume(engine, branch, new, greedy())
        assert result.cached_tokens == 256 and not result.evicted
        assert result.computed_tokens == len(new)
        assert result.handle.parent == branch.handle_id
        # the next turn of that branch: its whole conversation so far is cached
        again = resume(engine, result.handle, [40 + i], greedy(2))
        assert again.computed_tokens <= BLOCK
    after = prompt_tokens_by_source(engine)
    computed = after.get("local_compute", 0) - before.get("local_compute", 0)
    assert computed <= 4 * 3 + 4 * BLOCK  # vLLM's own counter: no prefix recomputed


def test_n_candidates_prefill_the_prompt_once(engine: Any) -> None:
    root = snapshot(engine, prefix_of(2))
    before = prompt_tokens_by_source(engine)
    new = list(range(100, 140))
    cands = candidates(engine, root, 4, SamplingParams(max_tokens=6, temperature=1.0, seed=3,
                                                       ignore_eos=True, detokenize=False), new)
    after = prompt_tokens_by_source(engine)
    assert len(cands) == 4
    assert all(isinstance(c.score, float) and c.score < 0 for c in cands)
    assert all(c.handle.token_ids == root.token_ids + tuple(new + c.token_ids) for c in cands)
    # the 40 new tokens are computed once, not four times
    computed = after.get("local_compute", 0) - before.get("local_compute", 0)
    assert computed < 2 * len(new)


def test_cache_salt_shares_a_prefix_only_with_the_same_salt(engine: Any) -> None:
    prefix = prefix_of(11)
    root = snapshot(engine, prefix, cache_salt="tenant-a")
    assert root.cache_salt == "tenant-a" and root.keys != tuple(block_keys(prefix, BLOCK))
    [branch] = fork(root, 1)
    assert branch.cache_salt == "tenant-a"
    same = resume(engine, branch, [1, 2], greedy(2))
    assert same.cached_tokens == 256 and same.handle.cache_salt == "tenant-a"
    for salt in ("tenant-b", None):  # the same tokens under another salt, or none
        other = dataclasses.replace(root, handle_id=new_handle_id(), cache_salt=salt,
                                    keys=tuple(block_keys(prefix, BLOCK, salt)), checksums=())
        result = resume(engine, other, [1, 2], greedy(2))
        assert result.cached_tokens == 0 and result.loaded_tokens == 0, salt
    engine.reset_prefix_cache()  # from the store: by salt too
    assert resume(engine, branch, [1, 2], greedy(2)).loaded_tokens == 256
    other = dataclasses.replace(root, handle_id=new_handle_id(), cache_salt="tenant-c",
                                keys=tuple(block_keys(prefix, BLOCK, "tenant-c")), checksums=())
    assert resume(engine, other, [1, 2], greedy(2)).loaded_tokens == 0
    release(branch)
    release(root)


def test_evicted_prefix_comes_back_from_the_store_bit_identical(engine: Any) -> None:
    root = snapshot(engine, prefix_of(3))
    assert len(root.checksums) == len(root.keys) == 8
    hit = resume(engine, root, [5, 6, 7], greedy())
    assert hit.loaded_tokens == 0 and hit.cached_tokens == 256
    engine.reset_prefix_cache()  # vLLM evicts everything: no public pin exists
    back = resume(engine, root, [5, 6, 7], greedy())
    assert back.loaded_tokens == 256 and back.cached_tokens == 256 and not back.evicted
    assert back.token_ids == hit.token_ids and back.logprobs == hit.logprobs
    cold = prefill(engine, list(root.token_ids) + [5, 6, 7], greedy())
    assert cold.cached_tokens == 0
    assert_close(cold.logprobs, back.logprobs)


def test_evicted_and_released_prefix_is_recomputed_and_reported(engine: Any) -> None:
    root = snapshot(engine, prefix_of(4))
    [branch] = fork(root, 1)
    hit = resume(engine, branch, [9], greedy())
    release(root)
    release(branch)
    assert not ChunkStore(root.store or "").chunk_path(root.keys[0]).exists()
    engine.reset_prefix_cache()
    again = resume(engine, branch, [9], greedy())
    assert again.evicted and again.cached_tokens == 0 and again.loaded_tokens == 0
    assert_close(again.logprobs, hit.logprobs)


def test_corrupted_chunk_is_never_served(engine: Any) -> None:
    root = snapshot(engine, prefix_of(5))
    hit = resume(engine, root, [1, 2, 3], greedy())
    chunk = ChunkStore(root.store or "").chunk_path(root.keys[2])
    data = bytearray(chunk.read_bytes())
    data[-100] ^= 0x40  # a real bit flip in the shared-memory file
    chunk.write_bytes(bytes(data))
    engine.reset_prefix_cache()
    result = resume(engine, root, [1, 2, 3], greedy())
    assert result.fallback is not None and "checksum" in result.fallback
    assert result.loaded_tokens == 2 * BLOCK  # the blocks before the bad one
    assert result.evicted and result.computed_tokens == 256 - 2 * BLOCK + 3
    assert_close(result.logprobs, hit.logprobs)


def test_wrong_fingerprint_is_refused(engine: Any, store_dir: Path) -> None:
    root = snapshot(engine, prefix_of(6))
    hit = resume(engine, root, [4], greedy())
    engine.reset_prefix_cache()
    alien = dataclasses.replace(root, fingerprint=dataclasses.replace(root.fingerprint,
                                                                      dtype="bfloat16"))
    result = resume(engine, alien, [4], greedy())
    assert result.fallback is not None and "fingerprint" in result.fallback
    assert result.loaded_tokens == 0 and result.cached_tokens == 0
    assert_close(result.logprobs, hit.logprobs)
    # blocks written by another kind of engine under the same keys are refused too
    prefix = prefix_of(7, 64)
    mine = PrefixHandle(new_handle_id(), root.fingerprint, tuple(prefix),
                        tuple(block_keys(prefix, BLOCK)), store=str(store_dir))
    store = ChunkStore(store_dir)
    for key in mine.keys:
        store.put(key, b"\0" * 1024, alien.fingerprint)
    result = resume(engine, mine, [1], greedy(2))
    assert result.fallback is not None and "fingerprint" in result.fallback
    assert result.loaded_tokens == 0 and result.cached_tokens == 0


def test_resume_in_a_fresh_engine_process_after_the_producer_is_killed(
        engine: Any, kill_producer: Any) -> None:
    produced = kill_producer()  # the engine that computed the prefix is gone
    handle = PrefixHandle.from_json(produced["handle"])
    assert produced["cached"] == 256  # its own branch was a cache hit
    new = produced["new"]
    result = resume(engine, handle, new, greedy())
    assert result.loaded_tokens == 256 and result.cached_tokens == 256
    assert result.computed_tokens == len(new)
    assert result.token_ids == produced["tokens"]
    assert result.logprobs == produced["logprobs"]  # bit-identical to the producer's hit
    cold = prefill(engine, list(handle.token_ids) + new, greedy())
    assert_close(cold.logprobs, result.logprobs)


@pytest.mark.mount
def test_a_workspace_branch_carries_its_handle(engine: Any, tmp_path: Path) -> None:
    from branching import Workspace
    from branching.kv.handle import attach, handle_of

    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "f.txt").write_text("x")
    root = snapshot(engine, prefix_of(8))
    store = ChunkStore(root.store or "")
    handles = fork(root, 2)
    with Workspace(tmp_path / "proj") as ws:
        keep, drop = ws.create("keep"), ws.create("drop")
        attach(keep, handles[0])
        attach(drop, handles[1])
        carried = handle_of(keep)
        assert carried == handles[0]
        release(handle_of(drop) or root)  # a discarded branch gives its handle back
        drop.abort()
        release(root)
        assert store.chunk_path(root.keys[-1]).exists()  # `keep` still holds the prefix
        result = resume(engine, carried, [3, 4], greedy(2))
        assert result.cached_tokens == 256 and result.computed_tokens == 2
        release(carried)
        keep.abort()
    assert not store.chunk_path(root.keys[-1]).exists()  # nobody holds it: freed


def test_block_failing_in_the_worker_is_recomputed(engine: Any, store_dir: Path) -> None:
    """A chunk whose header is self-consistent (right fingerprint, valid CRC) but whose
    size does not fit this engine's blocks passes the scheduler's check and fails when
    the worker copies it: vLLM must recompute it, not serve it."""
    prefix = prefix_of(9, 128)
    fingerprint = snapshot(engine, prefix_of(10, 32)).fingerprint
    handle = PrefixHandle(new_handle_id(), fingerprint, tuple(prefix),
                          tuple(block_keys(prefix, BLOCK)), store=str(store_dir))
    store = ChunkStore(store_dir)
    store.retain(handle.handle_id, handle.keys)
    for key in handle.keys:
        store.put(key, b"\x7f" * 1000, fingerprint)
    cold = prefill(engine, prefix + [1, 2], greedy())
    engine.reset_prefix_cache()
    result = resume(engine, handle, [1, 2], greedy())
    assert result.token_ids == cold.token_ids
    assert_close(result.logprobs, cold.logprobs)
    release(handle)
