"""Branch references are plain data: a branch goes into JSON, msgpack or a pickle, and
comes back as a working Branch in another process (as graph state does between steps)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from branching import BranchError, BranchRef, EmbeddedDaemon, Workspace

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def test_a_branch_travels_as_json_msgpack_and_pickle(daemon: EmbeddedDaemon,
                                                      tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "f").write_text("base\n")
    with Workspace(root, daemon=daemon) as ws:
        b = ws.create("travel")
        ref = b.ref()
        assert BranchRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
        assert BranchRef.from_dict(msgpack.unpackb(msgpack.packb(ref.to_dict()))) == ref
        assert ws.open(json.loads(json.dumps(ref.to_dict()))).id == b.id
        # another process unpickles the Branch itself and works in it
        script = ("import pickle, sys; b = pickle.loads(sys.stdin.buffer.read()); "
                  "r = b.run(['sh', '-c', 'echo child > f']); print(b.name, r.ok)")
        proc = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(b),
                              capture_output=True, timeout=60,
                              env={k: v for k, v in os.environ.items()
                                   if k != "BRANCHD_SOCKET"})
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().split() == ["travel", "True"]
        assert (b.path / "f").read_text() == "child\n"
        b.abort()
        again = ws.create("travel")  # the same name, another branch
        with pytest.raises(BranchError, match="another branch now"):
            ws.open(ref)
        again.abort()
