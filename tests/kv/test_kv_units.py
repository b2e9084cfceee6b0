"""Handles, the chunk store and the connector's contract with vLLM, without an engine."""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from branching.kv.handle import (
    Fingerprint,
    PrefixHandle,
    block_keys,
    new_handle_id,
    tail_key,
    tail_key_after,
)
from branching.kv.store import ChunkError, ChunkStore

pytestmark = pytest.mark.kv

FP = Fingerprint("m", "float32", 4, "layers=1", "0.32.0")


def handle(tokens: list[int]) -> PrefixHandle:
    return PrefixHandle(new_handle_id(), FP, tuple(tokens), tuple(block_keys(tokens, 4)))


def test_keys_chain_over_the_whole_prefix() -> None:
    a, b = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4), block_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2  # the partial block has no key
    assert a[1] != b[1]  # block 1 is equal, but its parent differs


def test_keys_depend_on_the_cache_salt() -> None:
    tokens = list(range(8))
    plain, a, b = (block_keys(tokens, 4, salt) for salt in (None, "a", "b"))
    assert len({plain[0], a[0], b[0]}) == 3 and len({plain[1], a[1], b[1]}) == 3
    assert block_keys(tokens, 4, "") == plain  # vLLM: an empty salt is none
    salted = PrefixHandle(new_handle_id(), FP, tuple(tokens), tuple(a), cache_salt="a")
    child = salted.child([9, 9, 9, 9])
    assert child.cache_salt == "a" and list(child.keys) == block_keys(tokens + [9] * 4, 4, "a")
    assert PrefixHandle.loads(child.dumps()) == child
    data = child.to_json()
    data["cache_salt"] = "b"  # another tenant's salt on these keys
    with pytest.raises(ValueError, match="keys do not match"):
        PrefixHandle.from_json(data)


def test_tail_key_names_the_partial_block_at_its_position() -> None:
    assert tail_key(list(range(8)), 4) is None  # whole blocks: no tail
    a, b = tail_key([1, 2, 3, 4, 5, 6], 4), tail_key([0, 2, 3, 4, 5, 6], 4)
    assert a and b and a != b  # chained over the full blocks before it
    assert a != tail_key([1, 2, 3, 4, 5, 6], 4, "salt") and a != tail_key([1, 2, 3, 4, 5], 4)
    assert tail_key_after(block_keys([1, 2, 3, 4], 4)[0], [5, 6]) == a
    assert tail_key_after(None, [1, 2], "s") == tail_key([1, 2], 4, "s")
    h = PrefixHandle(new_handle_id(), FP, (1, 2, 3, 4, 5, 6), tuple(block_keys([1, 2, 3, 4], 4)),
                     tail_key=a, tail_checksum=7, tail_tokens=2)
    assert h.cached_tokens == 6 and h.chunk_keys == (*h.keys, a)
    assert PrefixHandle.loads(h.dumps()) == h
    child = h.child([9])  # the tail's block not full yet: the child carries the tail
    assert child.tail_key == a and child.cached_tokens == 6
    assert PrefixHandle.loads(child.dumps()) == child
    assert h.child([9, 9]).tail_key is None  # a full block now: vLLM's to cache
    with pytest.raises(ValueError, match="tail_key does not match"):
        PrefixHandle.from_json({**h.to_json(), "tail_key": b})
    with pytest.raises(ValueError, match="tail_checksum"):
        PrefixHandle.from_json({**h.to_json(), "tail_checksum": None})
    with pytest.raises(ValueError, match="tail_key does not match"):
        PrefixHandle.from_json({**h.to_json(), "tail_tokens": 1})


def test_store_generation_counts_reference_changes(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    assert store.generation() == 0 and store.live_keys() == set()
    store.retain("aa", ["01", "02"])
    store.retain("bb", ["02"])
    assert store.generation() == 2 and store.live_keys() == {"01", "02"}
    store.release("aa")
    assert store.generation() == 3 and store.live_keys() == {"02"}


def test_handle_round_trips_through_json_and_rejects_tampering() -> None:
    h = handle(list(range(10))).child([42])
    assert PrefixHandle.loads(h.dumps()) == h
    data = h.to_json()
    data["token_ids"][0] = 99
    with pytest.raises(ValueError, match="keys do not match"):
        PrefixHandle.from_json(data)
    assert len(h.dumps()) < 2000  # small enough for branch metadata


def test_store_checks_every_read(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    key = block_keys([1, 2, 3, 4], 4)[0]
    crc = store.put(key, b"kv" * 100, FP)
    assert store.read(key, FP, crc) == b"kv" * 100
    with pytest.raises(ChunkError, match="fingerprint"):
        store.read(key, Fingerprint("other", "float32", 4, "layers=1", "0.32.0"))
    with pytest.raises(ChunkError, match="checksum"):
        store.read(key, FP, (crc or 0) ^ 1)
    path = store.chunk_path(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkError, match="checksum"):
        store.read(key, FP)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ChunkError, match="truncated"):
        store.read(key, FP)
    assert store.put(key, b"kv" * 100, FP) == crc  # a bad copy is rewritten, not kept
    assert store.read(key, FP, crc) == b"kv" * 100
    with pytest.raises(ValueError):
        store.chunk_path("../escape")


def test_chunks_live_while_a_handle_holds_them_and_memory_is_bounded(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, capacity=3000)
    root = handle(list(range(8)))
    a, b = root.handle_id, new_handle_id()
    store.retain(a, root.keys)
    store.retain(b, root.keys[:1])
    for key in root.keys:
        assert store.put(key, b"x" * 1000, FP) is not None
    assert store.usage().chunks == 2 and store.usage().handles == 2
    assert store.put(block_keys(list(range(100, 104)), 4)[0], b"y" * 2000, FP) is None  # full
    freed = store.release(a)
    assert store.usage().chunks == 1 and freed > 1000  # the shared chunk stays for b
    store.release(b)
    assert store.usage().chunks == 0 and store.usage().bytes == 0


def test_connector_matches_the_installed_vllm_interface() -> None:
    """Fails loudly when vLLM's connector interface moves: abstract methods we do not
    implement, or a changed signature of one we override."""
    pytest.importorskip("vllm")
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from branching.kv.connector import SUPPORTED_VLLM, BranchdConnector

    assert vllm.__version__ in SpecifierSet(",".join(SUPPORTED_VLLM)), vllm.__version__
    assert not BranchdConnector.__abstractmethods__
    ours = {n for n, v in vars(BranchdConnector).items() if inspect.isfunction(v)}
    for name in sorted(ours & set(dir(KVConnectorBase_V1))):
        base = list(inspect.signature(getattr(KVConnectorBase_V1, name)).parameters)
        mine = list(inspect.signature(getattr(BranchdConnector, name)).parameters)
        assert mine == base, f"{name}: vLLM has {base}, we have {mine}"
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "branching.kv.plugin:register" for ep in plugins)
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from branching.kv.plugin import register

    register()
    register()  # vLLM may load plugins more than once per process
    assert KVConnectorFactory.get_connector_class_by_name("BranchdConnector") is BranchdConnector
