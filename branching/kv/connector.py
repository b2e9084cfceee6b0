"""`BranchdConnector`: vLLM's KV-connector interface onto the shared-memory chunk store.

Loaded by vLLM itself, in each engine process, from `kv_transfer_config`
(`kv_connector="BranchdConnector"`, `kv_connector_module_path="branching.kv.connector"`,
or the name alone once the `vllm.general_plugins` entry point has registered it).
vLLM makes two instances: the scheduler-side one decides which blocks a request can
load from the store; the worker-side one copies block bytes between the store and
the engine's paged KV tensors.

What it does:
- save: a request whose `kv_transfer_params` carry `{"branchd_kv": {"save": true}}`
  has its prompt's full blocks written to the store once its prefill is computed
  (and with `"tail": true` its partial last block, under `handle.tail_key`);
- keys: chained over the prompt's tokens and the request's `cache_salt`, as vLLM's
  own block hashes are, so that differently salted requests never share a block;
- load: for any request, the full blocks after vLLM's own prefix-cache hit that the
  store holds (chained keys over the tokens) are claimed as external hits, after
  their fingerprint and CRC32C (and the handle's checksums, when the request
  names a handle) are checked; the first bad block ends the claim, the rest is
  recomputed by vLLM, and the reason comes back in `RequestOutput.kv_transfer_params`;
- tail: a request naming a handle with a saved partial last block, whose prompt goes
  on past it, claims that block's tokens too, so only its new tokens are computed;
- a block that fails its check again when the worker reads it is reported through
  `get_block_ids_with_load_errors`, and vLLM recomputes it
  (`kv_load_failure_policy="recompute"`);
- pin: a saving request with `"pin": true` keeps its prompt's full blocks resident
  in vLLM's cache once it finishes: one reference of the scheduler's block pool
  (`bind_gpu_block_pool`) per block, which vLLM then never evicts; at most
  `pin_share` (of `kv_connector_extra_config`, default 0.25) of the engine's blocks,
  beyond which a prefix is not pinned and the answer says so. A pin lasts while some
  handle's ref file in the store names the block's key (forks of the handle keep it),
  checked at every scheduler step once the store's generation changed;
- evict: a request with `"evict": true` evicts every cached block nothing holds
  (vLLM's `reset_prefix_cache` refuses while any block is pinned).

Only vLLM's public connector interface is used; `SUPPORTED_VLLM` is the range it
was written and tested against.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from branching.kv.handle import (
    Fingerprint,
    block_keys,
    fingerprint_of,
    tail_key,
    tail_key_after,
)
from branching.kv.store import DEFAULT_ROOT, ChunkError, ChunkStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

SUPPORTED_VLLM = (">=0.32", "<0.34")
PARAMS_KEY = "branchd_kv"
DEFAULT_PIN_SHARE = 0.25  # of the engine's KV blocks, at most held by pins


@dataclasses.dataclass
class BlockOp:
    block_id: int
    key: str
    crc: int | None = None


@dataclasses.dataclass
class BranchdConnectorMetadata(KVConnectorMetadata):
    """One step's work for the worker: blocks to load before, and save after, the forward."""

    loads: list[BlockOp] = dataclasses.field(default_factory=list)
    saves: list[BlockOp] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Claim:
    keys: list[tuple[str, int | None]]
    first_block: int
    tail: tuple[str, int, int] | None = None  # key, crc, tokens


@dataclasses.dataclass
class _PendingSave:
    keys: list[str]
    block_ids: list[int]
    tail: tuple[str, int] | None = None  # key, prompt length (computed before it is saved)


