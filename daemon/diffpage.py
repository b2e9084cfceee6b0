"""A diff in pages: every reply fits in one message (``protocol.MAX_MESSAGE``),
while a branch holding a virtualenv changes tens of thousands of paths.

``diff`` answers the ``stat`` (counts by kind) and ``total`` of the changes
(after the ``paths`` filter) with every page, and one page of changes from
``offset``: as many as fit in ``PAGE_BYTES`` of JSON, and ``next``, the offset
of the next page (None after the last). ``patch`` covers the page's changes,
cut at ``PATCH_BYTES`` of JSON (``patch.patch`` says what it left out), so a
reply stays below ``PAGE_BYTES + PATCH_BYTES`` plus a little.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from branchfs import Change

PAGE_BYTES = 256 * 1024
PATCH_BYTES = 512 * 1024


def select(changes: list[Change], paths: Sequence[str] | None) -> list[Change]:
    """The changes at or below one of *paths* (relative to the workspace root)."""
    if paths is None:
        return changes
    roots = [p.strip("/") for p in paths]
    if "" in roots:
        return changes

    def under(path: str | None) -> bool:
        return path is not None and any(path == r or path.startswith(r + "/") for r in roots)

    return [c for c in changes if under(c.path) or under(c.old_path)]


def stat(changes: list[Change]) -> dict[str, int]:
    counts = {"added": 0, "modified": 0, "deleted": 0}
    for c in changes:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    return counts


def page(changes: list[Change], offset: int) -> tuple[list[Change], int | None]:
    """The changes from *offset* that fit in a page, and the offset after them."""
    if offset < 0:
        offset = 0
    out: list[Change] = []
    size = 0
    for c in changes[offset:]:
        size += len(json.dumps(c.to_dict())) + 2
        if out and size > PAGE_BYTES:
            break
        out.append(c)
    end = offset + len(out)
    return out, (end if end < len(changes) else None)
