"""The host-memory KV store: one checksummed file per KV block in shared memory.

Layout under the store's directory (on /dev/shm by default, so "files" are host
memory that any engine process on the machine can map):

    chunks/<key>.kv      magic, header length, JSON header (crc32c, nbytes,
                         fingerprint), then the block's KV bytes for every layer
    refs/<handle>.json   the keys a handle holds; a chunk no ref names is garbage
    generation           a counter bumped by every reference change, so that an engine
                         pinning blocks (connector.py) rereads the refs only when needed
    lock                 flock'd around reference changes and collection

Writers never modify a chunk in place: a chunk is written to a temporary name and
renamed, so a reader sees a whole chunk or none. Readers never trust a chunk: every
read checks the header's fingerprint and the payload's CRC32C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import crc32c

from branching.kv.handle import Fingerprint

log = logging.getLogger(__name__)

_MAGIC = b"BKV1"
_PREFIX = struct.Struct("<4sI")
DEFAULT_ROOT = Path("/dev/shm/branchd-kv")


class ChunkError(Exception):
    """A chunk that must not be served: missing, truncated, corrupt or foreign."""


@dataclasses.dataclass(frozen=True)
class StoreUsage:
    chunks: int
    bytes: int
    handles: int
    capacity: int | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ChunkStore:
    """Refcounted, checksummed KV chunks shared by engine processes.

    Invariants: a chunk file is complete once visible under its name; a chunk named
    by some ref file is never collected; the store never holds more than
    `capacity` bytes of chunks (a put that would exceed it is refused, not evicting
    referenced data).
    """

    def __init__(self, path: str | os.PathLike[str], capacity: int | None = None) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self._chunks = self.path / "chunks"
        self._refs = self.path / "refs"
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._refs.mkdir(exist_ok=True)

    def chunk_path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"invalid chunk key {key!r}")
        return self._chunks / (key + ".kv")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put(self, key: str, payload: bytes, fingerprint: Fingerprint) -> int | None:
        """Store one block; returns its CRC32C, or None when the store is full."""
        path = self.chunk_path(key)
        if self.holds(key, fingerprint):
            return int(self.header(key)["crc32c"])
        if self.capacity is not None and self.usage().bytes + len(payload) > self.capacity:
            log.warning("KV store %s full (%d bytes): block %s not saved",
                        self.path, self.capacity, key[:12])
            return None
        crc = crc32c.crc32c(payload)
        header = json.dumps(
            {"crc32c": crc, "nbytes": len(payload), "fingerprint": fingerprint.to_json()}
        ).encode()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(_MAGIC, len(header)))
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)
        return crc

    def _read(self, key: str) -> tuple[dict[str, Any], bytes]:
        try:
            data = self.chunk_path(key).read_bytes()
        except FileNotFoundError:
            raise ChunkError(f"block {key[:12]} not in store") from None
        if len(data) < _PREFIX.size:
            raise ChunkError(f"block {key[:12]} truncated")
        magic, hlen = _PREFIX.unpack_from(data)
        if magic != _MAGIC:
            raise ChunkError(f"block {key[:12]}: bad magic")
        try:
            header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
        except ValueError:
            raise ChunkError(f"block {key[:12]}: unreadable header") from None
        return header, data[_PREFIX.size + hlen :]

    def holds(self, key: str, fingerprint: Fingerprint) -> bool:
        """Whether a good copy of the block is here (a bad one is to be rewritten)."""
        try:
            self.read(key, fingerprint)
        except ChunkError:
            return False
        return True

    def header(self, key: str) -> dict[str, Any]:
        return self._read(key)[0]

    def read(self, key: str, fingerprint: Fingerprint, expected_crc: int | None = None) -> bytes:
        """The block's payload, after checking fingerprint and checksum (ChunkError if not)."""
        header, payload = self._read(key)
        if header.get("fingerprint") != fingerprint.to_json():
            raise ChunkError(f"block {key[:12]}: fingerprint mismatch")
        if len(payload) != header.get("nbytes"):
            raise ChunkError(f"block {key[:12]} truncated")
        crc = crc32c.crc32c(payload)
        if crc != header.get("crc32c") or (expected_crc is not None and crc != expected_crc):
            raise ChunkError(f"block {key[:12]}: checksum mismatch")
        return payload

    def checksums(self, keys: Iterable[str]) -> list[int]:
        return [int(self.header(k)["crc32c"]) for k in keys]

    def retain(self, handle_id: str, keys: Iterable[str]) -> None:
        """Record that `handle_id` holds `keys` (before they are written, so that a
        collection running meanwhile cannot free them)."""
        self.chunk_path(handle_id)  # same alphabet check as keys
        with self._locked():
            tmp = self._refs / (handle_id + ".tmp")
            tmp.write_text(json.dumps(list(keys)))
            os.replace(tmp, self._refs / (handle_id + ".json"))
            self._bump()

    def release(self, handle_id: str) -> int:
        """Drop a handle's references and free what nobody references; returns bytes freed."""
        self.chunk_path(handle_id)
        with self._locked():
            with contextlib.suppress(FileNotFoundError):
                (self._refs / (handle_id + ".json")).unlink()
            self._bump()
            return self._collect()

    def _bump(self) -> None:
        # under the lock: read, add one, replace (a reader sees the old or new count)
        path = self.path / "generation"
        tmp = path.with_name(f"generation.{os.getpid()}.tmp")
        tmp.write_text(str(self.generation() + 1))
        os.replace(tmp, path)

    def generation(self) -> int:
        """How many reference changes the store has seen (0 before the first)."""
        try:
            return int((self.path / "generation").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def live_keys(self) -> set[str]:
        """Every key some handle's ref names."""
        live: set[str] = set()
        for ref in self._refs.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):  # released meanwhile
                live.update(json.loads(ref.read_text()))
        return live

    def collect(self) -> int:
        with self._locked():
            return self._collect()

    def _collect(self) -> int:
        live = self.live_keys()
        freed = 0
        for chunk in self._chunks.glob("*.kv"):
            if chunk.stem not in live:
                freed += chunk.stat().st_size
                chunk.unlink()
        if freed:
            log.debug("KV store %s: freed %d bytes", self.path, freed)
        return freed

    def usage(self) -> StoreUsage:
        sizes = [c.stat().st_size for c in self._chunks.glob("*.kv")]
        handles = sum(1 for _ in self._refs.glob("*.json"))
        return StoreUsage(len(sizes), sum(sizes), handles, self.capacity)