class BranchdConnector(KVConnectorBase_V1):
    """KV blocks shared between engines through a `ChunkStore`.

    Invariants: a block is claimed (scheduler) only after its chunk passed every
    check; a block is written into paged KV (worker) only after passing them again;
    the connector never changes a block vLLM computed itself.
    """

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        assert vllm_config.kv_transfer_config is not None  # vLLM makes a connector only with one
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        capacity = extra.get("capacity")
        self._store = ChunkStore(extra.get("store", DEFAULT_ROOT), capacity)
        self._fingerprint = fingerprint_of(vllm_config)
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks
        self._pin_share = float(extra.get("pin_share", DEFAULT_PIN_SHARE))
        if not 0 <= self._pin_share <= 1:
            raise ValueError(f"kv_connector_extra_config pin_share {self._pin_share}: a share "
                             "of the engine's KV blocks, 0 to 1")
        self._meta = BranchdConnectorMetadata()
        # scheduler side
        self._claims: dict[str, _Claim] = {}
        self._ready: list[BlockOp] = []
        self._save_keys: dict[str, _PendingSave] = {}
        self._pending_saves: dict[str, _PendingSave] = {}
        self._reports: dict[str, dict[str, Any]] = {}
        self._pool: BlockPool | None = None
        self._pins: dict[str, KVCacheBlock] = {}  # key -> the block it holds
        self._pin_requests: dict[str, list[str]] = {}  # request -> keys to pin at its end
        self._refs_seen: int | None = None  # the store generation the pins were checked at
        # worker side
        self._kv_caches: list[tuple[torch.Tensor, int]] = []
        self._load_errors: set[int] = set()

    # ---- scheduler side -------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        self._sync_pins()  # before this request's blocks are allocated
        params = (request.kv_transfer_params or {}).get(PARAMS_KEY, {})
        report = self._reports.setdefault(
            request.request_id, {"loaded_tokens": 0, "fallback": None, "saved_blocks": 0}
        )
        tokens = list(request.prompt_token_ids or [])
        # the request's cache_salt is part of every key: two salts never share a block
        salt = request.cache_salt
        if params.get("evict"):
            report.update(self._evict())
            return 0, False
        if params.get("save"):
            save = _PendingSave(block_keys(tokens, self._block_size, salt), [])
            last = tail_key(tokens, self._block_size, salt) if params.get("tail") else None
            if last is not None:
                save.tail = (last, len(tokens))
            self._save_keys[request.request_id] = save
            if params.get("pin"):
                self._pin_requests[request.request_id] = save.keys
        if params.get("load") is False:
            return 0, False  # the caller asked for a cold prefill (a baseline)
        handle = params.get("handle")
        if handle is not None and Fingerprint.from_json(handle["fingerprint"]) != self._fingerprint:
            report["fallback"] = "fingerprint mismatch: handle from another engine kind"
            log.warning("request %s: %s", request.request_id, report["fallback"])
            return 0, False
        if handle is not None:
            report["pinned"] = bool(handle["keys"]) and all(k in self._pins for k in handle["keys"])
        # vLLM must compute at least one prompt token itself, to sample from.
        keys = block_keys(tokens[: max(len(tokens) - 1, 0)], self._block_size, salt)
        expected = dict(zip(handle["keys"], handle["checksums"], strict=False)) if handle else {}
        first = num_computed_tokens // self._block_size
        claimed: list[tuple[str, int | None]] = []
        for key in keys[first:]:
            try:
                self._store.read(key, self._fingerprint, expected.get(key))
            except ChunkError as e:
                if self._store.chunk_path(key).exists() or key in expected:
                    report["fallback"] = str(e)
                    log.warning("request %s: recomputing from %s", request.request_id, e)
                break
            claimed.append((key, expected.get(key)))
        tail = None
        if handle is not None and first + len(claimed) == len(handle["keys"]):
            tail = self._claim_tail(request, tokens, keys, handle, report)
        if not claimed and tail is None:
            return 0, False
        self._claims[request.request_id] = _Claim(claimed, first, tail)
        return len(claimed) * self._block_size + (tail[2] if tail else 0), False

    def _claim_tail(self, request: Request, tokens: list[int], keys: list[str],
                    handle: dict[str, Any], report: dict[str, Any]
                    ) -> tuple[str, int, int] | None:
        """The handle's partial last block, when the prompt (its full blocks' `keys`)
        goes on past it (vLLM must compute one token) and the store holds it, checked."""
        tail = handle.get("tail")
        if not tail:
            return None
        # chained on from the prompt's own keys: equal to the tail's key only if the
        # prompt holds the handle's tokens up to the tail's end
        blocks = len(handle["keys"])
        end = blocks * self._block_size + int(tail["tokens"])
        if len(tokens) <= end:
            return None
        last = keys[blocks - 1] if blocks else None  # keys cover tokens[:-1]: blocks of them
        if tail_key_after(last, tokens[blocks * self._block_size:end],
                          request.cache_salt) != tail["key"]:
            return None
        try:
            self._store.read(tail["key"], self._fingerprint, tail["checksum"])
        except ChunkError as e:
            report["fallback"] = f"partial last block: {e}"
            log.warning("request %s: recomputing the partial last block (%s)",
                        request.request_id, e)
            return None
        return str(tail["key"]), int(tail["checksum"]), int(tail["tokens"])

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        claim = self._claims.pop(request.request_id, None)
        if claim is None or num_external_tokens == 0:
            return
        block_ids = blocks.get_block_ids()[0]
        # `blocks` are all the request's blocks; the claim starts after vLLM's own hit.
        full = claim.keys[: num_external_tokens // self._block_size]
        for i, (key, crc) in enumerate(full):
            self._ready.append(BlockOp(block_ids[claim.first_block + i], key, crc))
        tail = claim.tail
        if tail is not None and num_external_tokens == len(claim.keys) * self._block_size + tail[2]:
            self._ready.append(BlockOp(block_ids[claim.first_block + len(full)], tail[0], tail[1]))
        self._reports[request.request_id]["loaded_tokens"] = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = BranchdConnectorMetadata(loads=self._ready)
        self._ready = []
        self._sync_pins()
        for new in scheduler_output.scheduled_new_reqs:
            # keyed when the request was matched (NewRequestData has no cache_salt)
            save = self._save_keys.pop(new.req_id, None)
            if save is not None and (save.keys or save.tail):
                save.block_ids = list(new.block_ids[0])
                self._pending_saves[new.req_id] = save
            self._emit_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            pending = self._pending_saves.get(req_id)
            if pending is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                pending.block_ids.extend(new_ids[0])
            self._emit_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _emit_save(
        self, meta: BranchdConnectorMetadata, req_id: str, computed: int, out: SchedulerOutput
    ) -> None:
        pending = self._pending_saves.get(req_id)
        if pending is None:
            return
        done = computed + out.num_scheduled_tokens.get(req_id, 0)
        needed = pending.tail[1] if pending.tail else len(pending.keys) * self._block_size
        if done < needed:
            return  # prefill not finished (chunked): save once it is
        del self._pending_saves[req_id]
        # block_ids may run past the prompt's full blocks (its partial last block)
        pairs = zip(pending.block_ids, pending.keys, strict=False)
        meta.saves.extend(BlockOp(b, k) for b, k in pairs)
        if pending.tail is not None and len(pending.block_ids) > len(pending.keys):
            meta.saves.append(BlockOp(pending.block_ids[len(pending.keys)], pending.tail[0]))
        if req_id in self._reports:
            self._reports[req_id]["saved_blocks"] = len(pending.keys)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._save_keys.pop(request.request_id, None)
        self._pending_saves.pop(request.request_id, None)
        self._claims.pop(request.request_id, None)
        report = self._reports.pop(request.request_id, None)
        pin = self._pin_requests.pop(request.request_id, None)
        if pin is not None and report is not None:
            report.update(self._pin(pin, block_ids))
        return False, ({PARAMS_KEY: report} if report is not None else None)

    # ---- pins (scheduler side) ------------------------------------------------

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self._pool = gpu_block_pool

    def _pin_limit(self) -> int:
        return int(self._pin_share * self._num_blocks)

    def _pin(self, keys: list[str], block_ids: list[int]) -> dict[str, Any]:
        """One pool reference on each of the finished request's cached blocks of `keys`
        (none already pinned are taken twice), within the pin limit; the report."""
        if self._pool is None:
            return {"pinned": False, "pin_refused": "vLLM bound no block pool"}
        if not keys:
            return {"pinned": False, "pin_refused": "the prefix has no full block"}
        if len(block_ids) < len(keys):
            return {"pinned": False, "pin_refused": "the prefix was not computed"}
        new: dict[str, KVCacheBlock] = {}
        for key, block_id in zip(keys, block_ids, strict=False):
            block = self._pool.blocks[block_id]
            if key in self._pins:
                continue
            if block.block_hash is None or block.is_null:
                return {"pinned": False, "pin_refused": "the prefix is not in vLLM's cache"}
            new[key] = block
        limit = self._pin_limit()
        if len(self._pins) + len(new) > limit:
            return {"pinned": False, "pin_refused": (
                f"{len(new)} more blocks would pin {len(self._pins) + len(new)} > "
                f"{limit} (pin_share {self._pin_share} of {self._num_blocks} blocks)")}
        self._pool.touch(list(new.values()))
        self._pins.update(new)
        self._refs_seen = None  # check its refs at the next step (released meanwhile?)
        return {"pinned": True, "pinned_blocks": len(self._pins)}

    def _sync_pins(self) -> None:
        """Unpin the blocks whose keys no handle's ref names any more."""
        if not self._pins or self._pool is None:
            return
        generation = self._store.generation()
        if generation == self._refs_seen:
            return
        self._refs_seen = generation  # read before the refs: a change after is seen next
        live = self._store.live_keys()
        gone = [key for key in self._pins if key not in live]
        if gone:
            # last pinned first: vLLM frees a request's blocks so, its tail evicted first
            self._pool.free_blocks([self._pins.pop(key) for key in reversed(gone)])
            log.debug("unpinned %d blocks, %d stay pinned", len(gone), len(self._pins))

    def _evict(self) -> dict[str, Any]:
        self._refs_seen = None
        self._sync_pins()
        if self._pool is None:
            return {"evicted_blocks": 0, "pinned_blocks": len(self._pins)}
        idle = {b.block_id for b in self._pool.blocks
                if b.ref_cnt == 0 and b.block_hash is not None and not b.is_null}
        self._pool.evict_blocks(idle)
        return {"evicted_blocks": len(idle), "pinned_blocks": len(self._pins)}

    # ---- worker side ----------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, BranchdConnectorMetadata)
        self._meta = connector_metadata

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._meta = BranchdConnectorMetadata()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = self._num_blocks
        self._kv_caches = []
        for name in sorted(kv_caches):
            tensor = kv_caches[name]
            # The block dimension is where the layout puts num_blocks (1 for the CPU
            # and flash backends' (2, blocks, ...), 0 for others).
            dim = next(d for d, size in enumerate(tensor.shape) if size == num_blocks)
            self._kv_caches.append((tensor, dim))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        for op in self._meta.loads:
            try:
                payload = self._store.read(op.key, self._fingerprint, op.crc)
                self._write_block(op.block_id, payload)
            except (ChunkError, ValueError, RuntimeError) as e:
                log.warning("block %d: load failed (%s); vLLM recomputes it", op.block_id, e)
                self._load_errors.add(op.block_id)

    def _write_block(self, block_id: int, payload: bytes) -> None:
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        offset = 0
        for tensor, dim in self._kv_caches:
            dst = tensor.select(dim, block_id)
            nbytes = dst.numel() * dst.element_size()
            src = flat[offset : offset + nbytes].view(dst.dtype).view(dst.shape)
            dst.copy_(src.to(dst.device))
            offset += nbytes
        if offset != len(payload):
            raise ValueError(f"block size {len(payload)} != expected {offset}")

    def _read_block(self, block_id: int) -> bytes:
        parts = [
            tensor.select(dim, block_id).contiguous().cpu().view(torch.uint8).numpy().tobytes()
            for tensor, dim in self._kv_caches
        ]
        return b"".join(parts)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # whole blocks are saved after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        for op in self._meta.saves:
            if not self._store.holds(op.key, self._fingerprint):
                self._store.put(op.key, self._read_block(op.block_id), self._fingerprint)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
