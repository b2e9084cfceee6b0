"""Small JSON metadata carried by branches (a KV-fork handle, a pattern's notes).

Kept beside the filesystem's own state, keyed by branch id, written atomically
on every change so that it survives a restart like the branches themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from branchfs.durable import atomic_write


class MetaTooLarge(ValueError):
    code = "bad-request"


class MetaStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(path.read_bytes())
        except FileNotFoundError:
            self.data = {}

    def get(self, branch_id: str) -> dict[str, Any]:
        return dict(self.data.get(branch_id, {}))

    @staticmethod
    def check(meta: dict[str, Any], limit: int) -> None:
        size = len(json.dumps(meta))
        if size > limit:
            raise MetaTooLarge(f"branch metadata of {size} bytes exceeds {limit}")

    def set(self, branch_id: str, meta: dict[str, Any]) -> None:
        self.data[branch_id] = meta
        self._save()

    def drop(self, branch_id: str) -> None:
        if self.data.pop(branch_id, None) is not None:
            self._save()

    def _save(self) -> None:
        atomic_write(self.path, json.dumps(self.data).encode())
