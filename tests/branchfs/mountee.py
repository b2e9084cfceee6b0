"""A tiny stand-in for the daemon, run as a subprocess by the mount tests.

    python mountee.py STATE_DIR MOUNTPOINT WORKSPACE_DIR BRANCH...

Opens a Store, adds the workspace, creates the branches (``name`` or
``name:parent``), serves the mount and prints ``ready``; then reads one JSON
command per line on stdin and answers one JSON line on stdout:
``{"op": "create"|"commit"|"discard"|"diff", "name": ..., "parent": ...,
"force": ...}``.
Commands run on the trio thread that serves FUSE, as in the daemon.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import trio

import branchfs


def run(store: branchfs.Store, ws: str, cmd: dict[str, Any]) -> Any:
    op = cmd["op"]
    if op == "create":
        return store.create_branch(ws, cmd["name"], cmd.get("parent"), on_sibling_commit=cmd.get(
            "on_sibling_commit", "rebase")).to_dict()
    if op == "commit":
        return store.commit(ws, cmd["name"], force=cmd.get("force", False)).to_dict()
    if op == "discard":
        return [b.to_dict() for b in store.discard(ws, cmd["name"])]
    if op == "diff":
        return [c.to_dict() for c in store.diff(ws, cmd["name"])]
    raise ValueError(op)


async def main(state: str, mnt: str, base: str, branches: list[str]) -> None:
    store = branchfs.Store(state, mountpoint=mnt)
    ws = store.add_workspace(base, name="ws").name
    for spec in branches:
        name, _, parent = spec.partition(":")
        store.create_branch(ws, name, parent or None)
    async with trio.open_nursery() as nursery:
        fuse = branchfs.FuseBackend(store)
        plane = branchfs.DataPlane(store, [fuse])  # the store's subscriber: events reach it
        await nursery.start(branchfs.serve, fuse, mnt)
        print("ready", flush=True)
        stdin = trio.lowlevel.FdStream(0)
        buf = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    reply = {"ok": True, "result": run(store, ws, json.loads(line))}
                except branchfs.BranchFSError as exc:
                    reply = {"ok": False, "code": exc.code, "message": str(exc)}
                await plane.settle()  # the kernel dropped what the change made stale
                print(json.dumps(reply), flush=True)
        nursery.cancel_scope.cancel()
    store.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="mountee %(levelname)s %(name)s: %(message)s")
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
