"""KV fork for vLLM: every branch continues the shared prefix without prefill.

`PrefixHandle` (small JSON a branch carries), `snapshot`/`fork`/`resume` on an engine,
`candidates` for n= sampling with logprob scores, and `BranchdConnector` sharing
checksummed KV blocks between engine processes through a shared-memory `ChunkStore`.
Importing `branching.kv.fork` needs vLLM (the `kv` extra); handles and the store do not.
"""

from branching.kv.handle import Fingerprint, PrefixHandle, attach, block_keys, handle_of
from branching.kv.store import ChunkError, ChunkStore, StoreUsage

__all__ = [
    "ChunkError", "ChunkStore", "Fingerprint", "PrefixHandle", "StoreUsage", "attach",
    "block_keys", "handle_of",
]
