"""The prefix handle a branch carries: what a KV prefix is and how to find its blocks.

A handle is small JSON (ids, hashes, checksums; never KV data) so that a branch can
keep it in its metadata and any process can later resume from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

HANDLE_VERSION = 1
# The root of every key chain; a constant (not vLLM's per-process random seed) so
# that two engine processes derive the same key for the same tokens.
_ROOT_KEY = hashlib.sha256(b"branchd-kv-root-v1").digest()


def block_keys(token_ids: Sequence[int], block_size: int,
               cache_salt: str | None = None) -> list[str]:
    """Chained keys of the full blocks of `token_ids`, as vLLM chains its block hashes.

    Key i depends on every token of blocks 0..i, and on the request's `cache_salt`
    (vLLM's, which it mixes into its first block's hash): equal keys mean an equal
    prefix under the same salt. A partial last block has no key here (vLLM never
    caches it): `tail_key` names it.
    """
    return _chain(token_ids, block_size, cache_salt)[0]


def tail_key(token_ids: Sequence[int], block_size: int,
             cache_salt: str | None = None) -> str | None:
    """The key of the partial last block of `token_ids` (None when there is none):
    chained after the full blocks' keys, over the partial block's tokens, so that it
    names those tokens at that position only."""
    keys, parent = _chain(token_ids, block_size, cache_salt)
    return tail_key_after(keys[-1] if keys else None, token_ids[len(keys) * block_size:],
                          cache_salt)


def tail_key_after(last_key: str | None, tail: Sequence[int],
                   cache_salt: str | None = None) -> str | None:
    """`tail_key` from the full blocks' last key (None: there are none) and the partial
    block's tokens, without hashing the whole prefix again."""
    if not tail:
        return None
    parent = bytes.fromhex(last_key) if last_key is not None else _chain((), 1, cache_salt)[1]
    return hashlib.sha256(parent + b"tail\0" + struct.pack(f"<{len(tail)}q", *tail)).hexdigest()


