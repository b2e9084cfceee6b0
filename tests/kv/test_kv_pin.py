"""Pinned prefixes and the partial last block, on a real CPU vLLM engine whose KV cache
is small (conftest's NUM_BLOCKS): other traffic fills it, a pinned prefix stays in
vLLM's cache while a handle holds it, an unpinned one is evicted; releasing the last
handle (or discarding its branch) unpins; at most `pin_share` of the blocks are
pinned. A handle's partial last block comes back from the store."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (requirements/kv.txt)")

from vllm import SamplingParams  # noqa: E402

from branching.kv.fork import (  # noqa: E402
    discard,
    evict,
    fork,
    plain_request,
    prefill,
    prompt_tokens_by_source,
    release,
    resume,
    snapshot,
    take_snapshot,
)
from branching.kv.handle import PrefixHandle, attach  # noqa: E402
from tests.kv.conftest import NUM_BLOCKS  # noqa: E402

pytestmark = [pytest.mark.kv, pytest.mark.slow, pytest.mark.timeout(300)]

BLOCK = 32
PIN_LIMIT = NUM_BLOCKS // 4  # the default pin_share, 0.25


def greedy(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0,
                          detokenize=False)


def prefix_of(seed: int, length: int = 256) -> list[int]:
    return [(i * (2 * seed + 3) + seed) % 500 + 3 for i in range(length)]


def fill_cache(engine: Any, seed: int) -> None:
    """Other traffic: distinct prompts of more blocks than the cache holds, so that vLLM
    reuses (evicts) every block no request or pin holds."""
    rng = random.Random(seed)  # no prefix in common with prefix_of's
    for _ in range(2):
        other = [rng.randrange(3, 500) for _ in range(3200)]
        plain_request(engine, other, SamplingParams(max_tokens=1))


@pytest.fixture
def no_pins_left(engine: Any) -> Iterator[None]:
    """Every test here leaves the engine as it found it: nothing pinned (the other kv
    tests empty vLLM's cache with reset_prefix_cache, which a pin would refuse)."""
    yield
    assert evict(engine).pinned_blocks == 0


class FakeBranch:
    """A workspace branch as `attach`, `handle_of` and `discard` see it."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.aborted = False

    def set_meta(self, key: str, value: Any) -> None:
        self.meta[key] = value

    def abort(self) -> None:
        self.aborted = True


def test_pinned_prefix_stays_in_vllms_cache_under_other_traffic(
        engine: Any, no_pins_left: None) -> None:
    pinned = take_snapshot(engine, prefix_of(20), pin=True)
    assert pinned.pinned and pinned.pin_refused is None
    plain = snapshot(engine, prefix_of(21))
    [branch] = fork(pinned.handle, 1)
    release(pinned.handle)  # the branch still holds the prefix: still pinned
    fill_cache(engine, 1)
    kept = resume(engine, branch, [1, 2, 3], greedy())
    # vLLM's own count: the whole prefix from its cache, nothing loaded or recomputed
    assert kept.cached_tokens == 256 and kept.loaded_tokens == 0
    assert kept.computed_tokens == 3 and kept.pinned and not kept.evicted
    gone = resume(engine, plain, [1, 2, 3], greedy())
    assert gone.loaded_tokens == 256 and not gone.pinned  # evicted: from the store
    cold = prefill(engine, prefix_of(20) + [1, 2, 3], greedy())
    assert cold.cached_tokens == 0  # the baseline reads no cache, pinned blocks included
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(cold.logprobs, kept.logprobs,
                                                                 strict=True))
    # the last handle released: unpinned, and evicted by the next traffic
    release(branch)
    fill_cache(engine, 2)
    after = resume(engine, branch, [1, 2, 3], greedy())
    assert after.cached_tokens == 0 and after.evicted and not after.pinned
    release(plain)


def test_discarding_the_branch_unpins(engine: Any, no_pins_left: None) -> None:
    root = take_snapshot(engine, prefix_of(22), pin=True).handle
    [held] = fork(root, 1)
    release(root)
    branch = FakeBranch()
    attach(branch, held)
    assert evict(engine).pinned_blocks == 8  # the branch's handle holds all 8 blocks
    assert resume(engine, held, [4], greedy(1)).cached_tokens == 256
    assert discard(branch) > 0 and branch.aborted  # the chunks freed with the last ref
    assert evict(engine).pinned_blocks == 0
    assert resume(engine, held, [4], greedy(1)).cached_tokens == 0


def test_at_most_pin_share_of_the_cache_is_pinned(engine: Any, no_pins_left: None) -> None:
    small = take_snapshot(engine, prefix_of(23), pin=True)
    assert small.pinned
    big_prefix = prefix_of(24, (PIN_LIMIT - 8 + 1) * BLOCK)  # one block over the share
    big = take_snapshot(engine, big_prefix, pin=True)
    assert not big.pinned and big.pin_refused is not None
    assert f"> {PIN_LIMIT} (pin_share 0.25 of {NUM_BLOCKS} blocks)" in big.pin_refused
    # not pinned, but a handle as any other: served from vLLM's cache while it is there
    assert resume(engine, big.handle, [5], greedy(1)).cached_tokens == len(big_prefix)
    assert evict(engine).pinned_blocks == 8
    release(small.handle)  # room again
    again = take_snapshot(engine, big_prefix, pin=True)
    assert again.pinned and evict(engine).pinned_blocks == PIN_LIMIT + 1 - 8
    release(again.handle)
    release(big.handle)


def test_partial_last_block_comes_back_from_the_store(engine: Any, no_pins_left: None) -> None:
    prefix = prefix_of(25, 256 + 20)  # 8 full blocks and 20 tokens
    root = snapshot(engine, prefix)
    assert root.tail_key is not None and root.tail_checksum is not None
    assert root.cached_tokens == 276 and PrefixHandle.loads(root.dumps()) == root
    untailed = dataclasses.replace(root, tail_key=None, tail_checksum=None, tail_tokens=None)
    before = prompt_tokens_by_source(engine)
    exact = resume(engine, root, [1, 2, 3], greedy())
    mid = prompt_tokens_by_source(engine)
    old = resume(engine, untailed, [1, 2, 3], greedy())
    after = prompt_tokens_by_source(engine)
    assert exact.cached_tokens == 276 and exact.loaded_tokens == 20
    assert exact.computed_tokens == 3 and not exact.evicted
    assert old.cached_tokens == 256 and old.computed_tokens == 23  # the block recomputed
    # vLLM's own counter agrees
    assert mid["local_compute"] - before.get("local_compute", 0) == 3
    assert after["local_compute"] - mid["local_compute"] == 23
    assert exact.token_ids == old.token_ids
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(exact.logprobs, old.logprobs,
                                                                 strict=True))
    # forks carry the tail; a resume with nothing new computes the last token itself
    [branch] = fork(root, 1)
    assert branch.tail_key == root.tail_key
    assert resume(engine, branch, [], greedy(1)).computed_tokens == 20
    # so do children (a candidate's handle) whose new tokens fill no block
    child = root.child([50])
    assert child.tail_key == root.tail_key
    later = resume(engine, child, [51, 52], greedy())
    assert later.loaded_tokens == 20 and later.computed_tokens == 3
    release(branch)
    release(root)