def _chain(token_ids: Sequence[int], block_size: int, cache_salt: str | None
           ) -> tuple[list[str], bytes]:
    keys = []
    parent = _ROOT_KEY
    if cache_salt:  # "" is no salt, as in vLLM
        parent = hashlib.sha256(parent + b"salt\0" + cache_salt.encode()).digest()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}q", *block)).digest()
        keys.append(parent.hex())
    return keys, parent


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What must match for KV produced by one engine to be valid in another."""

    model: str
    dtype: str
    block_size: int
    kv_layout: str
    vllm_version: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        return cls(**data)


def fingerprint_of(vllm_config: Any) -> Fingerprint:
    """The fingerprint of an engine, from its public `VllmConfig`.

    The connector (inside the engine) and the client (outside) both call this, so
    both see the same value for the same engine.
    """
    import vllm

    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    layout = (
        f"layers={model_config.get_num_layers(parallel)}"
        f" kv_heads={model_config.get_num_kv_heads(parallel)}"
        f" head_size={model_config.get_head_size()} cache_dtype={cache.cache_dtype}"
    )
    return Fingerprint(
        model=str(model_config.model),
        dtype=str(model_config.dtype).removeprefix("torch."),
        block_size=int(cache.block_size),
        kv_layout=layout,
        vllm_version=vllm.__version__,
    )


@dataclasses.dataclass(frozen=True)
class PrefixHandle:
    """A conversation prefix whose KV exists (or existed) in an engine or a store.

    Invariants: `keys == block_keys(token_ids, fingerprint.block_size, cache_salt)`;
    `checksums` is empty (same-engine only) or has one CRC32C per key; `tail_key`, when
    set, names the partial block of `tail_tokens` tokens right after the full blocks,
    `tail_key(token_ids[:len(keys) * block_size + tail_tokens], ...)`, which the store
    holds (CRC32C `tail_checksum`); a handle never changes, a continued conversation (or
    a fork) gets a child handle whose `parent` is this one's id and whose `cache_salt`
    is this one's (and this one's tail while its new tokens fill no block).
    """

    handle_id: str
    fingerprint: Fingerprint
    token_ids: tuple[int, ...]
    keys: tuple[str, ...]
    checksums: tuple[int, ...] = ()
    parent: str | None = None
    store: str | None = None
    cache_salt: str | None = None
    tail_key: str | None = None
    tail_checksum: int | None = None
    tail_tokens: int | None = None

    @property
    def cached_tokens(self) -> int:
        """Tokens of the prefix a cache can serve: its full blocks, and the partial block
        after them too when the handle carries it (`tail_key`)."""
        return len(self.keys) * self.fingerprint.block_size + (self.tail_tokens or 0)

    @property
    def chunk_keys(self) -> tuple[str, ...]:
        """The store chunks the handle holds: its full blocks', then its tail's."""
        return self.keys + ((self.tail_key,) if self.tail_key is not None else ())

    def child(self, token_ids: Sequence[int], checksums: Sequence[int] = ()) -> PrefixHandle:
        """A handle for this prefix extended by more tokens (the next turn)."""
        full = tuple(self.token_ids) + tuple(token_ids)
        keys = tuple(block_keys(full, self.fingerprint.block_size, self.cache_salt))
        same_block = len(keys) == len(self.keys)  # the tail's block is not full yet
        return PrefixHandle(
            handle_id=new_handle_id(),
            fingerprint=self.fingerprint,
            token_ids=full,
            keys=keys,
            checksums=tuple(checksums),
            parent=self.handle_id,
            store=self.store,
            cache_salt=self.cache_salt,
            tail_key=self.tail_key if same_block else None,
            tail_checksum=self.tail_checksum if same_block else None,
            tail_tokens=self.tail_tokens if same_block else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": HANDLE_VERSION,
            "handle_id": self.handle_id,
            "fingerprint": self.fingerprint.to_json(),
            "token_ids": list(self.token_ids),
            "keys": list(self.keys),
            "checksums": list(self.checksums),
            "parent": self.parent,
            "store": self.store,
            "cache_salt": self.cache_salt,
            "tail_key": self.tail_key,
            "tail_checksum": self.tail_checksum,
            "tail_tokens": self.tail_tokens,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrefixHandle:
        if data.get("version") != HANDLE_VERSION:
            raise ValueError(f"unsupported prefix handle version {data.get('version')!r}")
        fingerprint = Fingerprint.from_json(data["fingerprint"])
        handle = cls(
            handle_id=str(data["handle_id"]),
            fingerprint=fingerprint,
            token_ids=tuple(int(t) for t in data["token_ids"]),
            keys=tuple(str(k) for k in data["keys"]),
            checksums=tuple(int(c) for c in data["checksums"]),
            parent=data.get("parent"),
            store=data.get("store"),
            cache_salt=data.get("cache_salt"),
            tail_key=None if data.get("tail_key") is None else str(data["tail_key"]),
            tail_checksum=(None if data.get("tail_checksum") is None
                           else int(data["tail_checksum"])),
            tail_tokens=None if data.get("tail_tokens") is None else int(data["tail_tokens"]),
        )
        keys = block_keys(handle.token_ids, fingerprint.block_size, handle.cache_salt)
        if list(handle.keys) != keys:
            raise ValueError(f"prefix handle {handle.handle_id}: keys do not match its tokens")
        tail = (handle.tail_key, handle.tail_checksum, handle.tail_tokens)
        if any(t is None for t in tail) and any(t is not None for t in tail):
            raise ValueError(f"prefix handle {handle.handle_id}: a tail_key goes with its "
                             "tail_checksum and tail_tokens")
        end = handle.cached_tokens
        if handle.tail_tokens is not None and (
                not 0 < handle.tail_tokens < fingerprint.block_size
                or end > len(handle.token_ids)
                or handle.tail_key != tail_key(handle.token_ids[:end], fingerprint.block_size,
                                               handle.cache_salt)):
            raise ValueError(f"prefix handle {handle.handle_id}: tail_key does not match "
                             "its tokens")
        if handle.checksums and len(handle.checksums) != len(handle.keys):
            raise ValueError(f"prefix handle {handle.handle_id}: one checksum per key expected")
        return handle

    @classmethod
    def loads(cls, text: str) -> PrefixHandle:
        return cls.from_json(json.loads(text))


def new_handle_id() -> str:
    return uuid.uuid4().hex


META_KEY = "kv_handle"


class _HasMeta(Protocol):
    @property
    def meta(self) -> dict[str, Any]: ...

    def set_meta(self, key: str, value: Any) -> None: ...


def attach(branch: _HasMeta, handle: PrefixHandle) -> None:
    """Keep `handle` with a workspace branch (in the daemon, as the branch's metadata)."""
    branch.set_meta(META_KEY, handle.to_json())


def handle_of(branch: _HasMeta) -> PrefixHandle | None:
    """The handle a branch carries, or None."""
    data = branch.meta.get(META_KEY)
    return PrefixHandle.from_json(data) if data else None
